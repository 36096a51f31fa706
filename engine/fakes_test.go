package engine

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// fakeVDI is one VDI in either fake pool.
type fakeVDI struct {
	ref, uuid     string
	side          string // "src" | "dst"
	cbt           bool
	snapshotOf    string
	round         string
	contentID     string
	destroyed     bool
	dataDestroyed bool
	otherConfig   map[string]string
}

type syncState int

const (
	syncRunning syncState = iota
	syncDone
	syncFailed
)

type fakeSync struct {
	spec  SyncSpec
	state syncState
}

// world is a fake of both pools, the task API, the site agents, the
// backends and the gateway. Function fields override behaviour; every call
// is recorded in calls.
type world struct {
	mu    sync.Mutex
	calls map[string]int
	trace []string

	// Hook runs first in every method; a non-nil error is returned as the
	// method's error.
	Hook func(method string) error
	// ChangedBlocks returns the number of changed blocks list_changed_blocks
	// reports for round k (k ≥ 1) of each disk.
	ChangedBlocks func(round int) int
	// MigrateSendF overrides the outcome of VM.migrate_send's task: return
	// nil for success or the error_info of a failure.
	MigrateSendF func(args MigrateArgs) []string
	// SyncFail makes a round fail.
	SyncFail func(spec SyncSpec) bool
	// SyncBlock makes SyncRound of a round wait until its ctx is cancelled.
	SyncBlock func(spec SyncSpec) bool

	vmUUID, vmRef       string
	vmAtSource, vmAtDst bool
	vmDstRef            string
	disks               []Disk
	vifs                []VIF
	srcOC, dstOC        map[string]string
	installed           Installed

	vdis      map[string]*fakeVDI
	nextID    int
	tasks     map[string]*TaskRecord
	taskOC    map[string]map[string]string
	taskLabel map[string]string
	taskDesc  map[string]string
	ourTasks  []string
	cancelAll bool // every engine task gets a cancel in current_operations

	migTask       string
	migPolls      int
	migArgs       MigrateArgs
	agentsUp      bool
	gatewayUp     bool
	syncs         map[DiskKey]*fakeSync
	storageClosed map[DiskKey]bool
	applied       map[DiskKey][]int // rounds applied per disk
	netPrepared   bool
	netActive     bool
	netReleased   bool
	netCleaned    bool
	throttle      int // guest throttle in force (percent)
	throttleSeen  []int
	released      int
}

func newWorld() *world {
	w := &world{
		calls: map[string]int{}, vmUUID: "vm-uuid-1", vmRef: "OpaqueRef:vm1", vmAtSource: true,
		srcOC: map[string]string{}, dstOC: map[string]string{},
		installed: Installed{Storage: []string{"nbd", "drbd"}, Network: []string{"l2tunnel"}},
		vdis:      map[string]*fakeVDI{}, tasks: map[string]*TaskRecord{}, taskOC: map[string]map[string]string{},
		taskLabel: map[string]string{}, taskDesc: map[string]string{}, syncs: map[DiskKey]*fakeSync{}, storageClosed: map[DiskKey]bool{}, applied: map[DiskKey][]int{},
		ChangedBlocks: func(round int) int {
			switch round {
			case 1:
				return 100 // 6.25 MiB
			case 2:
				return 5 // 2 disks × 320 KiB: under a 1 MB threshold
			}
			return 1
		},
	}
	for i, sz := range []int64{1 << 30, 4 << 30} {
		ref := fmt.Sprintf("OpaqueRef:vdi%d", i)
		d := Disk{VDIRef: ref, VDIUUID: fmt.Sprintf("vdi-uuid-%d", i), SRRef: "OpaqueRef:srcsr", NameLabel: fmt.Sprintf("disk %d", i),
			Device: fmt.Sprint(i), VirtualSize: sz, PhysicalUtilisation: sz / 4}
		w.disks = append(w.disks, d)
		w.vdis[ref] = &fakeVDI{ref: ref, uuid: d.VDIUUID, side: "src", otherConfig: map[string]string{}}
	}
	w.vifs = []VIF{{Ref: "OpaqueRef:vif0", Device: "0", MAC: "aa:bb:cc:dd:ee:00", NetworkRef: "OpaqueRef:srcnet"}}
	return w
}

