package agentclient

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/wan/wanemu"
)

// world is a small fake of two pools for the engine: one running VM with
// one disk whose guest writes between snapshots; snapshots are image files
// the filecopy backend reads; migrate_send fetches the rewritten xenops URL
// (through the WAN gateway) and then moves the VM.
type world struct {
	t    *testing.T
	dir  string // filecopy source_dir
	size int64

	mu          sync.Mutex
	live        []byte
	cbt         bool
	nextSnap    int
	writes      []int // blocks the guest rewrites before snapshot k
	snapshots   map[string]bool
	vmAtSource  bool
	replicaCID  string
	replicaGone bool
	tasks       map[string]*engine.TaskRecord
	nextTask    int
	migTask     string
	migPolls    int
	xapiTarget  string
	xapiReply   string
}

const (
	vmUUID  = "vm-uuid-1"
	diskRef = "OpaqueRef:vdi-1"
)

func newWorld(t *testing.T, size int64, xapiTarget string) *world {
	w := &world{t: t, dir: t.TempDir(), size: size, live: make([]byte, size), writes: []int{0, 24, 6, 2, 1, 1, 1, 1, 1, 1},
		snapshots: map[string]bool{}, vmAtSource: true, tasks: map[string]*engine.TaskRecord{}, xapiTarget: xapiTarget}
	r := rand.New(rand.NewSource(7))
	const bs = 64 << 10
	for off := int64(0); off < size; off += bs {
		if (off/bs)%3 != 2 {
			r.Read(w.live[off : off+bs])
		}
	}
	return w
}

func (w *world) snapPath(ref string) string {
	return filepath.Join(w.dir, strings.TrimPrefix(ref, "OpaqueRef:")+".img")
}

type srcPool struct{ w *world }

func (s srcPool) VMByUUID(_ context.Context, uuid string) (engine.VMRecord, error) {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if uuid != vmUUID || !s.w.vmAtSource {
		return engine.VMRecord{}, fmt.Errorf("vm %s: %w", uuid, engine.ErrNotFound)
	}
	return engine.VMRecord{Ref: "OpaqueRef:vm", UUID: vmUUID, NameLabel: "demo", PowerState: "Running", ResidentOn: "OpaqueRef:h1", MemoryBytes: 256 << 20}, nil
}

func (s srcPool) VMDisks(context.Context, string) ([]engine.Disk, error) {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	return []engine.Disk{{VDIRef: diskRef, VDIUUID: "vdi-1", SRRef: "OpaqueRef:sr", NameLabel: "disk0", Device: "0",
		VirtualSize: s.w.size, PhysicalUtilisation: s.w.size, CBTEnabled: s.w.cbt}}, nil
}

func (s srcPool) VMVIFs(context.Context, string) ([]engine.VIF, error) { return nil, nil }

func poolConfig() map[string]string {
	return map[string]string{"wanmotion:storage": "filecopy", "wanmotion:network": "none", "wanmotion:config": `{"streams": 2}`}
}

func (s srcPool) PoolOtherConfig(context.Context) (map[string]string, error) {
	return poolConfig(), nil
}

func (s srcPool) EnableCBT(context.Context, string) error {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	s.w.cbt = true
	return nil
}

func (s srcPool) DisableCBT(context.Context, string) error {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	s.w.cbt = false
	return nil
}

func (s srcPool) SnapshotVDI(_ context.Context, vdi string, _ map[string]string) (string, error) {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if vdi != diskRef || !s.w.cbt {
		return "", fmt.Errorf("snapshot of %s (cbt %v)", vdi, s.w.cbt)
	}
	n := s.w.nextSnap
	s.w.nextSnap++
	// The guest wrote since the previous snapshot.
	r := rand.New(rand.NewSource(int64(100 + n)))
	const bs = 64 << 10
	blocks := int(s.w.size / bs)
	if n < len(s.w.writes) {
		for i := 0; i < s.w.writes[n]; i++ {
			b := int64(r.Intn(blocks))
			r.Read(s.w.live[b*bs : (b+1)*bs])
		}
	}
	ref := fmt.Sprintf("OpaqueRef:snap-%d", n)
	if err := os.WriteFile(s.w.snapPath(ref), s.w.live, 0o600); err != nil {
		return "", err
	}
	s.w.snapshots[ref] = true
	return ref, nil
}

