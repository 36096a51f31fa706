package agent

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
)

// startAgent runs an agent in-process until the test ends.
func startAgent(t *testing.T, b *Bundle, role contract.Role, idle time.Duration) *Agent {
	t.Helper()
	a, err := New(context.Background(), Config{MigrationID: "mig-1", Role: role, TLS: b.For(role),
		IdleTimeout: idle, StateDir: t.TempDir(), PluginDirs: []string{t.TempDir()}, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(context.Background()) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = a.Stop(ctx)
		<-errc
	})
	return a
}

func dial(t *testing.T, addr string, tc *tls.Config) *Conn {
	t.Helper()
	d := tls.Dialer{Config: tc}
	c, err := d.DialContext(context.Background(), "tcp", addr)
	require.NoError(t, err)
	conn := NewConn(c)
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

func hello(ctx context.Context, c *Conn, role contract.Role) (HelloResponse, error) {
	return Call[HelloRequest, HelloResponse](ctx, c, MethodHello, HelloRequest{Version: ProtocolVersion, MigrationID: "mig-1", Role: role})
}

func TestMutualTLS(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	other, err := NewBundle("mig-other")
	require.NoError(t, err)
	a := startAgent(t, b, contract.RoleDestination, time.Minute)

	good, err := b.Controller.ClientTLS(contract.RoleDestination)
	require.NoError(t, err)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := hello(ctx, dial(t, a.Addr(), good), contract.RoleDestination)
	require.NoError(t, err)
	assert.Equal(t, contract.RoleDestination, resp.Role)
	assert.Equal(t, os.Getpid(), resp.PID)
	assert.Equal(t, time.Minute, resp.IdleTimeout)

	pair := func(certPEM, keyPEM []byte) []tls.Certificate {
		p, err := tls.X509KeyPair(certPEM, keyPEM)
		require.NoError(t, err)
		return []tls.Certificate{p}
	}
	noCert := good.Clone()
	noCert.Certificates = nil
	otherCA := good.Clone()
	otherCA.Certificates = pair(other.Controller.Cert, other.Controller.Key)
	gatewayCert := good.Clone() // right CA, but the source agent's gateway identity
	gatewayCert.Certificates = pair(b.Source.GatewayCert, b.Source.GatewayKey)
	serverCert := good.Clone() // right CA, a server certificate used as client
	serverCert.Certificates = pair(b.Source.Cert, b.Source.Key)

	for _, tc := range []struct {
		name string
		cfg  *tls.Config
	}{{"no client certificate", noCert}, {"controller certificate of another migration", otherCA},
		{"gateway client certificate", gatewayCert}, {"server certificate as client", serverCert}} {
		t.Run(tc.name, func(t *testing.T) {
			d := tls.Dialer{Config: tc.cfg}
			c, err := d.DialContext(ctx, "tcp", a.Addr())
			if err != nil {
				return // refused during the handshake
			}
			conn := NewConn(c)
			defer conn.Close()
			_, err = hello(ctx, conn, contract.RoleDestination)
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrAgentUnreachable)
		})
	}

	t.Run("agent certificate of the other role", func(t *testing.T) {
		wrongRole, err := b.Controller.ClientTLS(contract.RoleSource)
		require.NoError(t, err)
		d := tls.Dialer{Config: wrongRole}
		_, err = d.DialContext(ctx, "tcp", a.Addr())
		require.Error(t, err, "the controller must not accept the destination agent as the source agent")
	})
	t.Run("agent of another migration", func(t *testing.T) {
		tc, err := other.Controller.ClientTLS(contract.RoleDestination)
		require.NoError(t, err)
		d := tls.Dialer{Config: tc}
		_, err = d.DialContext(ctx, "tcp", a.Addr())
		require.Error(t, err)
	})
	t.Run("wrong migration in hello", func(t *testing.T) {
		_, err := Call[HelloRequest, HelloResponse](ctx, dial(t, a.Addr(), good), MethodHello,
			HelloRequest{Version: ProtocolVersion, MigrationID: "mig-2", Role: contract.RoleDestination})
		require.Error(t, err)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument)
	})
}