func (w *world) call(m string) error {
	w.mu.Lock()
	w.calls[m]++
	w.trace = append(w.trace, m)
	h := w.Hook
	w.mu.Unlock()
	if h != nil {
		return h(m)
	}
	return nil
}

func (w *world) count(m string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.calls[m]
}

func (w *world) id(prefix string) string {
	w.nextID++
	return fmt.Sprintf("OpaqueRef:%s%d", prefix, w.nextID)
}

func (w *world) vmRecord(side string) (VMRecord, error) {
	if side == "src" && !w.vmAtSource || side == "dst" && !w.vmAtDst {
		return VMRecord{}, fmt.Errorf("vm %s: %w", w.vmUUID, ErrNotFound)
	}
	ref := w.vmRef
	if side == "dst" {
		ref = w.vmDstRef
	}
	ops := map[string]string{}
	if side == "src" && w.migTask != "" && w.tasks[w.migTask].Status == TaskPending {
		ops[w.migTask] = "migrate_send"
	}
	return VMRecord{Ref: ref, UUID: w.vmUUID, NameLabel: "demo-vm", PowerState: "Running", ResidentOn: "OpaqueRef:srchost",
		MemoryBytes: 1 << 30, CurrentOperations: ops}, nil
}

func (w *world) vdi(ref string) (*fakeVDI, error) {
	v, ok := w.vdis[ref]
	if !ok || v.destroyed {
		return nil, fmt.Errorf("vdi %s: %w", ref, ErrNotFound)
	}
	return v, nil
}

// liveVDIs counts VDIs not destroyed, by kind.
func (w *world) live(kind string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	n := 0
	for _, v := range w.vdis {
		if v.destroyed {
			continue
		}
		switch {
		case kind == "snapshot" && v.snapshotOf != "":
			n++
		case kind == "replica" && v.side == "dst" && v.otherConfig["wanmotion:migration_id"] != "":
			n++
		}
	}
	return n
}

func (w *world) srcCBT() []bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	var out []bool
	for _, d := range w.disks {
		out = append(out, w.vdis[d.VDIRef].cbt)
	}
	return out
}

// --- source pool ---

type srcPool struct{ w *world }