func (s srcPool) VDIContentID(_ context.Context, vdi string) (string, error) {
	return "cid-" + strings.TrimPrefix(vdi, "OpaqueRef:"), nil
}

func (s srcPool) SetVDIContentID(context.Context, string, string) error { return nil }

func (s srcPool) ListChangedBlocks(_ context.Context, from, to string) (string, error) {
	a, err := os.ReadFile(s.w.snapPath(from))
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(s.w.snapPath(to))
	if err != nil {
		return "", err
	}
	const bs = 64 << 10
	bm := make([]byte, (len(b)/bs+7)/8)
	for i := 0; i*bs < len(b); i++ {
		if !bytes.Equal(a[i*bs:(i+1)*bs], b[i*bs:(i+1)*bs]) {
			bm[i/8] |= 0x80 >> (i % 8)
		}
	}
	return base64.StdEncoding.EncodeToString(bm), nil
}

func (s srcPool) DataDestroyVDI(context.Context, string) error { return nil }

func (s srcPool) DestroyVDI(_ context.Context, vdi string) error {
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	delete(s.w.snapshots, vdi)
	_ = os.Remove(s.w.snapPath(vdi))
	return nil
}

func (s srcPool) AssertCanMigrate(context.Context, engine.MigrateArgs) error { return nil }

