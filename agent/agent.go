// Package agent is the site agent: `wanmotion agent` runs one per involved
// host and migration (ARCHITECTURE §4). It launches the storage and network
// backends of its role as go-plugin subprocesses, runs its end of the WAN
// gateway, and serves the controller over msgpack-RPC (net/rpc with a
// msgpack codec) on mutual TLS with per-migration certificates.
//
// The agent stops itself when the controller sends Stop or when no call
// (heartbeats included) arrived for its idle timeout; it then closes its
// backends and gateway. See docs/agent.md.
package agent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/rpc"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

// DefaultIdleTimeout is how long an agent lives without hearing from its controller.
const DefaultIdleTimeout = 5 * time.Minute

// Config configures an agent.
type Config struct {
	MigrationID string
	Role        contract.Role
	TLS         Material
	// ControlListen is the control address (default 127.0.0.1:0).
	ControlListen string
	// GatewayListen is the destination gateway's default listen address
	// (used when GatewayListen RPC names none; default 127.0.0.1:0).
	GatewayListen string
	// ForwardHost is the host the source's forward listeners bind (default 127.0.0.1).
	ForwardHost string
	// PluginDirs are searched for backends (host.SearchDirs("") when nil).
	PluginDirs []string
	// PluginEnv is added to the backends' environment (tests only; never credentials).
	PluginEnv []string
	// StateDir is the backends' state directory (Configure.StateDir).
	StateDir string
	// IdleTimeout stops the agent when no call arrived for that long (DefaultIdleTimeout).
	IdleTimeout time.Duration
	Logger      hclog.Logger
}

// ControlKeepAlive is the TCP keepalive of control connections, on the
// agent's accepted connections and the controller's dialled ones: an idle
// connection whose peer vanished is reset by the kernel after about 30 s
// (15 s idle, then 3 probes 5 s apart). It does not cover a connection with
// data in flight (TCP retransmits for many minutes then): the liveness
// checks on both ends do (ConnOptions.Liveness, HeartbeatRequest.Liveness).
var ControlKeepAlive = net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}

// ErrStopped: the agent has stopped.
var ErrStopped = errors.New("agent stopped")

// Agent is one running site agent.
type Agent struct {
	cfg     Config
	log     hclog.Logger
	started time.Time
	host    *host.Host

	ctx    context.Context // lives until the agent stops
	cancel context.CancelFunc
	ln     net.Listener

	lastCall atomic.Int64 // unix nanos of the last request
	inflight atomic.Int64

	stopOnce sync.Once
	done     chan struct{}
	wg       sync.WaitGroup

	connMu sync.Mutex
	conns  map[net.Conn]struct{}

	storage backendSlot
	network backendSlot
	gw      gateway

	roundMu sync.Mutex
	rounds  map[string]chan struct{} // per storage handle: held while a SyncRound runs
}

// New checks the configuration and listens on the control address. Serve
// then serves until the agent stops.
func New(ctx context.Context, cfg Config) (*Agent, error) {
	if cfg.MigrationID == "" {
		return nil, fmt.Errorf("agent: migration id required: %w", contract.ErrInvalidArgument)
	}
	if cfg.Role != contract.RoleSource && cfg.Role != contract.RoleDestination {
		return nil, fmt.Errorf("agent: role %q: want source or destination: %w", cfg.Role, contract.ErrInvalidArgument)
	}
	if cfg.ControlListen == "" {
		cfg.ControlListen = "127.0.0.1:0"
	}
	if cfg.ForwardHost == "" {
		cfg.ForwardHost = "127.0.0.1"
	}
	if cfg.IdleTimeout <= 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	tc, err := cfg.TLS.serverTLS()
	if err != nil {
		return nil, err
	}
	if cfg.StateDir != "" {
		if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("agent: state dir: %w", err)
		}
	}
	lc := net.ListenConfig{KeepAliveConfig: ControlKeepAlive}
	tcp, err := lc.Listen(ctx, "tcp", cfg.ControlListen)
	if err != nil {
		return nil, fmt.Errorf("agent: control listen %s: %w", cfg.ControlListen, err)
	}
	log := cfg.Logger.Named("agent").With("migration_id", cfg.MigrationID, "role", string(cfg.Role))
	a := &Agent{
		cfg: cfg, log: log, started: time.Now(),
		host:   host.New(cfg.PluginDirs, host.Options{Logger: log, Env: cfg.PluginEnv}),
		ln:     tls.NewListener(tcp, tc),
		done:   make(chan struct{}),
		conns:  map[net.Conn]struct{}{},
		rounds: map[string]chan struct{}{},
	}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	a.storage.kind, a.network.kind = contract.KindStorage, contract.KindNetwork
	a.gw.a = a
	a.lastCall.Store(time.Now().UnixNano())
	return a, nil
}

