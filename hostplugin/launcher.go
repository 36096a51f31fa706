package hostplugin

import (
	"context"
	"encoding/json"
	"fmt"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/agent/agentclient"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// Plugin functions that start and stop site agents.
const (
	FnAgentStart = "agent-start"
	FnAgentStop  = "agent-stop"
)

// Argument names of agent-start / agent-stop.
const (
	ArgMigrationID   = "migration_id"
	ArgRole          = "role"
	ArgControlListen = "control_listen"
	ArgPluginDir     = "plugin_dir"
	ArgStateDir      = "state_dir"
	ArgIdleTimeout   = "idle_timeout"
	ArgTLS           = "tls" // JSON of agent.Material
)

// AgentStarted is agent-start's result (JSON).
type AgentStarted struct {
	// Control is the agent's control address, reachable from the caller
	// (an unspecified listen address is replaced by the host's address).
	Control string `json:"control"`
	Host    string `json:"host_uuid,omitempty"`
}

// PluginLauncher implements agentclient.Launcher by calling the wanmotion
// host plugin on the host the agent must run on (spec.Host), through the
// pool of the agent's role: host.call_plugin(spec.Host, "wanmotion",
// "agent-start"|"agent-stop", args).
type PluginLauncher struct {
	// Source and Dest are logged-in clients of the two pools (role source
	// agents run in Source, destination agents in Dest).
	Source, Dest *xapi.Client
	// HostListen leaves the agents' control address to each host (its
	// agent_listen setting) instead of the spec's ControlListen: an agent on
	// another host must listen where the controller can reach it.
	HostListen bool
	// Logger records where each agent started (optional).
	Logger hclog.Logger
}

var _ agentclient.Launcher = (*PluginLauncher)(nil)

func (l *PluginLauncher) client(r contract.Role) (*xapi.Client, error) {
	var c *xapi.Client
	switch r {
	case contract.RoleSource:
		c = l.Source
	case contract.RoleDestination:
		c = l.Dest
	default:
		return nil, fmt.Errorf("plugin launcher: role %q: %w", r, contract.ErrInvalidArgument)
	}
	if c == nil {
		return nil, fmt.Errorf("plugin launcher: no client for role %s: %w", r, contract.ErrInvalidArgument)
	}
	return c, nil
}

// LaunchArgs are the agent-start arguments for spec.
func LaunchArgs(spec agentclient.AgentLaunchSpec) (map[string]string, error) {
	tls, err := json.Marshal(spec.TLS)
	if err != nil {
		return nil, fmt.Errorf("plugin launcher: %w", err)
	}
	args := map[string]string{ArgMigrationID: spec.MigrationID, ArgRole: string(spec.Role), ArgTLS: string(tls)}
	if spec.ControlListen != "" {
		args[ArgControlListen] = spec.ControlListen
	}
	if spec.PluginDir != "" {
		args[ArgPluginDir] = spec.PluginDir
	}
	if spec.StateDir != "" {
		args[ArgStateDir] = spec.StateDir
	}
	if spec.IdleTimeout > 0 {
		args[ArgIdleTimeout] = spec.IdleTimeout.String()
	}
	return args, nil
}

// Launch implements agentclient.Launcher.
func (l *PluginLauncher) Launch(ctx context.Context, spec agentclient.AgentLaunchSpec) (string, error) {
	c, err := l.client(spec.Role)
	if err != nil {
		return "", err
	}
	if spec.Host == "" {
		return "", fmt.Errorf("plugin launcher: no host for the %s agent: %w", spec.Role, contract.ErrInvalidArgument)
	}
	args, err := LaunchArgs(spec)
	if err != nil {
		return "", err
	}
	if l.HostListen {
		delete(args, ArgControlListen)
	}
	out, err := c.HostCallPlugin(ctx, xapi.HostRef(spec.Host), PluginName, FnAgentStart, args)
	if err != nil {
		return "", fmt.Errorf("plugin launcher: %s agent on %s: %w", spec.Role, spec.Host, classify(err))
	}
	var res AgentStarted
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Control == "" {
		return "", fmt.Errorf("plugin launcher: agent-start answered %q: %w", out, contract.ErrInternal)
	}
	if l.Logger != nil {
		l.Logger.Info("site agent started on host", "migration_id", spec.MigrationID, "role", string(spec.Role),
			"host", spec.Host, "host_uuid", res.Host, "control", res.Control)
	}
	return res.Control, nil
}

// Stop implements agentclient.Launcher.
func (l *PluginLauncher) Stop(ctx context.Context, spec agentclient.AgentLaunchSpec) error {
	c, err := l.client(spec.Role)
	if err != nil {
		return err
	}
	args := map[string]string{ArgMigrationID: spec.MigrationID, ArgRole: string(spec.Role)}
	if _, err := c.HostCallPlugin(ctx, xapi.HostRef(spec.Host), PluginName, FnAgentStop, args); err != nil {
		return fmt.Errorf("plugin launcher: stop %s agent on %s: %w", spec.Role, spec.Host, classify(err))
	}
	return nil
}

// classify maps a plugin API error onto the contract's error kinds (the
// original stays in the chain).
func classify(err error) error {
	ae, ok := xapi.AsAPIError(err)
	if !ok {
		return fmt.Errorf("%w: %w", contract.ErrUnavailable, err)
	}
	switch ae.Code {
	case CodeInvalidArgument:
		return fmt.Errorf("%w: %w", contract.ErrInvalidArgument, err)
	case CodeBackendNotFound, "XENAPI_MISSING_PLUGIN":
		return fmt.Errorf("%w: %w", contract.ErrNotFound, err)
	}
	return fmt.Errorf("%w: %w", contract.ErrUnavailable, err)
}

// ParseAgentStart checks agent-start's arguments and returns the launch
// spec they describe (Host is left empty: the plugin runs on it).
func ParseAgentStart(args map[string]string) (agentclient.AgentLaunchSpec, error) {
	var s agentclient.AgentLaunchSpec
	if err := ParseAgentID(args, &s); err != nil {
		return s, err
	}
	raw := args[ArgTLS]
	if raw == "" {
		return s, fmt.Errorf("%w: %s is required", ErrInvalidArgument, ArgTLS)
	}
	var m agent.Material
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		return s, fmt.Errorf("%w: %s: %v", ErrInvalidArgument, ArgTLS, err)
	}
	if len(m.CACert) == 0 || len(m.Cert) == 0 || len(m.Key) == 0 {
		return s, fmt.Errorf("%w: %s: ca_cert, cert and key are required", ErrInvalidArgument, ArgTLS)
	}
	s.TLS = m
	s.ControlListen = args[ArgControlListen]
	s.PluginDir = args[ArgPluginDir]
	s.StateDir = args[ArgStateDir]
	if v := args[ArgIdleTimeout]; v != "" {
		d, err := parseDuration(v)
		if err != nil {
			return s, fmt.Errorf("%w: %s %q: %v", ErrInvalidArgument, ArgIdleTimeout, v, err)
		}
		s.IdleTimeout = d
	}
	return s, nil
}

// ParseAgentID reads migration_id and role (agent-stop's arguments).
func ParseAgentID(args map[string]string, s *agentclient.AgentLaunchSpec) error {
	id := args[ArgMigrationID]
	if !validID(id) {
		return fmt.Errorf("%w: %s %q: letters, digits, '.', '_' and '-' only", ErrInvalidArgument, ArgMigrationID, id)
	}
	r := contract.Role(args[ArgRole])
	if r != contract.RoleSource && r != contract.RoleDestination {
		return fmt.Errorf("%w: %s %q: want source or destination", ErrInvalidArgument, ArgRole, args[ArgRole])
	}
	s.MigrationID, s.Role = id, r
	return nil
}

func validID(id string) bool {
	if id == "" || len(id) > 128 || id == "." || id == ".." {
		return false
	}
	for _, r := range id {
		ok := r == '.' || r == '_' || r == '-' || (r >= '0' && r <= '9') || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z')
		if !ok {
			return false
		}
	}
	return true
}