// MigrateSend plays xapi: it connects to the rewritten xenops URL (the
// gateway's local end) as xapi's memory stream would, then the VM moves.
func (s srcPool) MigrateSend(ctx context.Context, args engine.MigrateArgs) (string, error) {
	u := args.Dest["xenops"]
	if !strings.HasPrefix(u, "http://127.0.0.1:") {
		return "", fmt.Errorf("xenops url not rewritten to the gateway: %q", u)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, u, strings.NewReader("memory pages"))
	if err != nil {
		return "", err
	}
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(req)
	if err != nil {
		return "", fmt.Errorf("memory stream through the gateway: %w", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	s.w.xapiReply = string(body)
	s.w.nextTask++
	s.w.migTask = fmt.Sprintf("OpaqueRef:migtask-%d", s.w.nextTask)
	s.w.tasks[s.w.migTask] = &engine.TaskRecord{Status: engine.TaskPending}
	return s.w.migTask, nil
}

type dstPool struct{ w *world }

func (d dstPool) VMByUUID(_ context.Context, uuid string) (engine.VMRecord, error) {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	if uuid != vmUUID || d.w.vmAtSource {
		return engine.VMRecord{}, fmt.Errorf("vm %s: %w", uuid, engine.ErrNotFound)
	}
	return engine.VMRecord{Ref: "OpaqueRef:dstvm", UUID: vmUUID, PowerState: "Running", ResidentOn: "OpaqueRef:h2"}, nil
}

func (d dstPool) PoolOtherConfig(context.Context) (map[string]string, error) {
	return poolConfig(), nil
}
func (d dstPool) PoolMaster(context.Context) (string, error)           { return "OpaqueRef:h2", nil }
func (d dstPool) DefaultSRFor(context.Context, string) (string, error) { return "OpaqueRef:dsr", nil }
func (d dstPool) ManagementNetwork(context.Context, string) (string, error) {
	return "OpaqueRef:mnet", nil
}

func (d dstPool) CreateVDI(context.Context, engine.VDISpec) (string, string, error) {
	return "OpaqueRef:replica", "replica-1", nil
}

func (d dstPool) DestroyVDI(context.Context, string) error {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	d.w.replicaGone = true
	return nil
}

func (d dstPool) SetVDIContentID(_ context.Context, _ string, cid string) error {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	d.w.replicaCID = cid
	return nil
}

func (d dstPool) MigrateReceive(context.Context, string, string, map[string]string) (map[string]string, error) {
	base := "http://" + d.w.xapiTarget
	return map[string]string{"SM": base + "/services/SM?session_id=OpaqueRef%3As", "xenops": base + "/services/xenops?session_id=OpaqueRef%3As",
		"master": base + "/", "host": "OpaqueRef:h2", "session_id": "OpaqueRef:s"}, nil
}

type tasks struct{ w *world }

func (t tasks) CreateTask(context.Context, string, string) (string, error) {
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	t.w.nextTask++
	ref := fmt.Sprintf("OpaqueRef:task-%d", t.w.nextTask)
	t.w.tasks[ref] = &engine.TaskRecord{Status: engine.TaskPending}
	return ref, nil
}

func (t tasks) AddTaskOtherConfig(context.Context, string, string, string) error { return nil }

func (t tasks) with(task string, f func(*engine.TaskRecord)) error {
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	r, ok := t.w.tasks[task]
	if !ok {
		return fmt.Errorf("task %s: %w", task, engine.ErrNotFound)
	}
	f(r)
	return nil
}

func (t tasks) SetTaskProgress(_ context.Context, task string, p float64) error {
	return t.with(task, func(r *engine.TaskRecord) { r.Progress = p })
}

func (t tasks) SetTaskStatus(_ context.Context, task string, s engine.TaskStatus) error {
	return t.with(task, func(r *engine.TaskRecord) { r.Status = s })
}

func (t tasks) SetTaskResult(_ context.Context, task, res string) error {
	return t.with(task, func(r *engine.TaskRecord) { r.Result = res })
}

func (t tasks) SetTaskErrorInfo(_ context.Context, task string, info []string) error {
	return t.with(task, func(r *engine.TaskRecord) { r.ErrorInfo = info })
}

func (t tasks) TaskRecord(_ context.Context, task string) (engine.TaskRecord, error) {
	var out engine.TaskRecord
	err := t.with(task, func(r *engine.TaskRecord) {
		if task == t.w.migTask && r.Status == engine.TaskPending {
			t.w.migPolls++
			if t.w.migPolls >= 2 {
				t.w.vmAtSource = false
				r.Status, r.Result, r.Progress = engine.TaskSuccess, "OpaqueRef:dstvm", 1
			}
		}
		out = *r
	})
	return out, err
}

type catalog struct{}

func (catalog) Installed(context.Context) (engine.Installed, error) {
	return engine.Installed{Storage: []string{"filecopy"}}, nil
}

// replicaCheck compares the replica (filecopy's file at the destination)
// with the last snapshot the engine synced.
type replicaCheck struct {
	w        *world
	stateDir string
	checked  bool
}

func (c *replicaCheck) Check(_ context.Context, req engine.IntegrityRequest) (bool, error) {
	d := req.Disks[0]
	last := d.Snapshots[len(d.Snapshots)-1]
	want, err := os.ReadFile(c.w.snapPath(last.Ref))
	if err != nil {
		return false, err
	}
	got, err := os.ReadFile(filepath.Join(c.stateDir, req.MigrationID, "destination", "replica-"+d.ReplicaUUID+".img"))
	if err != nil {
		return false, err
	}
	c.checked = true
	return bytes.Equal(want, got), nil
}

type e2e struct {
	cfg   Config
	store engine.Store
	e     *engine.Engine
	w     *world
	link  *wanemu.Link
	l     *inProcLauncher
	check *replicaCheck
	req   engine.Request
}

func newE2E(t *testing.T, ctx context.Context, size, linkBits int64) *e2e {
	t.Helper()
	xapi := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		_, _ = fmt.Fprintf(w, "xenops got %q on %s", b, r.URL.Path)
	}))
	t.Cleanup(xapi.Close)
	x := &e2e{w: newWorld(t, size, xapi.Listener.Addr().String()), l: newInProc(t)}
	listen := freeAddr(t)
	var err error
	x.link, err = wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: listen, RTT: 10 * time.Millisecond, Bandwidth: linkBits})
	require.NoError(t, err)
	t.Cleanup(func() { _ = x.link.Close() })
	advertise := x.link.Addr()

	agentState := t.TempDir()
	fcfg := (&fixture{srcDir: x.w.dir}).config(t)
	x.cfg = Config{Launcher: x.l, StateDir: t.TempDir(), AgentStateDir: agentState, StorageConfig: fcfg, UUIDOf: uuidOf, Logger: testutil.Logger(t)}
	x.store = engine.NewMemStore()
	x.check = &replicaCheck{w: x.w, stateDir: agentState}
	x.e = x.controller(t)
	x.req = engine.Request{MigrationID: "mig-e2e", VMUUID: vmUUID,
		Overrides: engine.Overrides{GatewayListen: &listen, GatewayAdvertise: &advertise},
		Link:      engine.Link{BandwidthBytesPerSec: 1 << 20, RTT: 10 * time.Millisecond}}
	return x
}