// Addr is the control address.
func (a *Agent) Addr() string { return a.ln.Addr().String() }

// Done is closed once the agent has stopped and cleaned up.
func (a *Agent) Done() <-chan struct{} { return a.done }

// Serve serves controllers until Stop, the idle timeout or ctx ends, then
// cleans up (backends, gateway) and returns. The reason is returned: nil
// for Stop, ErrIdle for the idle timeout, ctx's error otherwise.
func (a *Agent) Serve(ctx context.Context) error {
	var reason error
	var reasonMu sync.Mutex
	setReason := func(err error) {
		reasonMu.Lock()
		if reason == nil {
			reason = err
		}
		reasonMu.Unlock()
	}
	a.touch() // the idle clock starts now
	a.wg.Add(2)
	go func() {
		defer a.wg.Done()
		a.acceptLoop()
	}()
	go func() {
		defer a.wg.Done()
		tick := time.NewTicker(min(a.cfg.IdleTimeout/4, time.Second))
		defer tick.Stop()
		for {
			select {
			case <-a.ctx.Done():
				return
			case <-ctx.Done():
				setReason(ctx.Err())
				a.shutdown()
				return
			case <-tick.C:
				idle := time.Since(time.Unix(0, a.lastCall.Load()))
				if a.inflight.Load() == 0 && idle > a.cfg.IdleTimeout {
					a.log.Warn("controller gone, stopping", "idle", idle.Round(time.Millisecond).String())
					setReason(ErrIdle)
					a.shutdown()
					return
				}
			}
		}
	}()
	<-a.ctx.Done()
	a.wg.Wait()
	a.cleanup()
	a.log.Info("agent stopped")
	close(a.done)
	reasonMu.Lock()
	defer reasonMu.Unlock()
	return reason
}

// ErrIdle: the agent stopped because its controller was silent for longer
// than the idle timeout.
var ErrIdle = errors.New("agent: controller silent for longer than the idle timeout")

// shutdown stops accepting and closes every connection (idempotent).
func (a *Agent) shutdown() {
	a.stopOnce.Do(func() {
		a.cancel()
		_ = a.ln.Close()
		a.connMu.Lock()
		for c := range a.conns {
			_ = c.Close()
		}
		a.connMu.Unlock()
	})
}

func (a *Agent) cleanup() {
	a.gw.stop()
	a.storage.close()
	a.network.close()
}

func (a *Agent) acceptLoop() {
	var backoff time.Duration
	for {
		c, err := a.ln.Accept()
		if err != nil {
			var t interface{ Temporary() bool }
			if a.ctx.Err() == nil && errors.As(err, &t) && t.Temporary() {
				// Out of file descriptors, a connection aborted before
				// accept...: keep serving rather than stop the agent.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				a.log.Warn("control accept failed, retrying", "error", err, "backoff", backoff)
				select {
				case <-a.ctx.Done():
					return
				case <-time.After(backoff):
				}
				continue
			}
			if a.ctx.Err() == nil {
				a.log.Error("control accept failed", "error", err)
				a.shutdown()
			}
			return
		}
		backoff = 0
		a.connMu.Lock()
		if a.ctx.Err() != nil {
			a.connMu.Unlock()
			_ = c.Close()
			return
		}
		a.conns[c] = struct{}{}
		a.connMu.Unlock()
		a.touch() // a connecting controller counts as activity
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			a.serveConn(c)
			a.connMu.Lock()
			delete(a.conns, c)
			a.connMu.Unlock()
		}()
	}
}

