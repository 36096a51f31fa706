package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
	"github.com/wanmotion/wanmotion/wan/wanemu"
)

// silentListener accepts TCP connections and never answers (a gateway
// peer that hangs in the handshake), so GatewayDial to it stays in flight.
func silentListener(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	var conns []net.Conn
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				for _, c := range conns {
					_ = c.Close()
				}
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		<-done
	})
	return ln.Addr().String()
}

// TestConnLivenessBlackhole: a control connection whose path goes silent
// (no RST, no FIN) fails the waiting call with ErrAgentUnreachable long
// before the call's ctx ends, and says why.
func TestConnLivenessBlackhole(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a := startAgent(t, b, contract.RoleSource, time.Minute)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	link, err := wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: a.Addr(), Logger: testutil.Logger(t)})
	require.NoError(t, err)
	defer link.Close()

	tc, err := b.Controller.ClientTLS(contract.RoleSource)
	require.NoError(t, err)
	nc, err := (&tls.Dialer{Config: tc}).DialContext(ctx, "tcp", link.Addr())
	require.NoError(t, err)
	conn := NewConnOptions(nc, ConnOptions{Liveness: 300 * time.Millisecond})
	defer conn.Close()

	// A healthy connection that stays idle for longer than the liveness
	// bound is not declared dead: nothing was waiting.
	_, err = hello(ctx, conn, contract.RoleSource)
	require.NoError(t, err)
	time.Sleep(600 * time.Millisecond)
	_, err = hello(ctx, conn, contract.RoleSource)
	require.NoError(t, err, "an idle connection is not dead")

	// A long call survives as long as replies (heartbeats) keep arriving:
	// a gateway dial that hangs in the handshake for 4 liveness periods.
	hbDone, hbStop := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(hbDone)
		for {
			select {
			case <-hbStop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			_, _ = Call[HeartbeatRequest, Empty](ctx, conn, MethodHeartbeat, HeartbeatRequest{})
		}
	}()
	dctx, dcancel := context.WithTimeout(ctx, 1200*time.Millisecond)
	_, err = Call[GatewayDialRequest, GatewayDialResponse](dctx, conn, MethodGatewayDial,
		GatewayDialRequest{Addr: silentListener(t), Streams: 1})
	dcancel()
	close(hbStop)
	<-hbDone
	require.Error(t, err, "the dial cannot succeed")
	require.NotErrorIs(t, err, ErrAgentUnreachable, "a busy connection with heartbeats is not declared dead")
	require.NoError(t, conn.Err())

	link.Blackhole()
	_, err = hello(ctx, conn, contract.RoleSource)
	require.Error(t, err)
	require.ErrorIs(t, err, ErrAgentUnreachable)
	require.ErrorIs(t, err, contract.ErrUnavailable)
	assert.NotErrorIs(t, err, contract.ErrCancelled)
	assert.Contains(t, err.Error(), "nothing received from the agent")
	require.NoError(t, ctx.Err(), "the call returned before its ctx ended")
	select {
	case <-conn.Done():
	default:
		t.Fatal("a connection declared dead is not Done")
	}
	require.Error(t, conn.Err())

	// Later calls on the dead connection fail at once; a new connection
	// across the restored path works.
	_, err = hello(ctx, conn, contract.RoleSource)
	require.ErrorIs(t, err, ErrAgentUnreachable)
	require.NoError(t, link.Restore())
	nc2, err := (&tls.Dialer{Config: tc}).DialContext(ctx, "tcp", link.Addr())
	require.NoError(t, err)
	conn2 := NewConnOptions(nc2, ConnOptions{Liveness: 300 * time.Millisecond})
	defer conn2.Close()
	_, err = hello(ctx, conn2, contract.RoleSource)
	require.NoError(t, err)
}

