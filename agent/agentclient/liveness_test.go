package agentclient

import (
	"context"
	"runtime"
	"sync"
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
