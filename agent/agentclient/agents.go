package agentclient

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

var roles = []contract.Role{contract.RoleDestination, contract.RoleSource}

func (c *Client) launchSpec(m *migration, role contract.Role, hostRef string) AgentLaunchSpec {
	s := AgentLaunchSpec{
		MigrationID: m.id, Role: role, Host: hostRef, TLS: m.p.TLS.For(role),
		ControlListen: c.cfg.ControlListen, PluginDir: c.cfg.PluginDir, IdleTimeout: c.cfg.IdleTimeout,
	}
	if c.cfg.AgentStateDir != "" {
		s.StateDir = filepath.Join(c.cfg.AgentStateDir, m.id, string(role))
	}
	return s
}

func hostOf(spec engine.AgentSpec, role contract.Role) string {
	if role == contract.RoleSource {
		return spec.SourceHost
	}
	return spec.DestHost
}

// Start implements engine.Agents: it re-attaches to the migration's agents
// recorded in the state dir (Hello) or launches them, then launches the
// backends in them. Idempotent.
func (c *Client) Start(ctx context.Context, spec engine.AgentSpec) error {
	m, err := c.lookup(spec.MigrationID, true)
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.p.Spec = spec
	err = m.saveLocked()
	m.mu.Unlock()
	if err != nil {
		return err
	}
	for _, role := range roles {
		if err := c.ensureAgent(ctx, m, role, hostOf(spec, role)); err != nil {
			return err
		}
		if err := c.launchBackends(ctx, m, role, spec); err != nil {
			return err
		}
	}
	return nil
}

// ensureAgent says Hello to the recorded agent of role, or launches one.
func (c *Client) ensureAgent(ctx context.Context, m *migration, role contract.Role, hostRef string) error {
	m.mu.Lock()
	rec, recorded := m.p.Agents[string(role)]
	m.mu.Unlock()
	log := c.log.With("migration_id", m.id, "role", string(role))
	if recorded && rec.Addr != "" {
		err := c.hello(ctx, m, role)
		if err == nil {
			log.Debug("re-attached to agent", "control", rec.Addr)
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		log.Warn("recorded agent does not answer, launching a new one", "control", rec.Addr, "error", err)
		m.dropConn(role)
		spec := c.launchSpec(m, role, rec.Host)
		if err := c.cfg.Launcher.Stop(ctx, spec); err != nil {
			log.Warn("stopping the unresponsive agent failed", "error", err)
		}
	}
	spec := c.launchSpec(m, role, hostRef)
	addr, err := c.cfg.Launcher.Launch(ctx, spec)
	if err != nil {
		return fmt.Errorf("launch %s agent of migration %s: %w", role, m.id, err)
	}
	m.mu.Lock()
	m.p.Agents[string(role)] = agentRecord{Host: hostRef, Addr: addr}
	err = m.saveLocked()
	m.mu.Unlock()
	if err != nil {
		return err
	}
	m.dropConn(role)
	log.Info("agent launched", "control", addr)
	// The agent listens before it prints its address; a few tries cover
	// a slow first handshake.
	var herr error
	for i := 0; i < 5; i++ {
		if herr = c.hello(ctx, m, role); herr == nil || ctx.Err() != nil {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if herr != nil {
		return fmt.Errorf("new %s agent of migration %s: %w", role, m.id, herr)
	}
	return nil
}

func (c *Client) hello(ctx context.Context, m *migration, role contract.Role) error {
	ac, err := m.conn(role)
	if err != nil {
		return err
	}
	hctx, cancel := context.WithTimeout(ctx, c.cfg.DialTimeout)
	defer cancel()
	resp, err := call[agent.HelloRequest, agent.HelloResponse](hctx, ac, agent.MethodHello,
		agent.HelloRequest{Version: agent.ProtocolVersion, MigrationID: m.id, Role: role})
	if err != nil {
		return err
	}
	hb := c.cfg.HeartbeatInterval
	if resp.IdleTimeout > 0 {
		hb = min(hb, resp.IdleTimeout/4)
	}
	hb = max(hb, 10*time.Millisecond)
	ac.startHeartbeat(hb)
	return nil
}

func (c *Client) launchBackends(ctx context.Context, m *migration, role contract.Role, spec engine.AgentSpec) error {
	ac, err := m.conn(role)
	if err != nil {
		return err
	}
	if spec.StorageBackend != "" {
		cfg, err := c.backendConfig(spec, role, spec.StorageBackend, c.cfg.StorageConfig)
		if err != nil {
			return err
		}
		if _, err := call[agent.LaunchRequest, agent.LaunchResponse](ctx, ac, agent.MethodLaunchStorage,
			agent.LaunchRequest{Name: spec.StorageBackend, Config: cfg}); err != nil {
			return fmt.Errorf("launch storage backend %s at the %s: %w", spec.StorageBackend, role, err)
		}
	}
	if spec.NetworkBackend != "" && spec.NetworkBackend != "none" {
		cfg, err := c.backendConfig(spec, role, spec.NetworkBackend, c.cfg.NetworkConfig)
		if err != nil {
			return err
		}
		if _, err := call[agent.LaunchRequest, agent.LaunchResponse](ctx, ac, agent.MethodLaunchNetwork,
			agent.LaunchRequest{Name: spec.NetworkBackend, Config: cfg}); err != nil {
			return fmt.Errorf("launch network backend %s at the %s: %w", spec.NetworkBackend, role, err)
		}
	}
	return nil
}

// Stop implements engine.Agents: Stop RPC to both agents (they clean up
// their backends and gateway and exit), then the launcher's Stop (which
// also ends an agent that did not answer), and the persisted state is
// removed. Idempotent.
func (c *Client) Stop(ctx context.Context, migrationID string) error {
	m, err := c.lookup(migrationID, false)
	if errors.Is(err, ErrNotStarted) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, role := range roles {
		m.mu.Lock()
		rec, ok := m.p.Agents[string(role)]
		m.mu.Unlock()
		if !ok {
			continue
		}
		ac, err := m.conn(role)
		if err == nil {
			sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			_, err = call[agent.Empty, agent.Empty](sctx, ac, agent.MethodStop, agent.Empty{})
			cancel()
		}
		if err != nil {
			c.log.Warn("agent stop rpc failed, stopping it through the launcher", "migration_id", m.id, "role", string(role), "error", err)
		}
		if lerr := c.cfg.Launcher.Stop(ctx, c.launchSpec(m, role, rec.Host)); lerr != nil {
			errs = append(errs, fmt.Errorf("stop %s agent: %w", role, lerr))
		}
		m.dropConn(role)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	c.mu.Lock()
	delete(c.migs, migrationID)
	c.mu.Unlock()
	m.close()
	if err := os.Remove(c.path(migrationID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("agentclient: %w", err)
	}
	return nil
}

// backendConfig is the Configure config of backend at role's site: that
// site's pool section from the spec (JSON, converted with
// contract.ConfigFromJSON), else the client's own config for the backend.
func (c *Client) backendConfig(spec engine.AgentSpec, role contract.Role, backend string, fallback map[string][]byte) ([]byte, error) {
	sections := spec.SourceConfig
	if role == contract.RoleDestination {
		sections = spec.DestConfig
	}
	js, ok := sections[backend]
	if !ok {
		return fallback[backend], nil
	}
	b, err := contract.ConfigFromJSON(js)
	if err != nil {
		return nil, fmt.Errorf("the %s pool's %q section of wanmotion:config: %w", role, backend, err)
	}
	return b, nil
}
