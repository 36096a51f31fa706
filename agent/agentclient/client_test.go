package agentclient

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan/wanemu"
)

// pair is a client with a running agent pair, a gateway session across an
// emulated WAN link, and the filecopy backend launched in both agents.
type pair struct {
	c        *Client
	l        *inProcLauncher
	launcher Launcher // the client's launcher: l, or one wrapping it
	link     *wanemu.Link
	fx       *fixture
	agentDir string
	stateDir string
	id       string
	spec     engine.AgentSpec
}

func newPair(t *testing.T, size int64, linkBits int64) *pair {
	t.Helper()
	return newPairWith(t, size, linkBits, nil, nil)
}

// newPairWith is newPair with the client's launcher wrapping the in-process
// one (wrap nil: none) and its config adjusted by tune (nil: none).
func newPairWith(t *testing.T, size int64, linkBits int64, wrap func(*inProcLauncher) Launcher, tune func(*Config)) *pair {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p := &pair{l: newInProc(t), fx: newFixture(t, size), agentDir: t.TempDir(), stateDir: t.TempDir(), id: "mig-1"}
	p.launcher = p.l
	if wrap != nil {
		p.launcher = wrap(p.l)
	}
	cfg := p.config(t)
	if tune != nil {
		tune(&cfg)
	}
	var err error
	p.c, err = New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.c.Close() })
	p.spec = engine.AgentSpec{MigrationID: p.id, SourceHost: "OpaqueRef:h1", DestHost: "OpaqueRef:h2", StorageBackend: "filecopy", NetworkBackend: "none"}
	require.NoError(t, p.c.Start(ctx, p.spec))
	require.Equal(t, 2, p.l.count())

	listen := freeAddr(t)
	p.link, err = wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: listen, RTT: 10 * time.Millisecond, Bandwidth: linkBits, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	t.Cleanup(func() { _ = p.link.Close() })
	gs := engine.GatewaySpec{MigrationID: p.id, Listen: listen, Advertise: p.link.Addr(), Streams: 2, Compression: "zstd"}
	require.NoError(t, p.c.Gateway().Start(ctx, gs))
	require.NoError(t, p.c.Gateway().Start(ctx, gs), "Gateway.Start is idempotent")
	return p
}

func (p *pair) config(t *testing.T) Config {
	return Config{Launcher: p.launcher, StateDir: p.stateDir, AgentStateDir: p.agentDir, StorageConfig: p.fx.config(t),
		UUIDOf: uuidOf, IdleTimeout: time.Minute, Logger: testutil.Logger(t),
		SourceXAPI: func(context.Context, string) (contract.XAPIAccess, error) {
			return contract.XAPIAccess{URL: "https://source", Session: "OpaqueRef:s1"}, nil
		}}
}

func (p *pair) key() engine.DiskKey { return engine.DiskKey{MigrationID: p.id, DiskID: "vdi-1"} }

// prepare prepares receiver and sender through the gateway like the engine.
func (p *pair) prepare(t *testing.T, ctx context.Context) (engine.ReceiverInfo, []byte, string) {
	t.Helper()
	st := p.c.Storage()
	info, err := st.PrepareReceiver(ctx, engine.ReceiverSpec{Key: p.key(), Backend: "filecopy", Disk: testDisk(p.fx.size),
		ReplicaVDI: "OpaqueRef:replica", ReplicaUUID: "replica-1", DestSR: "OpaqueRef:dsr"})
	require.NoError(t, err)
	require.NotEmpty(t, info.Address)
	require.NotEmpty(t, info.State)
	local, err := p.c.Gateway().Forward(ctx, p.id, info.Address)
	require.NoError(t, err)
	again, err := p.c.Gateway().Forward(ctx, p.id, info.Address)
	require.NoError(t, err)
	require.Equal(t, local, again, "Forward is idempotent")
	sstate, err := st.PrepareSender(ctx, engine.SenderSpec{Key: p.key(), Backend: "filecopy", Disk: testDisk(p.fx.size),
		Peer: engine.Peer{Address: local, Endpoint: info.Endpoint}, Streams: 2})
	require.NoError(t, err)
	return info, sstate, local
}

func (p *pair) replica(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile(replicaPath(t, filepath.Join(p.agentDir, p.id, "destination"), "replica-1"))
	require.NoError(t, err)
	return b
}