func (s srcPool) VMByUUID(ctx context.Context, uuid string) (VMRecord, error) {
	if err := s.w.call("src.VMByUUID"); err != nil {
		return VMRecord{}, err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	return s.w.vmRecord("src")
}

func (s srcPool) VMDisks(ctx context.Context, vm string) ([]Disk, error) {
	if err := s.w.call("src.VMDisks"); err != nil {
		return nil, err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	out := append([]Disk{}, s.w.disks...)
	for i := range out {
		out[i].CBTEnabled = s.w.vdis[out[i].VDIRef].cbt
	}
	return out, nil
}

func (s srcPool) VMVIFs(ctx context.Context, vm string) ([]VIF, error) {
	if err := s.w.call("src.VMVIFs"); err != nil {
		return nil, err
	}
	return append([]VIF{}, s.w.vifs...), nil
}

func (s srcPool) PoolOtherConfig(ctx context.Context) (map[string]string, error) {
	if err := s.w.call("src.PoolOtherConfig"); err != nil {
		return nil, err
	}
	return s.w.srcOC, nil
}

func (s srcPool) setCBT(m, vdi string, on bool) error {
	if err := s.w.call(m); err != nil {
		return err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	v, err := s.w.vdi(vdi)
	if err != nil {
		return err
	}
	v.cbt = on
	return nil
}

func (s srcPool) EnableCBT(ctx context.Context, vdi string) error {
	return s.setCBT("src.EnableCBT", vdi, true)
}

func (s srcPool) DisableCBT(ctx context.Context, vdi string) error {
	return s.setCBT("src.DisableCBT", vdi, false)
}

func (s srcPool) SnapshotVDI(ctx context.Context, vdi string, tags map[string]string) (string, error) {
	if err := s.w.call("src.SnapshotVDI"); err != nil {
		return "", err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	v, err := s.w.vdi(vdi)
	if err != nil {
		return "", err
	}
	if !v.cbt {
		return "", errors.New("snapshot without cbt: the engine must enable cbt first")
	}
	ref := s.w.id("snap")
	oc := map[string]string{}
	for k, x := range tags {
		oc[k] = x
	}
	// like SM: every other snapshot gets a content_id, the rest none
	cid := ""
	if s.w.nextID%2 == 0 {
		cid = "cid-" + ref
	}
	s.w.vdis[ref] = &fakeVDI{ref: ref, uuid: "uuid-" + ref, side: "src", snapshotOf: vdi, round: tags["wanmotion:round"], contentID: cid, otherConfig: oc}
	return ref, nil
}

func (s srcPool) VDIContentID(ctx context.Context, vdi string) (string, error) {
	if err := s.w.call("src.VDIContentID"); err != nil {
		return "", err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	v, err := s.w.vdi(vdi)
	if err != nil {
		return "", err
	}
	return v.contentID, nil
}

func (s srcPool) SetVDIContentID(ctx context.Context, vdi, cid string) error {
	if err := s.w.call("src.SetVDIContentID"); err != nil {
		return err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	v, err := s.w.vdi(vdi)
	if err != nil {
		return err
	}
	v.contentID = cid
	return nil
}

func bitmapWith(n int) string {
	bm := make([]byte, (n+7)/8+3)
	for i := 0; i < n; i++ {
		bm[i/8] |= 0x80 >> (i % 8)
	}
	return base64.StdEncoding.EncodeToString(bm)
}

func (s srcPool) ListChangedBlocks(ctx context.Context, from, to string) (string, error) {
	if err := s.w.call("src.ListChangedBlocks"); err != nil {
		return "", err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	a, err := s.w.vdi(from)
	if err != nil {
		return "", err
	}
	b, err := s.w.vdi(to)
	if err != nil {
		return "", err
	}
	if a.snapshotOf == "" || a.snapshotOf != b.snapshotOf {
		return "", errors.New("list_changed_blocks of unrelated vdis")
	}
	var k int
	_, _ = fmt.Sscan(b.round, &k)
	return bitmapWith(s.w.ChangedBlocks(k)), nil
}

func (s srcPool) DataDestroyVDI(ctx context.Context, vdi string) error {
	if err := s.w.call("src.DataDestroyVDI"); err != nil {
		return err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	v, err := s.w.vdi(vdi)
	if err != nil {
		return err
	}
	v.dataDestroyed = true
	return nil
}

func (s srcPool) DestroyVDI(ctx context.Context, vdi string) error {
	if err := s.w.call("src.DestroyVDI"); err != nil {
		return err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	v, err := s.w.vdi(vdi)
	if err != nil {
		return err
	}
	v.destroyed = true
	return nil
}

func (w *world) checkMigrate(args MigrateArgs) error {
	for _, d := range w.disks {
		if w.vdis[d.VDIRef].cbt {
			return fmt.Errorf("VDI_CBT_ENABLED %s: %w", d.VDIRef, ErrCBTEnabled)
		}
		if _, ok := args.VDIMap[d.VDIRef]; !ok {
			return fmt.Errorf("vdi %s not in vdi_map", d.VDIRef)
		}
	}
	for _, k := range DestURLKeys {
		if !strings.HasPrefix(args.Dest[k], "http://10.") && !strings.HasPrefix(args.Dest[k], "http://127.0.0.1:") {
			return fmt.Errorf("bad dest %s url %q", k, args.Dest[k])
		}
	}
	return nil
}

func (s srcPool) AssertCanMigrate(ctx context.Context, args MigrateArgs) error {
	if err := s.w.call("src.AssertCanMigrate"); err != nil {
		return err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	return s.w.checkMigrate(args)
}

func (s srcPool) MigrateSend(ctx context.Context, args MigrateArgs) (string, error) {
	if err := s.w.call("src.MigrateSend"); err != nil {
		return "", err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if err := s.w.checkMigrate(args); err != nil {
		return "", err
	}
	for _, k := range DestURLKeys {
		if !strings.HasPrefix(args.Dest[k], "http://127.0.0.1:") {
			return "", fmt.Errorf("dest %s not rewritten to the gateway: %q", k, args.Dest[k])
		}
	}
	t := s.w.id("migtask")
	s.w.tasks[t] = &TaskRecord{Status: TaskPending, CurrentOperations: map[string]string{}}
	s.w.migTask, s.w.migPolls, s.w.migArgs = t, 0, args
	return t, nil
}

// --- destination pool ---

type dstPool struct{ w *world }

func (d dstPool) VMByUUID(ctx context.Context, uuid string) (VMRecord, error) {
	if err := d.w.call("dst.VMByUUID"); err != nil {
		return VMRecord{}, err
	}
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	return d.w.vmRecord("dst")
}

func (d dstPool) PoolOtherConfig(ctx context.Context) (map[string]string, error) {
	if err := d.w.call("dst.PoolOtherConfig"); err != nil {
		return nil, err
	}
	return d.w.dstOC, nil
}

func (d dstPool) PoolMaster(ctx context.Context) (string, error) {
	return "OpaqueRef:dsthost", d.w.call("dst.PoolMaster")
}

func (d dstPool) DefaultSRFor(ctx context.Context, host string) (string, error) {
	return "OpaqueRef:dstsr", d.w.call("dst.DefaultSR")
}

func (d dstPool) ManagementNetwork(ctx context.Context, host string) (string, error) {
	return "OpaqueRef:dstmgmt", d.w.call("dst.ManagementNetwork")
}

func (d dstPool) CreateVDI(ctx context.Context, spec VDISpec) (string, string, error) {
	if err := d.w.call("dst.CreateVDI"); err != nil {
		return "", "", err
	}
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	ref := d.w.id("replica")
	d.w.vdis[ref] = &fakeVDI{ref: ref, uuid: "uuid-" + ref, side: "dst", otherConfig: spec.OtherConfig}
	return ref, "uuid-" + ref, nil
}

func (d dstPool) DestroyVDI(ctx context.Context, vdi string) error {
	if err := d.w.call("dst.DestroyVDI"); err != nil {
		return err
	}
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	v, err := d.w.vdi(vdi)
	if err != nil {
		return err
	}
	v.destroyed = true
	return nil
}

func (d dstPool) SetVDIContentID(ctx context.Context, vdi, cid string) error {
	if err := d.w.call("dst.SetVDIContentID"); err != nil {
		return err
	}
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	v, err := d.w.vdi(vdi)
	if err != nil {
		return err
	}
	v.contentID = cid
	return nil
}

func (d dstPool) MigrateReceive(ctx context.Context, host, network string, options map[string]string) (map[string]string, error) {
	if err := d.w.call("dst.MigrateReceive"); err != nil {
		return nil, err
	}
	return map[string]string{
		"SM":         "http://10.0.0.2/services/SM?session_id=OpaqueRef%3Asess",
		"xenops":     "http://10.0.0.2/services/xenops?session_id=OpaqueRef%3Asess",
		"master":     "http://10.0.0.1/",
		"host":       host,
		"session_id": "OpaqueRef:sess",
	}, nil
}

// --- tasks ---

type tasks struct{ w *world }

func (t tasks) CreateTask(ctx context.Context, label, desc string) (string, error) {
	if err := t.w.call("task.Create"); err != nil {
		return "", err
	}
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	ref := t.w.id("task")
	ops := map[string]string{}
	if t.w.cancelAll {
		ops["OpaqueRef:canceller"] = "cancel"
	}
	t.w.tasks[ref] = &TaskRecord{Status: TaskPending, CurrentOperations: ops}
	t.w.taskOC[ref] = map[string]string{}
	t.w.taskLabel[ref] = label
	t.w.taskDesc[ref] = desc
	t.w.ourTasks = append(t.w.ourTasks, ref)
	return ref, nil
}

func (t tasks) rec(m, task string, f func(r *TaskRecord)) error {
	if err := t.w.call(m); err != nil {
		return err
	}
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	r, ok := t.w.tasks[task]
	if !ok {
		return fmt.Errorf("task %s: %w", task, ErrNotFound)
	}
	f(r)
	return nil
}

func (t tasks) AddTaskOtherConfig(ctx context.Context, task, k, v string) error {
	return t.rec("task.AddOtherConfig", task, func(*TaskRecord) { t.w.taskOC[task][k] = v })
}

func (t tasks) SetTaskProgress(ctx context.Context, task string, p float64) error {
	return t.rec("task.SetProgress", task, func(r *TaskRecord) {
		if p < 0 || p > 1 {
			panic(fmt.Sprintf("progress %v out of range", p))
		}
		r.Progress = p
	})
}

func (t tasks) SetTaskStatus(ctx context.Context, task string, s TaskStatus) error {
	return t.rec("task.SetStatus", task, func(r *TaskRecord) { r.Status = s })
}

func (t tasks) SetTaskResult(ctx context.Context, task, res string) error {
	return t.rec("task.SetResult", task, func(r *TaskRecord) { r.Result = res })
}

func (t tasks) SetTaskErrorInfo(ctx context.Context, task string, info []string) error {
	return t.rec("task.SetErrorInfo", task, func(r *TaskRecord) { r.ErrorInfo = info })
}

func (t tasks) TaskRecord(ctx context.Context, task string) (TaskRecord, error) {
	var out TaskRecord
	err := t.rec("task.Record", task, func(r *TaskRecord) {
		if task == t.w.migTask && r.Status == TaskPending {
			t.w.migPolls++
			r.Progress = 0.5
			if t.w.migPolls >= 2 {
				var fail []string
				if t.w.MigrateSendF != nil {
					fail = t.w.MigrateSendF(t.w.migArgs)
				}
				if fail != nil {
					r.Status, r.ErrorInfo = TaskFailure, fail
				} else {
					t.w.vmAtSource, t.w.vmAtDst, t.w.vmDstRef = false, true, "OpaqueRef:dstvm"
					r.Status, r.Result, r.Progress = TaskSuccess, "OpaqueRef:dstvm", 1
				}
			}
		}
		out = *r
		out.CurrentOperations = map[string]string{}
		for k, v := range r.CurrentOperations {
			out.CurrentOperations[k] = v
		}
		out.OtherConfig = map[string]string{}
		for k, v := range t.w.taskOC[task] {
			out.OtherConfig[k] = v
		}
	})
	return out, err
}

// --- agents, gateway, storage, network ---

type agents struct{ w *world }

// Start models the worst case of a failed Start: agents are launched
// (agentsUp) before the injected failure, as when the destination agent
// runs and the source agent or a backend then fails to start.
func (a agents) Start(ctx context.Context, spec AgentSpec) error {
	a.w.mu.Lock()
	a.w.agentsUp = true
	a.w.mu.Unlock()
	return a.w.call("agents.Start")
}

func (a agents) Stop(ctx context.Context, id string) error {
	if err := a.w.call("agents.Stop"); err != nil {
		return err
	}
	a.w.mu.Lock()
	a.w.agentsUp = false
	a.w.mu.Unlock()
	return nil
}

type gateway struct{ w *world }

func (g gateway) Start(ctx context.Context, spec GatewaySpec) error {
	if err := g.w.call("gw.Start"); err != nil {
		return err
	}
	g.w.mu.Lock()
	g.w.gatewayUp = true
	g.w.mu.Unlock()
	return nil
}

func (g gateway) Forward(ctx context.Context, id, target string) (string, error) {
	if err := g.w.call("gw.Forward"); err != nil {
		return "", err
	}
	g.w.mu.Lock()
	up := g.w.gatewayUp
	g.w.mu.Unlock()
	if !up {
		return "", errors.New("gateway not running")
	}
	switch target {
	case "10.0.0.1:80":
		return "127.0.0.1:4001", nil
	case "10.0.0.2:80", "10.0.0.2:10809":
		return "127.0.0.1:4002", nil
	}
	return "", fmt.Errorf("no route to %s", target)
}

func (g gateway) Stats(ctx context.Context, id string) (GatewayStats, error) {
	return GatewayStats{BytesOffered: 3 << 30, BytesOnWire: 1 << 30}, g.w.call("gw.Stats")
}

func (g gateway) Stop(ctx context.Context, id string) error {
	if err := g.w.call("gw.Stop"); err != nil {
		return err
	}
	g.w.mu.Lock()
	g.w.gatewayUp = false
	g.w.mu.Unlock()
	return nil
}

type storage struct{ w *world }

func (s storage) PrepareReceiver(ctx context.Context, spec ReceiverSpec) (ReceiverInfo, error) {
	if err := s.w.call("st.PrepareReceiver"); err != nil {
		return ReceiverInfo{}, err
	}
	if spec.ReplicaVDI == "" || spec.Disk.VDIUUID != spec.Key.DiskID {
		return ReceiverInfo{}, fmt.Errorf("bad receiver spec %+v", spec)
	}
	return ReceiverInfo{Address: "10.0.0.2:10809", Endpoint: []byte("ep-" + spec.Key.DiskID), State: []byte("rstate-" + spec.Key.DiskID)}, nil
}

func (s storage) PrepareSender(ctx context.Context, spec SenderSpec) ([]byte, error) {
	if err := s.w.call("st.PrepareSender"); err != nil {
		return nil, err
	}
	if string(spec.Peer.Endpoint) != "ep-"+spec.Key.DiskID || spec.Peer.Address != "127.0.0.1:4002" {
		return nil, fmt.Errorf("sender got peer %+v", spec.Peer)
	}
	return []byte("sstate-" + spec.Key.DiskID), nil
}

func (s storage) SyncRound(ctx context.Context, spec SyncSpec) (SyncResult, error) {
	if err := s.w.call("st.SyncRound"); err != nil {
		return SyncResult{}, err
	}
	s.w.mu.Lock()
	if !s.w.agentsUp {
		s.w.mu.Unlock()
		return SyncResult{}, errors.New("agents not running")
	}
	if spec.Full == (spec.Round != 0) || (spec.Round > 0 && len(spec.Bitmap) == 0) || spec.SnapshotContentID == "" {
		s.w.mu.Unlock()
		return SyncResult{}, fmt.Errorf("bad sync spec %+v", spec)
	}
	s.w.syncs[spec.Key] = &fakeSync{spec: spec, state: syncRunning}
	fail := s.w.SyncFail != nil && s.w.SyncFail(spec)
	block := s.w.SyncBlock != nil && s.w.SyncBlock(spec)
	s.w.mu.Unlock()
	if block {
		<-ctx.Done()
		return SyncResult{}, ctx.Err()
	}
	select { // a little work, interruptible
	case <-ctx.Done():
		return SyncResult{}, ctx.Err()
	case <-time.After(2 * time.Millisecond):
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	if fail {
		s.w.syncs[spec.Key].state = syncFailed
		return SyncResult{}, errors.New("injected failure")
	}
	s.w.syncs[spec.Key].state = syncDone
	s.w.applied[spec.Key] = append(s.w.applied[spec.Key], spec.Round)
	return SyncResult{BytesToCopy: 100, BytesCopied: 100, BytesOnWire: 50, State: []byte(fmt.Sprintf("sstate-%d", spec.Round))}, nil
}

func (s storage) SyncStatus(ctx context.Context, key DiskKey) (SyncStatus, error) {
	if err := s.w.call("st.SyncStatus"); err != nil {
		return SyncStatus{}, err
	}
	s.w.mu.Lock()
	defer s.w.mu.Unlock()
	f, ok := s.w.syncs[key]
	if !ok {
		return SyncStatus{}, fmt.Errorf("disk %s: %w", key.DiskID, ErrNotFound)
	}
	return SyncStatus{Round: f.spec.Round, BytesToCopy: 200, BytesCopied: 100, BytesOnWire: 50}, nil
}

func (s storage) Finalize(ctx context.Context, key DiskKey) ([]byte, error) {
	if err := s.w.call("st.Finalize"); err != nil {
		return nil, err
	}
	return []byte("finalized"), nil
}

func (s storage) RecoverReceiver(ctx context.Context, key DiskKey, state []byte) (ReceiverInfo, error) {
	if err := s.w.call("st.RecoverReceiver"); err != nil {
		return ReceiverInfo{}, err
	}
	if len(state) == 0 {
		return ReceiverInfo{}, errors.New("recover without state")
	}
	return ReceiverInfo{Address: "10.0.0.2:10809", Endpoint: []byte("ep-" + key.DiskID)}, nil
}

func (s storage) RecoverSender(ctx context.Context, key DiskKey, state []byte, peer Peer) error {
	if err := s.w.call("st.RecoverSender"); err != nil {
		return err
	}
	if len(state) == 0 || peer.Address == "" {
		return fmt.Errorf("recover sender without state or peer (%q, %+v)", state, peer)
	}
	return nil
}

func (s storage) Abort(ctx context.Context, key DiskKey) error { return s.w.call("st.Abort") }

func (s storage) Cleanup(ctx context.Context, key DiskKey, rs, ss []byte) error {
	if err := s.w.call("st.Cleanup"); err != nil {
		return err
	}
	if len(rs) == 0 || len(ss) == 0 {
		return errors.New("cleanup without states")
	}
	s.w.mu.Lock()
	s.w.storageClosed[key] = true
	s.w.mu.Unlock()
	return nil
}

type network struct{ w *world }

func (n network) set(m string, f func()) error {
	if err := n.w.call(m); err != nil {
		return err
	}
	n.w.mu.Lock()
	f()
	n.w.mu.Unlock()
	return nil
}

func (n network) Prepare(ctx context.Context, spec NetSpec) ([]byte, error) {
	return []byte("net"), n.set("net.Prepare", func() { n.w.netPrepared = true })
}

func (n network) Recover(ctx context.Context, spec NetSpec) ([]byte, error) {
	if string(spec.State) == "" {
		return nil, errors.New("recover without state")
	}
	return nil, n.set("net.Recover", func() {})
}

func (n network) Activate(ctx context.Context, spec NetSpec) ([]byte, error) {
	if string(spec.State) != "net" {
		return nil, errors.New("activate without the prepare state")
	}
	return []byte("net-active"), n.set("net.Activate", func() { n.w.netActive = true })
}

func (n network) Release(ctx context.Context, spec NetSpec) ([]byte, error) {
	if string(spec.State) != "net-active" {
		return nil, errors.New("release without the activate state")
	}
	return nil, n.set("net.Release", func() { n.w.netReleased = true })
}

func (n network) Cleanup(ctx context.Context, spec NetSpec) error {
	return n.set("net.Cleanup", func() { n.w.netCleaned = true })
}

type catalog struct{ w *world }

func (c catalog) Installed(ctx context.Context) (Installed, error) {
	return c.w.installed, c.w.call("catalog.Installed")
}

type throttle struct{ w *world }

func (t throttle) ThrottleGuest(ctx context.Context, vm string, percent int, prev *ThrottleState) (ThrottleState, error) {
	if err := t.w.call("throttle"); err != nil {
		return ThrottleState{}, err
	}
	t.w.mu.Lock()
	t.w.throttle = percent
	t.w.throttleSeen = append(t.w.throttleSeen, percent)
	t.w.mu.Unlock()
	st := ThrottleState{Host: "OpaqueRef:host-a", Domid: 7, VCPUs: 2, Scheduler: "credit", PrevCap: 50, Percent: percent, Cap: 2 * int64(100-percent)}
	if prev != nil {
		st.PrevCap = prev.PrevCap
	}
	return st, nil
}

func (t throttle) ReadThrottle(ctx context.Context, vm string) (ThrottleState, error) {
	if err := t.w.call("throttle.read"); err != nil {
		return ThrottleState{}, err
	}
	return ThrottleState{Host: "OpaqueRef:host-a", Domid: 7, VCPUs: 2, Scheduler: "credit", PrevCap: 50, Cap: 50}, nil
}

func (t throttle) CheckThrottle(ctx context.Context, vm string) error {
	return t.w.call("throttle.check")
}

func (t throttle) ReleaseThrottle(ctx context.Context, vm string, st ThrottleState) error {
	if err := t.w.call("throttle.release"); err != nil {
		return err
	}
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	if st.PrevCap != 50 {
		return fmt.Errorf("release with prev cap %d, want the original 50", st.PrevCap)
	}
	t.w.throttle = 0
	t.w.released++
	return nil
}

type integrity struct{ ok bool }

func (i integrity) Check(ctx context.Context, req IntegrityRequest) (bool, error) { return i.ok, nil }

// fakeClock advances 100 ms per reading.
type fakeClock struct{ n atomic.Int64 }

func (c *fakeClock) Now() time.Time {
	return time.Unix(1_800_000_000, 0).Add(time.Duration(c.n.Add(1)) * 100 * time.Millisecond)
}

// hookStore wraps a Store: after each successful save it calls after(n, cp);
// a non-nil error from after is returned (the checkpoint is persisted).
type hookStore struct {
	Store
	n      int
	after  func(n int, c *Checkpoint) error
	before func(c *Checkpoint) error // an error here means: not persisted
}

var errCrash = errors.New("simulated controller crash")

func (h *hookStore) Save(ctx context.Context, c *Checkpoint) error {
	if h.before != nil {
		if err := h.before(c); err != nil {
			return err
		}
	}
	if err := h.Store.Save(ctx, c); err != nil {
		return err
	}
	h.n++
	if h.after != nil {
		return h.after(h.n, c)
	}
	return nil
}

func newEngine(t *testing.T, w *world, st Store) *Engine {
	t.Helper()
	return newEngineLog(t, w, st, testutil.Logger(t))
}

func newEngineLog(t *testing.T, w *world, st Store, log hclog.Logger) *Engine {
	t.Helper()
	clk := &fakeClock{}
	e, err := New(Deps{
		Source: srcPool{w}, Dest: dstPool{w}, Tasks: tasks{w}, Storage: storage{w}, Network: network{w},
		Gateway: gateway{w}, Agents: agents{w}, Catalog: catalog{w}, Store: st,
		Throttle: throttle{w}, Integrity: integrity{ok: true},
		Logger: log, Now: clk.Now, PollInterval: time.Millisecond,
	})
	require.NoError(t, err)
	return e
}

func testRequest() Request {
	bw := int64(0)
	_ = bw
	target := time.Millisecond
	net := "l2tunnel"
	return Request{
		MigrationID: "wm-test", VMUUID: "vm-uuid-1",
		NetworkMap: map[string]string{"OpaqueRef:srcnet": "OpaqueRef:dstnet"},
		Link:       Link{BandwidthBytesPerSec: 1_000_000_000, RTT: 50 * time.Millisecond},
		Overrides:  Overrides{DowntimeTarget: &target, Network: &net},
	}
}

func (w *world) findVDIs(side string, match map[string]string) map[string]string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := map[string]string{}
	for ref, v := range w.vdis {
		if v.destroyed || v.side != side {
			continue
		}
		ok := true
		for k, x := range match {
			if v.otherConfig[k] != x {
				ok = false
			}
		}
		if ok {
			out[ref] = v.uuid
		}
	}
	return out
}

func (s srcPool) FindVDIs(ctx context.Context, match map[string]string) (map[string]string, error) {
	return s.w.findVDIs("src", match), s.w.call("src.FindVDIs")
}

func (d dstPool) FindVDIs(ctx context.Context, match map[string]string) (map[string]string, error) {
	return d.w.findVDIs("dst", match), d.w.call("dst.FindVDIs")
}

func (t tasks) FindPendingTasks(ctx context.Context, desc string) ([]string, error) {
	if err := t.w.call("task.Find"); err != nil {
		return nil, err
	}
	t.w.mu.Lock()
	defer t.w.mu.Unlock()
	var out []string
	for ref, d := range t.w.taskDesc {
		if r, ok := t.w.tasks[ref]; ok && d == desc && r.Status == TaskPending { // destroyed tasks are gone
			out = append(out, ref)
		}
	}
	return out, nil
}

var (
	_ VDIFinder  = srcPool{}
	_ VDIFinder  = dstPool{}
	_ TaskFinder = tasks{}
)