// serveConn serves one controller connection. Its calls run under a ctx
// that ends when the connection does: a controller that went away (killed,
// no Cancel sent) does not leave a round running that its successor would
// collide with.
func (a *Agent) serveConn(c net.Conn) {
	tc := c.(*tls.Conn)
	hctx, hcancel := context.WithTimeout(a.ctx, 10*time.Second)
	err := tc.HandshakeContext(hctx)
	hcancel()
	if err != nil {
		a.log.Warn("control handshake refused", "remote", c.RemoteAddr().String(), "error", err)
		_ = c.Close()
		return
	}
	cctx, ccancel := context.WithCancel(a.ctx)
	defer ccancel()
	srv := rpc.NewServer()
	svc := &Service{a: a, t: contract.NewCallTracker(cctx)}
	if err := srv.RegisterName(ServiceName, svc); err != nil {
		a.log.Error("register rpc service", "error", err)
		_ = c.Close()
		return
	}
	nc := newActivityConn(c)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		a.watchConn(cctx, nc, &svc.liveness)
	}()
	defer func() {
		ccancel()
		wg.Wait()
	}()
	cd := newCodec(nc)
	cd.onRead, cd.onClose = a.touch, ccancel
	srv.ServeCodec(serverCodec{cd})
}

// watchConn closes a control connection on which nothing arrived for the
// liveness the controller announced in its heartbeats (none announced: no
// check). A controller whose path went silent without a reset (half-open)
// thus no longer keeps its calls running: closing the connection cancels
// them, as for a connection that closed. The idle timeout is separate: it
// counts requests on all connections.
func (a *Agent) watchConn(ctx context.Context, nc *activityConn, liveness *atomic.Int64) {
	for {
		d := time.Duration(liveness.Load())
		tick := time.Second
		if d > 0 {
			tick = min(max(d/8, 5*time.Millisecond), time.Second)
		}
		t := time.NewTimer(tick)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		if d <= 0 {
			continue
		}
		if silent := nc.silentFor(); silent > d {
			a.log.Warn("controller connection silent, closing it", "remote", nc.RemoteAddr().String(),
				"silent", silent.Round(time.Millisecond).String(), "liveness", d.String())
			_ = nc.Close() // the read loop fails and cancels the connection's calls
			return
		}
	}
}

func (a *Agent) touch() { a.lastCall.Store(time.Now().UnixNano()) }

// Stop stops the agent (as the Stop RPC does) and waits until it has
// cleaned up or ctx ends.
func (a *Agent) Stop(ctx context.Context) error {
	a.shutdown()
	select {
	case <-a.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// hello answers Hello.
func (a *Agent) hello(req HelloRequest) (HelloResponse, error) {
	if req.Version != ProtocolVersion {
		return HelloResponse{}, fmt.Errorf("agent protocol version %d, controller speaks %d: %w", ProtocolVersion, req.Version, contract.ErrUnsupported)
	}
	if req.MigrationID != a.cfg.MigrationID || req.Role != a.cfg.Role {
		return HelloResponse{}, fmt.Errorf("this agent serves migration %s as %s, not %s as %s: %w",
			a.cfg.MigrationID, a.cfg.Role, req.MigrationID, req.Role, contract.ErrInvalidArgument)
	}
	return HelloResponse{
		Version: ProtocolVersion, MigrationID: a.cfg.MigrationID, Role: a.cfg.Role, PID: os.Getpid(),
		StartedAt: a.started, IdleTimeout: a.cfg.IdleTimeout,
		Storage: a.storage.currentName(), Network: a.network.currentName(), GatewayAddr: a.gw.listenAddr(),
	}, nil
}

// roundSlot serialises SyncRound per handle: a repeated round (from a
// controller that replaced one which died mid-round) waits until the
// earlier call has returned instead of colliding with it in the backend.
func (a *Agent) roundSlot(ctx context.Context, handle string) (func(), error) {
	a.roundMu.Lock()
	ch, ok := a.rounds[handle]
	if !ok {
		ch = make(chan struct{}, 1)
		a.rounds[handle] = ch
	}
	a.roundMu.Unlock()
	select {
	case ch <- struct{}{}:
		return func() { <-ch }, nil
	case <-ctx.Done():
		return nil, fmt.Errorf("waiting for the previous round of %s to end: %w (%w)", handle, contract.ErrCancelled, ctx.Err())
	}
}