// controller is a fresh client and engine on the same state (what a
// restarted controller process builds).
func (x *e2e) controller(t *testing.T) *engine.Engine {
	t.Helper()
	c, err := New(x.cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = c.Close() })
	e, err := engine.New(engine.Deps{Source: srcPool{x.w}, Dest: dstPool{x.w}, Tasks: tasks{x.w}, Storage: c.Storage(), Network: c.Network(),
		Gateway: c.Gateway(), Agents: c, Catalog: catalog{}, Store: x.store, Integrity: x.check,
		Logger: testutil.Logger(t), PollInterval: 20 * time.Millisecond})
	require.NoError(t, err)
	return e
}

func (x *e2e) checkMoved(t *testing.T, rep engine.Report) {
	t.Helper()
	assert.Equal(t, engine.ResultSuccess, rep.Result)
	assert.GreaterOrEqual(t, rep.SeedRounds, 2)
	assert.True(t, x.check.checked)
	assert.Equal(t, engine.IntegrityOK, rep.Integrity)
	assert.Positive(t, rep.BytesOnWire)
	x.w.mu.Lock()
	assert.False(t, x.w.vmAtSource)
	assert.Contains(t, x.w.xapiReply, `xenops got "memory pages" on /services/xenops`, "xapi's stream went through the gateway")
	assert.True(t, x.w.replicaGone)
	assert.NotEmpty(t, x.w.replicaCID)
	assert.Empty(t, x.w.snapshots, "snapshots destroyed")
	x.w.mu.Unlock()
	x.l.mu.Lock()
	defer x.l.mu.Unlock()
	for name, r := range x.l.agents {
		select {
		case <-r.done:
		case <-time.After(10 * time.Second):
			t.Errorf("agent %s still runs after the migration", name)
		}
	}
}

// TestEngineEndToEnd runs the real engine on the fake pools with this
// client as Agents, StorageBackend and Gateway: agents in-process, the
// filecopy backend as real subprocesses, all data through a WAN gateway
// session across an emulated link.
func TestEngineEndToEnd(t *testing.T) {
	const size = 4 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	x := newE2E(t, ctx, size, 200e6)
	rep, err := x.e.Run(ctx, x.req)
	require.NoError(t, err)
	x.checkMoved(t, rep)
	assert.Greater(t, x.link.Counters().Upstream, int64(size/2), "the seed crossed the emulated link")
	assert.Equal(t, 2, x.l.count())
}

// TestEngineSourceAgentLostMidSeed stops the source agent while round 0
// runs: the engine's retry re-attaches (Agents.Start launches a new source
// agent, the gateway is re-dialled, handles recovered) and the migration
// completes with a correct replica.
func TestEngineSourceAgentLostMidSeed(t *testing.T) {
	const size = 8 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	x := newE2E(t, ctx, size, 20e6) // ~3.5 s for round 0
	go func() {
		// Wait until round 0's data is crossing, then take the source agent away.
		for ctx.Err() == nil {
			if x.link.Counters().Upstream > size/8 {
				_ = x.l.Stop(ctx, AgentLaunchSpec{MigrationID: "mig-e2e", Role: "source"})
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	rep, err := x.e.Run(ctx, x.req)
	require.NoError(t, err)
	x.checkMoved(t, rep)
	assert.Equal(t, 3, x.l.count(), "one new source agent was launched")
}

// TestEngineControllerRestartMidSeed stops the controller while round 0
// runs and resumes with a new client and engine on the same state: the
// client re-attaches to the running agents (no new launch) and the
// migration completes.
func TestEngineControllerRestartMidSeed(t *testing.T) {
	const size = 8 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	x := newE2E(t, ctx, size, 20e6)
	rctx, stop := context.WithCancel(ctx)
	go func() {
		for rctx.Err() == nil {
			if x.link.Counters().Upstream > size/8 {
				stop() // the controller "crashes" mid-round
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	}()
	_, err := x.e.Run(rctx, x.req)
	require.ErrorIs(t, err, engine.ErrInterrupted)
	stop()

	rep, err := x.controller(t).Resume(ctx, x.req.MigrationID)
	require.NoError(t, err)
	x.checkMoved(t, rep)
	assert.Equal(t, 2, x.l.count(), "the resumed controller re-attached to the running agents")
}