func TestControllerCA(t *testing.T) {
	// With controller-ca.pem the agent trusts the controller certificates of
	// that CA only.
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	ctl, err := NewBundle("controllers")
	require.NoError(t, err)
	m := b.Destination
	m.ControllerCACert = ctl.CACert
	dir := filepath.Join(t.TempDir(), "tls")
	require.NoError(t, m.WriteDir(dir))
	m, err = ReadDir(dir)
	require.NoError(t, err)
	require.Equal(t, ctl.CACert, m.ControllerCACert)
	a, err := New(context.Background(), Config{MigrationID: "mig-1", Role: contract.RoleDestination, TLS: m, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(context.Background()) }()
	defer func() { _ = a.Stop(context.Background()); <-errc }()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// The controller identity comes from the other CA; the agent is still
	// verified against the migration's CA.
	own, err := b.Controller.ClientTLS(contract.RoleDestination)
	require.NoError(t, err)
	other := own.Clone()
	pair, err := tls.X509KeyPair(ctl.Controller.Cert, ctl.Controller.Key)
	require.NoError(t, err)
	other.Certificates = []tls.Certificate{pair}
	_, err = hello(ctx, dial(t, a.Addr(), other), contract.RoleDestination)
	require.NoError(t, err)
	_, err = hello(ctx, dial(t, a.Addr(), own), contract.RoleDestination)
	require.ErrorIs(t, err, ErrAgentUnreachable, "a controller certificate of the migration CA is no longer enough")
}

func TestIdleTimeoutStopsAgent(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a, err := New(context.Background(), Config{MigrationID: "mig-1", Role: contract.RoleSource, TLS: b.Source,
		IdleTimeout: 300 * time.Millisecond, StateDir: t.TempDir(), Logger: testutil.Logger(t)})
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(context.Background()) }()

	// Heartbeats keep it alive for several idle periods.
	tc, err := b.Controller.ClientTLS(contract.RoleSource)
	require.NoError(t, err)
	conn := dial(t, a.Addr(), tc)
	for i := 0; i < 10; i++ {
		_, err := Call[Empty, Empty](context.Background(), conn, MethodHeartbeat, Empty{})
		require.NoError(t, err)
		time.Sleep(100 * time.Millisecond)
	}
	select {
	case err := <-errc:
		t.Fatalf("agent stopped while heartbeats arrived: %v", err)
	default:
	}
	// Then silence: it stops by itself.
	select {
	case err := <-errc:
		require.ErrorIs(t, err, ErrIdle)
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not stop after the idle timeout")
	}
	_, err = net.DialTimeout("tcp", a.Addr(), time.Second)
	assert.Error(t, err, "control port still open after the stop")
}

func TestStopRPC(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a, err := New(context.Background(), Config{MigrationID: "mig-1", Role: contract.RoleDestination, TLS: b.Destination,
		StateDir: t.TempDir(), Logger: testutil.Logger(t)})
	require.NoError(t, err)
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(context.Background()) }()
	tc, err := b.Controller.ClientTLS(contract.RoleDestination)
	require.NoError(t, err)
	conn := dial(t, a.Addr(), tc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	lr, err := Call[GatewayListenRequest, GatewayListenResponse](ctx, conn, MethodGatewayListen, GatewayListenRequest{})
	require.NoError(t, err)
	_, err = Call[Empty, Empty](ctx, conn, MethodStop, Empty{})
	require.NoError(t, err)
	select {
	case err := <-errc:
		require.NoError(t, err)
	case <-time.After(10 * time.Second):
		t.Fatal("agent did not stop")
	}
	_, err = net.DialTimeout("tcp", lr.Addr, time.Second)
	assert.Error(t, err, "gateway still listening after Stop")
}