func TestRoundsThroughGateway(t *testing.T) {
	const size = 4 << 20
	p := newPair(t, size, 200e6)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st := p.c.Storage()
	info, sstate, _ := p.prepare(t, ctx)

	img0, _ := p.fx.writeSnapshot(t, 0, nil)
	res, err := st.SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true, BlockSize: contract.DefaultBlockSize})
	require.NoError(t, err)
	assert.Equal(t, int64(size), res.BytesToCopy)
	assert.Equal(t, int64(size), res.BytesCopied)
	require.NotEmpty(t, res.State)
	assert.Equal(t, sum(img0), sum(p.replica(t)))

	img1, bitmap := p.fx.writeSnapshot(t, 1, []int{1, 7, 30, 63})
	res, err = st.SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 1, Snapshot: "OpaqueRef:snap-1", Bitmap: bitmap, BlockSize: contract.DefaultBlockSize})
	require.NoError(t, err)
	assert.Equal(t, int64(4*contract.DefaultBlockSize), res.BytesToCopy)
	sst, err := st.SyncStatus(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, 1, sst.Round)

	rstate, err := st.Finalize(ctx, p.key())
	require.NoError(t, err)
	require.NotEmpty(t, rstate)
	assert.Equal(t, sum(img1), sum(p.replica(t)), "replica equals the last snapshot")

	gst, err := p.c.Gateway().Stats(ctx, p.id)
	require.NoError(t, err)
	assert.Greater(t, gst.BytesOffered, int64(size*3/4), "the round's payload crossed the gateway")
	assert.Greater(t, gst.BytesOnWire, int64(0))
	assert.Greater(t, p.link.Counters().Upstream, int64(size/2), "and the emulated WAN link")

	require.NoError(t, st.Cleanup(ctx, p.key(), rstate, res.State))
	require.NoError(t, st.Cleanup(ctx, p.key(), rstate, res.State), "Cleanup is idempotent")
	_, err = st.SyncStatus(ctx, p.key())
	require.ErrorIs(t, err, contract.ErrNotFound)
	_ = info
	_ = sstate

	require.NoError(t, p.c.Gateway().Stop(ctx, p.id))
	require.NoError(t, p.c.Stop(ctx, p.id))
	require.NoError(t, p.c.Stop(ctx, p.id), "Stop is idempotent")
	_, err = os.Stat(filepath.Join(p.stateDir, "agents", p.id+".json"))
	assert.ErrorIs(t, err, os.ErrNotExist, "persisted agent state removed after Stop")
}

func TestForwardHTTP(t *testing.T) {
	p := newPair(t, 1<<20, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		_, _ = w.Write(append([]byte("dest saw "+r.URL.Path+" "), body...))
	}))
	defer srv.Close()
	target := srv.Listener.Addr().String()

	local, err := p.c.Gateway().Forward(ctx, p.id, target)
	require.NoError(t, err)
	require.NotEqual(t, target, local)
	hc := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := hc.Post("http://"+local+"/migrate/vm", "text/plain", stringsReader("memory stream"))
	require.NoError(t, err)
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, "dest saw /migrate/vm memory stream", string(body))

	require.NoError(t, p.c.Gateway().SetRateLimit(ctx, p.id, 5e6))
	detail, err := p.c.Gateway().Detail(ctx, p.id)
	require.NoError(t, err)
	for _, role := range roles {
		assert.Equal(t, int64(5e6), detail[role].RateLimit, role)
		assert.Equal(t, 1, detail[role].Sessions, role)
		assert.Positive(t, detail[role].BytesOnWire, role)
	}

	// A target the controller did not allow at the destination is refused
	// there, even if the source agent is asked to forward it.
	other := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("secret")) }))
	defer other.Close()
	fr, err := callRole[agent.GatewayForwardRequest, agent.GatewayForwardResponse](ctx, p.c, p.id, contract.RoleSource, agent.MethodGatewayForward,
		agent.GatewayForwardRequest{Target: other.Listener.Addr().String()})
	require.NoError(t, err)
	resp, err = hc.Get("http://" + fr.Addr + "/")
	if err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		assert.NotEqual(t, "secret", string(b))
		t.Fatalf("request to a target that was not allowed succeeded: %d %q", resp.StatusCode, b)
	}
}