// TestAgentClosesSilentController: a controller that announced a liveness
// bound and then went silent with a call in flight (half-open: its socket
// stays open) has its connection closed by the agent, which cancels the
// call, and the agent's idle timeout then stops it as for a controller
// that disconnected.
func TestAgentClosesSilentController(t *testing.T) {
	before := runtime.NumGoroutine()
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a, err := New(context.Background(), Config{MigrationID: "mig-1", Role: contract.RoleSource, TLS: b.Source,
		IdleTimeout: time.Second, StateDir: t.TempDir(), Logger: testutil.Logger(t)})
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(context.Background()) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = a.Stop(ctx)
	}()

	tc, err := b.Controller.ClientTLS(contract.RoleSource)
	require.NoError(t, err)
	nc, err := (&tls.Dialer{Config: tc}).DialContext(context.Background(), "tcp", a.Addr())
	require.NoError(t, err)
	conn := NewConn(nc) // no client-side liveness: only the agent decides
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err = Call[HeartbeatRequest, Empty](ctx, conn, MethodHeartbeat, HeartbeatRequest{Liveness: 300 * time.Millisecond})
	require.NoError(t, err)
	_, err = Call[HeartbeatRequest, Empty](ctx, conn, MethodHeartbeat, HeartbeatRequest{Liveness: -time.Second})
	require.ErrorIs(t, err, contract.ErrInvalidArgument)

	// A gateway dial that hangs in the handshake stays in flight; the
	// controller sends nothing more.
	_, err = Call[GatewayDialRequest, GatewayDialResponse](ctx, conn, MethodGatewayDial,
		GatewayDialRequest{Addr: silentListener(t), Streams: 1})
	require.Error(t, err)
	require.ErrorIs(t, err, ErrAgentUnreachable, "the agent closed the silent connection (not a reply)")
	require.NoError(t, ctx.Err())
	<-conn.Done()

	select {
	case err := <-errc:
		require.ErrorIs(t, err, ErrIdle, "the agent stops once its controller is gone")
	case <-ctx.Done():
		t.Fatal("agent did not stop after the idle timeout")
	}
	require.NoError(t, conn.Close())
	if !assert.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+2 }, 10*time.Second, 50*time.Millisecond,
		"goroutines left: %d, before %d", runtime.NumGoroutine(), before) {
		buf := make([]byte, 1<<20)
		t.Logf("%s", buf[:runtime.Stack(buf, true)])
	}
}

// TestConnCloseEndsWatch: Close returns after the watch goroutine ended,
// also when the agent closed the connection first.
func TestConnCloseEndsWatch(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a := startAgent(t, b, contract.RoleDestination, time.Minute)
	tc, err := b.Controller.ClientTLS(contract.RoleDestination)
	require.NoError(t, err)
	var before int
	for i := 0; i < 5; i++ {
		if i == 1 { // the agent is serving by now
			time.Sleep(100 * time.Millisecond)
			before = runtime.NumGoroutine()
		}
		nc, err := (&tls.Dialer{Config: tc}).DialContext(context.Background(), "tcp", a.Addr())
		require.NoError(t, err)
		conn := NewConnOptions(nc, ConnOptions{Liveness: time.Second, WriteTimeout: time.Second})
		_, err = hello(context.Background(), conn, contract.RoleDestination)
		require.NoError(t, err)
		require.NoError(t, conn.Close())
		err = conn.Close()
		require.True(t, err == nil || errors.Is(err, net.ErrClosed), "second Close: %v", err)
		<-conn.Done()
	}
	if !assert.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+2 }, 10*time.Second, 50*time.Millisecond,
		"goroutines left: %d, before %d", runtime.NumGoroutine(), before) {
		buf := make([]byte, 1<<20)
		t.Logf("%s", buf[:runtime.Stack(buf, true)])
	}
}

// TestGatewayRetiresEndedSessions: sessions accepted by the destination
// gateway leave its list when they end, and their counters stay in
// GatewayStats (also after GatewayStop).
func TestGatewayRetiresEndedSessions(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a := startAgent(t, b, contract.RoleDestination, time.Minute)
	tc, err := b.Controller.ClientTLS(contract.RoleDestination)
	require.NoError(t, err)
	conn := dial(t, a.Addr(), tc)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	lr, err := Call[GatewayListenRequest, GatewayListenResponse](ctx, conn, MethodGatewayListen, GatewayListenRequest{})
	require.NoError(t, err)
	stats := func() GatewayStatsResponse {
		st, err := Call[Empty, GatewayStatsResponse](ctx, conn, MethodGatewayStats, Empty{})
		require.NoError(t, err)
		return st
	}

	const n = 3
	var received int64
	for i := 0; i < n; i++ {
		s, err := wan.Dial(ctx, lr.Addr, wan.Config{CertPEM: b.Source.GatewayCert, KeyPEM: b.Source.GatewayKey, CAPEM: b.CACert, Streams: 1})
		require.NoError(t, err)
		require.Eventually(t, func() bool { return a.gw.liveSessions() == 1 }, 10*time.Second, 10*time.Millisecond)
		st := stats()
		assert.Equal(t, i+1, st.Sessions)
		assert.Equal(t, 1, st.Connected)
		require.NoError(t, s.Close())
		require.Eventually(t, func() bool { return a.gw.liveSessions() == 0 }, 10*time.Second, 10*time.Millisecond,
			"the ended session leaves the list")
		st = stats()
		assert.Equal(t, i+1, st.Sessions, "an ended session still counts")
		assert.Greater(t, st.BytesReceivedOnWire, received, "its counters (the goodbye it received) are kept")
		assert.Zero(t, st.Connected)
		received = st.BytesReceivedOnWire
	}
	_, err = Call[Empty, Empty](ctx, conn, MethodGatewayStop, Empty{})
	require.NoError(t, err)
	st := stats()
	assert.Equal(t, n, st.Sessions, "counters survive GatewayStop")
	assert.Equal(t, received, st.BytesReceivedOnWire)
}
