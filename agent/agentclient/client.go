// Package agentclient is the controller's side of the site agents. A
// Client implements engine.Agents; its views Storage(), Network() and
// Gateway() implement engine.StorageBackend, engine.NetworkBackend and
// engine.Gateway (the engine interfaces share method names, so one type
// cannot implement them all). They drive one source and one destination
// agent per migration over mutual TLS (package agent).
//
// Agents.Start mints the migration's CA and certificates, persists them and
// the agents' control addresses under Config.StateDir (so a restarted
// controller re-attaches with Hello instead of launching twice), launches
// missing agents through a Launcher and launches the backends in them.
package agentclient

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// XAPIFunc returns the xapi access (URL, session, host) backends of one
// site use for a migration. Sessions are never logged.
type XAPIFunc func(ctx context.Context, migrationID string) (contract.XAPIAccess, error)

// UUIDFunc resolves an xapi ref (snapshot, SR, network) of a site to its
// uuid, for the backends' requests.
type UUIDFunc func(ctx context.Context, site contract.Role, ref string) (string, error)

// Config configures a Client.
type Config struct {
	// Launcher starts agents (required).
	Launcher Launcher
	// StateDir is the controller's state directory (required). The client
	// keeps <StateDir>/agents/<migration-id>.json (0600): the migration's
	// CA and certificates and the agents' addresses.
	StateDir string
	// PluginDir is the agents' --plugin-dir ("" = their default).
	PluginDir string
	// AgentStateDir, when set, gives each agent --state-dir
	// <AgentStateDir>/<migration-id>/<role>.
	AgentStateDir string
	// ControlListen is the agents' --control-listen (default 127.0.0.1:0).
	ControlListen string
	// IdleTimeout is the agents' --idle-timeout (0 = agent.DefaultIdleTimeout).
	IdleTimeout time.Duration
	// StorageConfig and NetworkConfig are the backends' Configure configs
	// (msgpack, contract.ConfigFromJSON), by backend name.
	StorageConfig map[string][]byte
	NetworkConfig map[string][]byte
	// SourceXAPI and DestXAPI give backends access to their site's xapi
	// (optional: nil passes none).
	SourceXAPI XAPIFunc
	DestXAPI   XAPIFunc
	// UUIDOf resolves snapshot, SR and network refs to uuids (optional:
	// nil leaves the uuid fields of backend requests empty).
	UUIDOf UUIDFunc
	// BridgeOf resolves a network ref of a site to its bridge name
	// (network.bridge), given to network backends as VIFInfo.Bridge for
	// that site (optional: nil leaves it empty; backends then need their
	// own network → bridge map).
	BridgeOf UUIDFunc
	// DialTimeout bounds one control connection attempt (default 10s).
	DialTimeout time.Duration
	// PeerWatch is how often SyncRound, while a round runs on the source
	// agent, checks that the destination agent still answers (default 2s).
	// Two failed checks in a row cancel the round with an error matching
	// agent.ErrAgentUnreachable, so the engine's retry re-launches the lost
	// agent instead of waiting for the source to give up on it.
	PeerWatch time.Duration
	// HeartbeatInterval is how often the client heartbeats each agent
	// (default 5s; at most a quarter of the agent's idle timeout).
	HeartbeatInterval time.Duration
	// HeartbeatMisses is how many heartbeat intervals may pass without
	// anything arriving from an agent while calls wait, before the control
	// connection is declared dead (half-open: the path went silent without
	// a reset): it is closed, every waiting call fails with an error
	// wrapping agent.ErrAgentUnreachable and the next call dials again.
	// The agent applies the same bound to the controller's connection.
	// Default 3 (about 15 s with the default interval).
	HeartbeatMisses int
	Logger          hclog.Logger
}

// DefaultHeartbeatInterval and DefaultHeartbeatMisses are Config's defaults.
const (
	DefaultHeartbeatInterval = 5 * time.Second
	DefaultHeartbeatMisses   = 3
)