func TestLinkCutMidRound(t *testing.T) {
	const size = 12 << 20
	p := newPair(t, size, 40e6) // ~2.5 s for the round: time for a cut in the middle
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	st := p.c.Storage()
	p.prepare(t, ctx)
	img0, _ := p.fx.writeSnapshot(t, 0, nil)

	type result struct {
		res engine.SyncResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		r, err := st.SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
		done <- result{r, err}
	}()
	require.Eventually(t, func() bool {
		s, err := st.SyncStatus(ctx, p.key())
		return err == nil && s.BytesCopied > size/8
	}, 30*time.Second, 20*time.Millisecond, "round did not start")
	require.Less(t, p.link.Counters().Upstream, int64(size), "the round's data is still crossing the link when it is cut")
	p.link.Cut()
	time.Sleep(700 * time.Millisecond)
	require.NoError(t, p.link.Restore())

	r := <-done
	require.NoError(t, r.err)
	assert.Equal(t, int64(size), r.res.BytesCopied)
	_, err := st.Finalize(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, sum(img0), sum(p.replica(t)), "replica correct after the cut")
	assert.GreaterOrEqual(t, p.link.Counters().Cuts, 1)
}

func TestCancelSyncRound(t *testing.T) {
	const size = 8 << 20
	p := newPair(t, size, 8e6) // slow: the round takes ~8 s
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	st := p.c.Storage()
	p.prepare(t, ctx)
	p.fx.writeSnapshot(t, 0, nil)

	rctx, rcancel := context.WithCancel(ctx)
	errc := make(chan error, 1)
	go func() {
		_, err := st.SyncRound(rctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
		errc <- err
	}()
	require.Eventually(t, func() bool {
		s, err := st.SyncStatus(ctx, p.key())
		return err == nil && s.BytesCopied > 0
	}, 30*time.Second, 20*time.Millisecond)
	rcancel()
	select {
	case err := <-errc:
		require.ErrorIs(t, err, contract.ErrCancelled)
	case <-time.After(15 * time.Second):
		t.Fatal("cancelled SyncRound did not return")
	}
	// The backend is not left "syncing": the agent cancelled the call.
	require.Eventually(t, func() bool {
		s, err := callRole[contract.StatusRequest, contract.StorageStatus](ctx, p.c, p.id, contract.RoleSource, agent.MethodStorageStatus,
			contract.StatusRequest{Handle: "sou-" + p.id + "-vdi-1"})
		return err == nil && s.State != contract.StateSyncing
	}, 10*time.Second, 20*time.Millisecond)
}

func TestControllerRestartReattaches(t *testing.T) {
	const size = 1 << 20
	p := newPair(t, size, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	info, sstate, local := p.prepare(t, ctx)
	img0, _ := p.fx.writeSnapshot(t, 0, nil)

	// The controller "crashes": a new client from the same state dir.
	require.NoError(t, p.c.Close())
	c2, err := New(p.config(t))
	require.NoError(t, err)
	defer c2.Close()
	require.NoError(t, c2.Start(ctx, p.spec))
	assert.Equal(t, 2, p.l.count(), "re-attached with Hello, no second launch")
	require.NoError(t, c2.Gateway().Start(ctx, engine.GatewaySpec{MigrationID: p.id, Advertise: p.link.Addr(), Streams: 2}))

	// The engine re-binds the handles from its checkpointed states.
	_, err = c2.Storage().SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
	require.ErrorIs(t, err, contract.ErrNotFound, "a new client knows no handles before Recover")
	rinfo, err := c2.Storage().RecoverReceiver(ctx, p.key(), info.State)
	require.NoError(t, err)
	assert.Equal(t, info.Address, rinfo.Address)
	require.NoError(t, c2.Storage().RecoverSender(ctx, p.key(), sstate, engine.Peer{Address: local, Endpoint: rinfo.Endpoint}))
	res, err := c2.Storage().SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
	require.NoError(t, err)
	assert.Equal(t, int64(size), res.BytesCopied)
	_, err = c2.Storage().Finalize(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, sum(img0), sum(p.replica(t)))
	require.NoError(t, c2.Stop(ctx, p.id))
}

func TestBackendCrashRelaunch(t *testing.T) {
	const size = 4 << 20
	p := newPair(t, size, 16e6) // ~2 s for the round
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p.prepare(t, ctx)
	img0, _ := p.fx.writeSnapshot(t, 0, nil)

	lr, err := callRole[agent.LaunchRequest, agent.LaunchResponse](ctx, p.c, p.id, contract.RoleSource, agent.MethodLaunchStorage,
		agent.LaunchRequest{Name: "filecopy", Config: p.fx.config(t)["filecopy"]})
	require.NoError(t, err)
	require.True(t, lr.Existing)
	require.Positive(t, lr.PID)

	st := p.c.Storage()
	errc := make(chan error, 1)
	go func() {
		_, err := st.SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
		errc <- err
	}()
	require.Eventually(t, func() bool {
		s, err := st.SyncStatus(ctx, p.key())
		return err == nil && s.BytesCopied > 0
	}, 30*time.Second, 20*time.Millisecond)
	proc, err := os.FindProcess(lr.PID)
	require.NoError(t, err)
	require.NoError(t, proc.Kill())
	err = <-errc
	require.ErrorIs(t, err, contract.ErrPluginExited, "the round in flight fails clearly")
	assert.Contains(t, err.Error(), "relaunched")

	// The next call relaunches the backend and recovers the handle.
	res, err := st.SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
	require.NoError(t, err)
	assert.Equal(t, int64(size), res.BytesCopied)
	_, err = st.Finalize(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, sum(img0), sum(p.replica(t)))
	lr2, err := callRole[agent.LaunchRequest, agent.LaunchResponse](ctx, p.c, p.id, contract.RoleSource, agent.MethodLaunchStorage,
		agent.LaunchRequest{Name: "filecopy"})
	require.NoError(t, err)
	assert.NotEqual(t, lr.PID, lr2.PID)
}

func TestNotStarted(t *testing.T) {
	c, err := New(Config{Launcher: newInProc(t), StateDir: t.TempDir()})
	require.NoError(t, err)
	defer c.Close()
	ctx := context.Background()
	_, err = c.Storage().SyncStatus(ctx, engine.DiskKey{MigrationID: "nope", DiskID: "d"})
	require.ErrorIs(t, err, ErrNotStarted)
	require.NoError(t, c.Stop(ctx, "nope"))
	require.NoError(t, c.Gateway().Stop(ctx, "nope"))
	err = c.Start(ctx, engine.AgentSpec{MigrationID: "../x"})
	require.ErrorIs(t, err, contract.ErrInvalidArgument)
	_, err = New(Config{})
	require.Error(t, err)
	require.True(t, errors.Is(err, contract.ErrInvalidArgument))
}

func TestHeartbeatsThenIdleStop(t *testing.T) {
	l := newInProc(t)
	fx := newFixture(t, 1<<20)
	stateDir := t.TempDir()
	cfg := Config{Launcher: l, StateDir: stateDir, StorageConfig: fx.config(t), IdleTimeout: 600 * time.Millisecond, Logger: testutil.Logger(t)}
	c, err := New(cfg)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := engine.AgentSpec{MigrationID: "mig-idle", StorageBackend: "filecopy"}
	require.NoError(t, c.Start(ctx, spec))

	// The client's heartbeats keep the agents alive well past their idle timeout.
	time.Sleep(2 * time.Second)
	require.NoError(t, c.Start(ctx, spec))
	assert.Equal(t, 2, l.count(), "agents were still alive: re-attached, not relaunched")

	// Once the controller is gone, the agents stop by themselves.
	require.NoError(t, c.Close())
	l.mu.Lock()
	var done []chan struct{}
	for _, r := range l.agents {
		done = append(done, r.done)
	}
	l.mu.Unlock()
	require.Len(t, done, 2)
	for _, d := range done {
		select {
		case <-d:
		case <-time.After(15 * time.Second):
			t.Fatal("agent did not stop after its controller went away")
		}
	}

	// A new controller finds them gone and launches new ones.
	c2, err := New(cfg)
	require.NoError(t, err)
	defer c2.Close()
	require.NoError(t, c2.Start(ctx, spec))
	assert.Equal(t, 4, l.count())
	require.NoError(t, c2.Stop(ctx, spec.MigrationID))
}

func TestAgentEnvDropsCredentials(t *testing.T) {
	got := agentEnv([]string{"PATH=/bin", "WANMOTION_FROM_PASSWORD=x", "WANMOTION_PLUGIN_DIR=/p", "WANMOTION_SESSION=s", "DB_PASSWORD=y", "HOME=/root"})
	assert.Equal(t, []string{"PATH=/bin", "WANMOTION_PLUGIN_DIR=/p", "HOME=/root"}, got)
}

// TestControllerKilledMidRound drops the controller's connections in the
// middle of a round without any Cancel (as a killed process does); a new
// client re-attaches and repeats the round, which must not collide with
// the orphaned one ("a round is already running").
func TestControllerKilledMidRound(t *testing.T) {
	const size = 4 << 20
	p := newPair(t, size, 16e6) // ~2 s for the round
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	info, sstate, local := p.prepare(t, ctx)
	img0, _ := p.fx.writeSnapshot(t, 0, nil)

	errc := make(chan error, 1)
	go func() {
		_, err := p.c.Storage().SyncRound(context.Background(), engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
		errc <- err
	}()
	require.Eventually(t, func() bool { return p.link.Counters().Upstream > size/8 }, 30*time.Second, 10*time.Millisecond)
	require.NoError(t, p.c.Close()) // connections gone, no Cancel sent
	require.Error(t, <-errc)

	c2, err := New(p.config(t))
	require.NoError(t, err)
	defer c2.Close()
	require.NoError(t, c2.Start(ctx, p.spec))
	assert.Equal(t, 2, p.l.count())
	rinfo, err := c2.Storage().RecoverReceiver(ctx, p.key(), info.State)
	require.NoError(t, err)
	require.Equal(t, info.Address, rinfo.Address)
	require.NoError(t, c2.Storage().RecoverSender(ctx, p.key(), sstate, engine.Peer{Address: local, Endpoint: rinfo.Endpoint}))
	res, err := c2.Storage().SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
	require.NoError(t, err)
	assert.Equal(t, int64(size), res.BytesCopied)
	_, err = c2.Storage().Finalize(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, sum(img0), sum(p.replica(t)))
}

// TestDestinationAgentLostMidRound: the round runs on the source agent; when
// the destination agent dies meanwhile, SyncRound must fail soon with an
// "unavailable" error naming it (so the engine's retry re-launches it),
// not wait for the source's own stall timeouts.
func TestDestinationAgentLostMidRound(t *testing.T) {
	const size = 8 << 20
	p := newPair(t, size, 8e6) // slow: the round takes ~8 s
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// a client with a short peer watch drives the same agents
	cfg := p.config(t)
	cfg.PeerWatch = 200 * time.Millisecond
	c, err := New(cfg)
	require.NoError(t, err)
	defer c.Close()
	// the pair's first client stops heartbeating before it is replaced:
	// its Cleanup would close only the replacement.
	require.NoError(t, p.c.Close())
	p.c = c
	require.NoError(t, c.Start(ctx, p.spec))
	require.Equal(t, 2, p.l.count(), "re-attached, not relaunched")
	st := c.Storage()
	p.prepare(t, ctx)
	p.fx.writeSnapshot(t, 0, nil)

	errc := make(chan error, 1)
	go func() {
		_, err := st.SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
		errc <- err
	}()
	require.Eventually(t, func() bool {
		s, err := st.SyncStatus(ctx, p.key())
		return err == nil && s.BytesCopied > 0
	}, 30*time.Second, 20*time.Millisecond)
	// The destination site goes dark (as with a SIGKILLed agent whose
	// gateway connections the source takes for a link outage it should
	// ride out), and its agent is gone.
	p.link.Blackhole()
	require.NoError(t, p.l.Stop(ctx, AgentLaunchSpec{MigrationID: p.id, Role: contract.RoleDestination}))
	select {
	case err := <-errc:
		require.Error(t, err)
		assert.ErrorIs(t, err, contract.ErrUnavailable)
		assert.Contains(t, err.Error(), "destination agent")
	case <-time.After(20 * time.Second):
		t.Fatal("SyncRound did not notice the lost destination agent")
	}
}

// TestDestinationBackendLostMidRound: the destination agent's storage
// backend (the receiver) dies while a round runs on the source. SyncRound
// fails soon with an error matching contract.ErrPluginExited (the agent
// relaunched the backend, whose receiver may listen elsewhere), and the
// engine's re-attach (recover the receiver, forward its address again,
// recover the sender) lets the repeated round complete.
func TestDestinationBackendLostMidRound(t *testing.T) {
	const size = 8 << 20
	p := newPair(t, size, 8e6) // slow: the round takes ~8 s
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg := p.config(t)
	cfg.PeerWatch = 200 * time.Millisecond
	c, err := New(cfg)
	require.NoError(t, err)
	defer c.Close()
	// the pair's first client stops heartbeating before it is replaced:
	// its Cleanup would close only the replacement.
	require.NoError(t, p.c.Close())
	p.c = c
	require.NoError(t, c.Start(ctx, p.spec))
	st := c.Storage()
	info, sstate, _ := p.prepare(t, ctx)
	img0, _ := p.fx.writeSnapshot(t, 0, nil)
	spec := engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true}

	errc := make(chan error, 1)
	go func() {
		_, err := st.SyncRound(ctx, spec)
		errc <- err
	}()
	require.Eventually(t, func() bool {
		s, err := st.SyncStatus(ctx, p.key())
		return err == nil && s.BytesCopied > 0
	}, 30*time.Second, 20*time.Millisecond)
	lr, err := callRole[agent.LaunchRequest, agent.LaunchResponse](ctx, c, p.id, contract.RoleDestination, agent.MethodLaunchStorage,
		agent.LaunchRequest{Name: "filecopy", Config: cfg.StorageConfig["filecopy"]})
	require.NoError(t, err)
	require.True(t, lr.Existing)
	proc, err := os.FindProcess(lr.PID)
	require.NoError(t, err)
	require.NoError(t, proc.Kill())
	select {
	case err := <-errc:
		// filecopy's sender fails by itself on the broken stream
		// (unavailable); the nbd sender keeps reconnecting, and the watch
		// ends the round (plugin exited, TestWatchReceiverSeesBackendRestart)
		require.Error(t, err)
		assert.True(t, errors.Is(err, contract.ErrPluginExited) || errors.Is(err, contract.ErrUnavailable), "error: %v", err)
	case <-time.After(20 * time.Second):
		t.Fatal("SyncRound did not notice the lost destination backend")
	}

	// Re-attach as the engine's retry does, then repeat the round.
	require.NoError(t, c.Start(ctx, p.spec))
	rinfo, err := st.RecoverReceiver(ctx, p.key(), info.State)
	require.NoError(t, err)
	local, err := c.Gateway().Forward(ctx, p.id, rinfo.Address)
	require.NoError(t, err)
	require.NoError(t, st.RecoverSender(ctx, p.key(), sstate, engine.Peer{Address: local, Endpoint: rinfo.Endpoint}))
	p.link.SetBandwidth(0)
	res, err := st.SyncRound(ctx, spec)
	require.NoError(t, err)
	assert.Equal(t, int64(size), res.BytesToCopy)
	_, err = st.Finalize(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, sum(img0), sum(p.replica(t)), "replica correct after the receiver was relaunched")
}

// TestWatchReceiverSeesBackendRestart: the watch SyncRound runs reports a
// destination storage backend that exited (and was relaunched by the
// agent) as plugin-exited, and a stopped destination agent as unavailable.
func TestWatchReceiverSeesBackendRestart(t *testing.T) {
	p := newPair(t, 1<<20, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg := p.config(t)
	cfg.PeerWatch = 100 * time.Millisecond
	c, err := New(cfg)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.Start(ctx, p.spec))
	m, err := c.lookup(p.id, false)
	require.NoError(t, err)
	watch := func() (context.Context, func()) {
		wctx, lost := context.WithCancelCause(ctx)
		stop := c.watchReceiver(wctx, m, "filecopy", lost)
		return wctx, func() { stop(); lost(nil) }
	}

	// a healthy receiver: nothing reported
	wctx, stop := watch()
	time.Sleep(500 * time.Millisecond)
	require.NoError(t, context.Cause(wctx))
	stop()

	lr, err := callRole[agent.LaunchRequest, agent.LaunchResponse](ctx, c, p.id, contract.RoleDestination, agent.MethodLaunchStorage,
		agent.LaunchRequest{Name: "filecopy", Config: cfg.StorageConfig["filecopy"]})
	require.NoError(t, err)
	wctx, stop = watch()
	defer stop()
	time.Sleep(300 * time.Millisecond) // the watch saw the running backend
	proc, err := os.FindProcess(lr.PID)
	require.NoError(t, err)
	require.NoError(t, proc.Kill())
	select {
	case <-wctx.Done():
		assert.ErrorIs(t, context.Cause(wctx), contract.ErrPluginExited)
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not see the backend restart")
	}
	stop()

	require.NoError(t, p.l.Stop(ctx, AgentLaunchSpec{MigrationID: p.id, Role: contract.RoleDestination}))
	wctx, stop = watch()
	defer stop()
	select {
	case <-wctx.Done():
		assert.ErrorIs(t, context.Cause(wctx), contract.ErrUnavailable)
	case <-time.After(10 * time.Second):
		t.Fatal("the watch did not see the lost agent")
	}
}
