package agentclient

import (
	"bytes"
	"context"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan/wanemu"
)

// flagWriter notes whether needle was written to it.
type flagWriter struct {
	needle []byte
	mu     sync.Mutex
	found  bool
}

func (w *flagWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if bytes.Contains(p, w.needle) {
		w.found = true
	}
	return len(p), nil
}

func (w *flagWriter) seen() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.found
}

// linkLauncher launches agents in-process and puts an emulated WAN link
// (which can blackhole) between the controller and each agent's control port.
type linkLauncher struct {
	*inProcLauncher

	mu    sync.Mutex
	links map[contract.Role]*wanemu.Link
}

func (l *linkLauncher) Launch(ctx context.Context, spec AgentLaunchSpec) (string, error) {
	addr, err := l.inProcLauncher.Launch(ctx, spec)
	if err != nil {
		return "", err
	}
	link, err := wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: addr, RTT: 2 * time.Millisecond, Logger: testutil.Logger(l.t)})
	if err != nil {
		return "", err
	}
	l.mu.Lock()
	l.links[spec.Role] = link
	l.mu.Unlock()
	return link.Addr(), nil
}

func (l *linkLauncher) link(role contract.Role) *wanemu.Link {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.links[role]
}

func (l *linkLauncher) closeLinks() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, link := range l.links {
		_ = link.Close()
	}
}

// TestHalfOpenControlConnection: the control path to the source agent goes
// silent (no RST, no FIN). A call waiting on it fails with an error
// wrapping agent.ErrAgentUnreachable within a few heartbeat intervals, not
// at its ctx deadline; when the path comes back the client dials again and
// calls work, with no second launch; nothing leaks.
func TestHalfOpenControlConnection(t *testing.T) {
	before := runtime.NumGoroutine()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	l := &linkLauncher{inProcLauncher: newInProc(t), links: map[contract.Role]*wanemu.Link{}}
	c, err := New(Config{Launcher: l, StateDir: t.TempDir(), AgentStateDir: t.TempDir(), IdleTimeout: time.Minute,
		DialTimeout: 2 * time.Second, HeartbeatInterval: 100 * time.Millisecond, HeartbeatMisses: 3, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	const id = "mig-1"
	require.NoError(t, c.Start(ctx, engine.AgentSpec{MigrationID: id, SourceHost: "OpaqueRef:h1", DestHost: "OpaqueRef:h2", NetworkBackend: "none"}))
	require.Equal(t, 2, l.count())

	hello := func(ctx context.Context, role contract.Role) error {
		_, err := callRole[agent.HelloRequest, agent.HelloResponse](ctx, c, id, role, agent.MethodHello,
			agent.HelloRequest{Version: agent.ProtocolVersion, MigrationID: id, Role: role})
		return err
	}
	require.NoError(t, hello(ctx, contract.RoleSource))
	time.Sleep(500 * time.Millisecond) // several heartbeats on a healthy path: nothing is declared dead
	require.NoError(t, hello(ctx, contract.RoleSource))

	l.link(contract.RoleSource).Blackhole()
	callCtx, callCancel := context.WithTimeout(ctx, 60*time.Second)
	err = hello(callCtx, contract.RoleSource)
	require.Error(t, err)
	require.ErrorIs(t, err, agent.ErrAgentUnreachable)
	assert.NotErrorIs(t, err, contract.ErrCancelled)
	require.NoError(t, callCtx.Err(), "the call failed before its ctx deadline")
	callCancel()
	t.Logf("waiting call failed with: %v", err)

	// The destination, on a healthy path, is unaffected.
	require.NoError(t, hello(ctx, contract.RoleDestination))

	// The path comes back: the next call dials again (heartbeats may have
	// done so already) and works.
	require.NoError(t, l.link(contract.RoleSource).Restore())
	require.Eventually(t, func() bool {
		hctx, hcancel := context.WithTimeout(ctx, 5*time.Second)
		defer hcancel()
		return hello(hctx, contract.RoleSource) == nil
	}, 20*time.Second, 50*time.Millisecond, "calls work again after the path is restored")
	st, err := c.Gateway().Stats(ctx, id)
	require.NoError(t, err)
	assert.Zero(t, st.BytesOffered)
	assert.Equal(t, 2, l.count(), "re-dialled, not re-launched")

	require.NoError(t, c.Stop(ctx, id))
	require.NoError(t, c.Close())
	l.closeLinks()
	if !assert.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+2 }, 10*time.Second, 50*time.Millisecond,
		"goroutines left: %d, before %d", runtime.NumGoroutine(), before) {
		buf := make([]byte, 1<<20)
		t.Logf("%s", buf[:runtime.Stack(buf, true)])
	}
}

// TestSourceControlPathHalfOpenMidRound: the control path to the source
// agent goes silent while a round runs there. SyncRound fails with an
// error wrapping agent.ErrAgentUnreachable within a few heartbeats (its
// ctx has a minute left); the agent, hearing nothing, closes its end and
// cancels the orphaned round; once the path is back the engine's re-attach
// (Start, Recover*) and the repeated round complete, with no new agent.
func TestSourceControlPathHalfOpenMidRound(t *testing.T) {
	const size = 4 << 20
	var ll *linkLauncher
	silent := &flagWriter{needle: []byte("controller connection silent")}
	p := newPairWith(t, size, 16e6, func(in *inProcLauncher) Launcher { // ~2 s for the round
		in.log = hclog.New(&hclog.LoggerOptions{Output: silent, Level: hclog.Warn}) // the agents' warnings
		ll = &linkLauncher{inProcLauncher: in, links: map[contract.Role]*wanemu.Link{}}
		t.Cleanup(ll.closeLinks)
		return ll
	}, func(cfg *Config) {
		cfg.HeartbeatInterval, cfg.HeartbeatMisses, cfg.DialTimeout = 100*time.Millisecond, 3, 2*time.Second
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	info, sstate, local := p.prepare(t, ctx)
	img0, _ := p.fx.writeSnapshot(t, 0, nil)

	errc := make(chan error, 1)
	go func() {
		_, err := p.c.Storage().SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
		errc <- err
	}()
	require.Eventually(t, func() bool { return p.link.Counters().Upstream > size/8 }, 30*time.Second, 10*time.Millisecond)
	ll.link(contract.RoleSource).Blackhole()
	err := <-errc
	require.Error(t, err)
	require.ErrorIs(t, err, agent.ErrAgentUnreachable)
	require.NoError(t, ctx.Err(), "SyncRound failed before its ctx ended")
	t.Logf("round failed with: %v", err)
	require.Eventually(t, silent.seen, 20*time.Second, 10*time.Millisecond,
		"the source agent closes the silent connection by itself (cancelling the orphaned round)")

	require.NoError(t, ll.link(contract.RoleSource).Restore())
	require.NoError(t, p.c.Start(ctx, p.spec))
	assert.Equal(t, 2, p.l.count(), "re-attached, not relaunched")
	rinfo, err := p.c.Storage().RecoverReceiver(ctx, p.key(), info.State)
	require.NoError(t, err)
	require.NoError(t, p.c.Storage().RecoverSender(ctx, p.key(), sstate, engine.Peer{Address: local, Endpoint: rinfo.Endpoint}))
	res, err := p.c.Storage().SyncRound(ctx, engine.SyncSpec{Key: p.key(), Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
	require.NoError(t, err)
	assert.Equal(t, int64(size), res.BytesCopied)
	_, err = p.c.Storage().Finalize(ctx, p.key())
	require.NoError(t, err)
	assert.Equal(t, sum(img0), sum(p.replica(t)))
}