// Client drives the site agents of any number of migrations. Close it when
// the controller exits (agents keep running for a successor to re-attach).
type Client struct {
	cfg Config
	log hclog.Logger

	mu   sync.Mutex
	migs map[string]*migration
}

var (
	_ engine.Agents         = (*Client)(nil)
	_ engine.StorageBackend = (*Storage)(nil)
	_ engine.NetworkBackend = (*Network)(nil)
	_ engine.Gateway        = (*Gateway)(nil)
)

// Storage is the engine.StorageBackend view of a Client.
type Storage struct{ c *Client }

// Network is the engine.NetworkBackend view of a Client.
type Network struct{ c *Client }

// Gateway is the engine.Gateway view of a Client.
type Gateway struct{ c *Client }

// Storage returns the engine.StorageBackend of the client.
func (c *Client) Storage() *Storage { return &Storage{c} }

// Network returns the engine.NetworkBackend of the client.
func (c *Client) Network() *Network { return &Network{c} }

// Gateway returns the engine.Gateway of the client.
func (c *Client) Gateway() *Gateway { return &Gateway{c} }

// ErrNotStarted: the migration's agents were never started (Agents.Start).
var ErrNotStarted = fmt.Errorf("site agents not started: %w", contract.ErrFailedPrecondition)

// New returns a Client.
func New(cfg Config) (*Client, error) {
	if cfg.Launcher == nil || cfg.StateDir == "" {
		return nil, fmt.Errorf("agentclient: Launcher and StateDir are required: %w", contract.ErrInvalidArgument)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	if cfg.PeerWatch <= 0 {
		cfg.PeerWatch = 2 * time.Second
	}
	if cfg.ControlListen == "" {
		cfg.ControlListen = "127.0.0.1:0"
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = DefaultHeartbeatInterval
	}
	if cfg.HeartbeatMisses <= 0 {
		cfg.HeartbeatMisses = DefaultHeartbeatMisses
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if err := os.MkdirAll(filepath.Join(cfg.StateDir, "agents"), 0o700); err != nil {
		return nil, fmt.Errorf("agentclient: state dir: %w", err)
	}
	return &Client{cfg: cfg, log: cfg.Logger.Named("agentclient"), migs: map[string]*migration{}}, nil
}

// Close closes the control connections and stops heartbeats. Agents keep
// running until they are stopped or time out.
func (c *Client) Close() error {
	c.mu.Lock()
	migs := c.migs
	c.migs = map[string]*migration{}
	c.mu.Unlock()
	for _, m := range migs {
		m.close()
	}
	return nil
}

// persisted is what survives a controller restart.
type persisted struct {
	MigrationID string                 `json:"migration_id"`
	TLS         *agent.Bundle          `json:"tls"`
	Agents      map[string]agentRecord `json:"agents"` // by role
	Spec        engine.AgentSpec       `json:"spec"`
}

type agentRecord struct {
	Host string `json:"host"`
	Addr string `json:"addr"`
}

// migration is the client's view of one migration's agents and handles.
type migration struct {
	c  *Client
	id string

	mu    sync.Mutex
	p     persisted
	conns map[contract.Role]*agentConn
	disks map[string]*diskHandles
}

type diskHandles struct {
	backend string
	recv    *contract.Handle
	send    *contract.Handle
}

func validID(id string) error {
	if id == "" || strings.ContainsAny(id, "/\\") || id == "." || id == ".." {
		return fmt.Errorf("migration id %q: %w", id, contract.ErrInvalidArgument)
	}
	return nil
}

func (c *Client) path(id string) string { return filepath.Join(c.cfg.StateDir, "agents", id+".json") }

// lookup returns the migration from memory or from the persisted file;
// create mints a new one when neither has it.
func (c *Client) lookup(id string, create bool) (*migration, error) {
	if err := validID(id); err != nil {
		return nil, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if m, ok := c.migs[id]; ok {
		return m, nil
	}
	m := &migration{c: c, id: id, conns: map[contract.Role]*agentConn{}, disks: map[string]*diskHandles{}}
	b, err := os.ReadFile(c.path(id))
	switch {
	case err == nil:
		if err := json.Unmarshal(b, &m.p); err != nil {
			return nil, fmt.Errorf("agentclient: %s: %w", c.path(id), err)
		}
	case errors.Is(err, os.ErrNotExist) && create:
		bundle, err := agent.NewBundle(id)
		if err != nil {
			return nil, err
		}
		m.p = persisted{MigrationID: id, TLS: bundle, Agents: map[string]agentRecord{}}
		if err := m.saveLocked(); err != nil {
			return nil, err
		}
	case errors.Is(err, os.ErrNotExist):
		return nil, fmt.Errorf("migration %s: %w", id, ErrNotStarted)
	default:
		return nil, fmt.Errorf("agentclient: %w", err)
	}
	if m.p.Agents == nil {
		m.p.Agents = map[string]agentRecord{}
	}
	c.migs[id] = m
	return m, nil
}

func (m *migration) saveLocked() error {
	b, err := json.Marshal(m.p)
	if err != nil {
		return fmt.Errorf("agentclient: encode state: %w", err)
	}
	p := m.c.path(m.id)
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("agentclient: save state: %w", err)
	}
	if _, err := f.Write(b); err != nil {
		f.Close()
		return fmt.Errorf("agentclient: save state: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("agentclient: save state: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("agentclient: save state: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return fmt.Errorf("agentclient: save state: %w", err)
	}
	return nil
}

func (m *migration) close() {
	m.mu.Lock()
	conns := m.conns
	m.conns = map[contract.Role]*agentConn{}
	m.mu.Unlock()
	for _, ac := range conns {
		ac.close()
	}
}

// conn returns the connection to the agent of role (ErrNotStarted when
// no agent was recorded).
func (m *migration) conn(role contract.Role) (*agentConn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if ac, ok := m.conns[role]; ok {
		return ac, nil
	}
	rec, ok := m.p.Agents[string(role)]
	if !ok || rec.Addr == "" {
		return nil, fmt.Errorf("%s agent of migration %s: %w", role, m.id, ErrNotStarted)
	}
	tc, err := m.p.TLS.Controller.ClientTLS(role)
	if err != nil {
		return nil, err
	}
	ac := newAgentConn(m.c, m.id, role, rec.Addr, tc)
	m.conns[role] = ac
	return ac, nil
}

func (m *migration) dropConn(role contract.Role) {
	m.mu.Lock()
	ac := m.conns[role]
	delete(m.conns, role)
	m.mu.Unlock()
	if ac != nil {
		ac.close()
	}
}

// agentConn is one control connection, redialled on demand, with a
// heartbeat that keeps the agent from timing out while the controller lives.
type agentConn struct {
	c     *Client
	migID string
	role  contract.Role
	addr  string
	tls   *tls.Config

	mu     sync.Mutex
	conn   *agent.Conn
	hb     time.Duration // heartbeat interval once heartbeats run
	stop   chan struct{}
	closed bool
	wg     sync.WaitGroup
}

func newAgentConn(c *Client, migID string, role contract.Role, addr string, tc *tls.Config) *agentConn {
	return &agentConn{c: c, migID: migID, role: role, addr: addr, tls: tc, stop: make(chan struct{})}
}

// livenessLocked is how long a connection may stay silent while calls
// wait: HeartbeatMisses heartbeat intervals.
func (ac *agentConn) livenessLocked() time.Duration {
	hb := ac.hb
	if hb == 0 {
		hb = ac.c.cfg.HeartbeatInterval
	}
	return time.Duration(ac.c.cfg.HeartbeatMisses) * hb
}

func (ac *agentConn) get(ctx context.Context) (*agent.Conn, error) {
	ac.mu.Lock()
	defer ac.mu.Unlock()
	if ac.closed {
		return nil, fmt.Errorf("%s agent connection closed: %w", ac.role, agent.ErrAgentUnreachable)
	}
	if ac.conn != nil {
		select {
		case <-ac.conn.Done(): // failed (agent gone, liveness): dial again
			_ = ac.conn.Close()
			ac.conn = nil
		default:
			return ac.conn, nil
		}
	}
	d := tls.Dialer{NetDialer: &net.Dialer{Timeout: ac.c.cfg.DialTimeout, KeepAliveConfig: agent.ControlKeepAlive}, Config: ac.tls}
	nc, err := d.DialContext(ctx, "tcp", ac.addr)
	if err != nil {
		return nil, fmt.Errorf("%s agent at %s: %w: %v", ac.role, ac.addr, agent.ErrAgentUnreachable, err)
	}
	live := ac.livenessLocked()
	ac.conn = agent.NewConnOptions(nc, agent.ConnOptions{Liveness: live, WriteTimeout: max(live, agent.DefaultWriteTimeout)})
	return ac.conn, nil
}

func (ac *agentConn) drop(c *agent.Conn) {
	ac.mu.Lock()
	if ac.conn == c {
		ac.conn = nil
	}
	ac.mu.Unlock()
	_ = c.Close()
}

// startHeartbeat heartbeats every interval until close (once). Each
// heartbeat tells the agent the liveness bound (HeartbeatMisses intervals)
// after which it may close a silent connection; the client applies the same
// bound (agent.ConnOptions.Liveness), so a half-open connection fails its
// waiting calls with agent.ErrAgentUnreachable and the next heartbeat or
// call dials again.
func (ac *agentConn) startHeartbeat(interval time.Duration) {
	ac.mu.Lock()
	defer ac.mu.Unlock()
	if ac.hb != 0 || ac.closed {
		return
	}
	ac.hb = interval
	live := ac.livenessLocked()
	if ac.conn != nil {
		ac.conn.SetLiveness(live)
	}
	log := ac.c.log.With("migration_id", ac.migID, "role", string(ac.role))
	ac.wg.Add(1)
	go func() {
		defer ac.wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		failing := false
		for {
			select {
			case <-ac.stop:
				return
			case <-t.C:
			}
			// The liveness check ends a heartbeat on a silent connection
			// before this timeout does (a timeout would send Cancel and wait).
			ctx, cancel := context.WithTimeout(context.Background(), live+max(interval, time.Second))
			_, err := call[agent.HeartbeatRequest, agent.Empty](ctx, ac, agent.MethodHeartbeat, agent.HeartbeatRequest{Liveness: live})
			cancel()
			switch {
			case err != nil && !failing:
				failing = true
				log.Warn("agent heartbeat failed", "error", err)
			case err != nil:
				log.Debug("agent heartbeat failed", "error", err)
			case failing:
				failing = false
				log.Info("agent answers heartbeats again")
			}
		}
	}()
}

func (ac *agentConn) close() {
	ac.mu.Lock()
	if ac.closed {
		ac.mu.Unlock()
		return
	}
	ac.closed = true
	close(ac.stop)
	c := ac.conn
	ac.conn = nil
	ac.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
	ac.wg.Wait()
}

// call runs one agent method; a transport failure drops the connection so
// the next call dials again.
func call[Req, Resp any](ctx context.Context, ac *agentConn, method string, req Req) (Resp, error) {
	var zero Resp
	c, err := ac.get(ctx)
	if err != nil {
		return zero, err
	}
	resp, err := agent.Call[Req, Resp](ctx, c, method, req)
	if err != nil && errors.Is(err, agent.ErrAgentUnreachable) {
		ac.drop(c)
		return resp, fmt.Errorf("%s agent of migration %s: %w", ac.role, ac.migID, err)
	}
	if err != nil {
		return resp, fmt.Errorf("%s agent: %w", ac.role, err)
	}
	return resp, nil
}

// callRole runs a method on the agent of role of migration id.
func callRole[Req, Resp any](ctx context.Context, c *Client, id string, role contract.Role, method string, req Req) (Resp, error) {
	var zero Resp
	m, err := c.lookup(id, false)
	if err != nil {
		return zero, err
	}
	ac, err := m.conn(role)
	if err != nil {
		return zero, err
	}
	return call[Req, Resp](ctx, ac, method, req)
}