func TestCallErrors(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a := startAgent(t, b, contract.RoleSource, time.Minute)
	tc, err := b.Controller.ClientTLS(contract.RoleSource)
	require.NoError(t, err)
	conn := dial(t, a.Addr(), tc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	_, err = Call[contract.StatusRequest, contract.StorageStatus](ctx, conn, MethodStorageStatus, contract.StatusRequest{Handle: "x"})
	require.ErrorIs(t, err, contract.ErrFailedPrecondition, "no backend launched")
	_, err = Call[GatewayListenRequest, GatewayListenResponse](ctx, conn, MethodGatewayListen, GatewayListenRequest{})
	require.ErrorIs(t, err, contract.ErrInvalidArgument, "the source does not listen")
	_, err = Call[GatewayForwardRequest, GatewayForwardResponse](ctx, conn, MethodGatewayForward, GatewayForwardRequest{Target: "127.0.0.1:1"})
	require.ErrorIs(t, err, contract.ErrFailedPrecondition, "forward before dial")
	_, err = Call[LaunchRequest, LaunchResponse](ctx, conn, MethodLaunchStorage, LaunchRequest{Name: "nosuch"})
	require.ErrorIs(t, err, contract.ErrNotFound)
	assert.Contains(t, err.Error(), "nosuch")
	_, err = Call[Empty, Empty](ctx, conn, "NoSuchMethod", Empty{})
	require.ErrorIs(t, err, contract.ErrInternal)
	// The connection still works after errors.
	_, err = Call[Empty, Empty](ctx, conn, MethodHeartbeat, Empty{})
	require.NoError(t, err)
	// A cancelled call returns promptly with ErrCancelled.
	cctx, ccancel := context.WithCancel(ctx)
	ccancel()
	_, err = Call[Empty, Empty](cctx, conn, MethodHeartbeat, Empty{})
	require.ErrorIs(t, err, contract.ErrCancelled)
}

func TestTLSDirPermissions(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	dir := filepath.Join(t.TempDir(), "tls")
	require.NoError(t, b.Source.WriteDir(dir))
	m, err := ReadDir(dir)
	require.NoError(t, err)
	assert.Equal(t, b.Source.Cert, m.Cert)
	assert.Equal(t, b.Source.GatewayKey, m.GatewayKey)
	fi, err := os.Stat(filepath.Join(dir, FileKey))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), fi.Mode().Perm())

	require.NoError(t, os.Chmod(filepath.Join(dir, FileKey), 0o644))
	_, err = ReadDir(dir)
	require.ErrorIs(t, err, ErrBadTLS)
	require.NoError(t, os.Remove(filepath.Join(dir, FileCA)))
	_, err = ReadDir(dir)
	require.ErrorIs(t, err, ErrBadTLS)
}

func TestBundleGatewayCertificates(t *testing.T) {
	// The bundle's gateway certificates really open a wan session.
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := wan.Listen(ctx, "127.0.0.1:0", wan.Config{CertPEM: b.Destination.GatewayCert, KeyPEM: b.Destination.GatewayKey, CAPEM: b.CACert})
	require.NoError(t, err)
	defer l.Close()
	s, err := wan.Dial(ctx, l.Addr().String(), wan.Config{CertPEM: b.Source.GatewayCert, KeyPEM: b.Source.GatewayKey, CAPEM: b.CACert, Streams: 1})
	require.NoError(t, err)
	defer s.Close()
	peer, err := l.Accept(ctx)
	require.NoError(t, err)
	_ = peer.Close()
}

// FuzzServerCodec feeds arbitrary bytes to the agent's request decoder: it
// must fail cleanly, never panic or hang.
func FuzzServerCodec(f *testing.F) {
	var seed bytes.Buffer
	cc := &clientCodec{codec: newCodec(nopCloser{&seed})}
	_ = cc.codec.write(wireHeader{Method: ServiceName + "." + MethodHello, Seq: 1},
		Args[HelloRequest]{Req: HelloRequest{Version: 1, MigrationID: "m", Role: "source"}})
	f.Add(seed.Bytes())
	f.Add([]byte{0x82, 0xa1, 'm', 0xa0, 0xa1, 's', 0x01})
	f.Add([]byte{0xdb, 0xff, 0xff, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, data []byte) {
		c := newCodec(nopCloser{bytes.NewBuffer(data)})
		for i := 0; i < 4; i++ {
			if _, err := c.readHeader(); err != nil {
				return
			}
			var body Args[HelloRequest]
			if err := c.readBody(&body); err != nil {
				return
			}
		}
	})
}

type nopCloser struct {
	rw interface {
		Read([]byte) (int, error)
		Write([]byte) (int, error)
	}
}

func (n nopCloser) Read(p []byte) (int, error)  { return n.rw.Read(p) }
func (n nopCloser) Write(p []byte) (int, error) { return n.rw.Write(p) }
func (n nopCloser) Close() error                { return nil }
