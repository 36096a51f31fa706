package main

// The engine's wiring for the CLI: pool adapters, checkpoint store,
// backend catalog, and (when this build has them) the site agents, storage
// and network backends and the WAN gateway.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/agent/agentclient"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/xapi"
)

// errNoAgents: the data path cannot run (dry-run engines; no state dir).
var errNoAgents = errors.New("site agents are not available")

// pluginCatalog implements engine.Catalog from the backend binaries found
// on disk (plugins/host discovery; the binaries are not launched).
type pluginCatalog struct {
	dirs []string
}

// hostsCatalog lists the backends installed on the hosts the agents run on
// (the VM's host, the destination host; the coordinators when unknown), as
// their wanmotion host plugin reports them (version).
type hostsCatalog struct{ src, dst *xapi.Client }

func (c hostsCatalog) Installed(ctx context.Context) (engine.Installed, error) {
	return c.InstalledOn(ctx, "", "")
}

// InstalledOn implements engine.HostCatalog: the backends installed on
// both hosts the agents run on ("" host: that pool's coordinator).
func (c hostsCatalog) InstalledOn(ctx context.Context, sourceHost, destHost string) (engine.Installed, error) {
	var lists []engine.Installed
	for i, cl := range []*xapi.Client{c.src, c.dst} {
		host := xapi.HostRef([]string{sourceHost, destHost}[i])
		if host == "" {
			pool, err := cl.ThePool(ctx)
			if err != nil {
				return engine.Installed{}, fmt.Errorf("list the hosts' backends: %w", err)
			}
			if host, err = cl.PoolGetMaster(ctx, pool); err != nil {
				return engine.Installed{}, fmt.Errorf("list the hosts' backends: %w", err)
			}
		}
		inst, err := hostBackends(ctx, cl, host)
		if xapi.IsCode(err, xapi.CodeXenAPIMissingPlugin) {
			return engine.Installed{}, fmt.Errorf("--agents hosts needs the wanmotion host plugin on the VM's host and the destination host (packaging/install.sh): %w", err)
		}
		if err != nil {
			return engine.Installed{}, err
		}
		lists = append(lists, inst)
	}
	both := func(a, b []string) []string {
		var out []string
		for _, x := range a {
			if slices.Contains(b, x) {
				out = append(out, x)
			}
		}
		return out
	}
	return engine.Installed{Storage: both(lists[0].Storage, lists[1].Storage), Network: both(lists[0].Network, lists[1].Network)}, nil
}

// hostBackends asks the wanmotion host plugin of host (its version
// function) which backends are installed there.
func hostBackends(ctx context.Context, c *xapi.Client, host xapi.HostRef) (engine.Installed, error) {
	out, err := c.HostCallPlugin(ctx, host, hostplugin.PluginName, fnVersion, map[string]string{})
	if err != nil {
		return engine.Installed{}, err
	}
	var v pluginVersion
	if err := json.Unmarshal([]byte(out), &v); err != nil {
		return engine.Installed{}, fmt.Errorf("the wanmotion host plugin answered version with %q: %w", out, err)
	}
	if v.Backends == nil {
		return engine.Installed{}, fmt.Errorf("the wanmotion host plugin does not list its backends (an older version? %s): upgrade it", v.BackendsError)
	}
	return *v.Backends, nil
}

func (c pluginCatalog) Installed(context.Context) (engine.Installed, error) {
	bins, err := host.Discover(c.dirs)
	if err != nil {
		return engine.Installed{}, err
	}
	var inst engine.Installed
	for _, b := range bins {
		switch b.Kind {
		case contract.KindStorage:
			inst.Storage = append(inst.Storage, b.Name)
		case contract.KindNetwork:
			inst.Network = append(inst.Network, b.Name)
		}
	}
	return inst, nil
}

// agentExec overrides the executable the local agents run (tests run
// agents from the test binary); empty means this process's executable.
var agentExec struct {
	binary       string
	args         []string
	startTimeout time.Duration
}

// engineOpts are what buildEngine needs.
type engineOpts struct {
	Source, Dest *xapi.Client
	Store        engine.Store
	PluginDir    string
	Logger       hclog.Logger
	Observe      func(engine.Progress)
	// DryRun builds an engine that can only Plan (and report): no agents.
	DryRun bool
	// Simulator enables the simulator-only pause meter and integrity check.
	Simulator bool
	// StateDir holds the agent client's state (certificates, agent
	// addresses) and the local agents' directories.
	StateDir string
	// AgentBinary is the wanmotion executable the local agents run
	// (default: this process's executable).
	AgentBinary string
	// AgentArgs go before "agent" on the agents' command line (tests).
	AgentArgs []string
	// Launcher starts the site agents (default: an agentclient.LocalLauncher
	// running AgentBinary on this machine for both sites). The plugin's
	// controller passes a hostplugin.PluginLauncher: each agent starts on its
	// site's host (the VM's resident host, the destination host) through
	// host.call_plugin agent-start, with that host's own plugin_dir, state
	// directory and agent_listen.
	Launcher agentclient.Launcher
	// HostXAPI gives backends the local xapi socket of the host they run
	// on (unix:///var/lib/xcp/xapi) instead of the controller's pool URLs:
	// for agents started on pool hosts by a controller that is not on the
	// simulator. Sessions are pool-wide; xapi forwards to the coordinator.
	HostXAPI bool
	// Catalog lists the backends the agents can run (default: those in
	// PluginDir on this machine, where local agents run).
	Catalog engine.Catalog
	// TaskLinger: engine Deps.TaskLinger (0 destroys the finished task at
	// once, negative keeps it).
	TaskLinger time.Duration
}

// buildEngine returns the engine for one CLI invocation and a cleanup
// function to call when done (it stops what the wiring started, never the
// pools' sessions, which the caller owns).
func buildEngine(ctx context.Context, o engineOpts) (*engine.Engine, func(), error) {
	log := o.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	src, dst := xapiadapt.NewPool(o.Source, log), xapiadapt.NewPool(o.Dest, log)
	d := engine.Deps{
		Source: src, Dest: dst, Tasks: xapiadapt.NewTasks(o.Source),
		Catalog: o.Catalog,
		Store:   o.Store, Logger: log, Observe: o.Observe, TaskLinger: o.TaskLinger,
		Pause:    xapiadapt.SimPauseMeter{Dest: o.Dest},
		Throttle: xapiadapt.NewThrottle(o.Source, log),
	}
	if d.Catalog == nil {
		d.Catalog = pluginCatalog{dirs: host.SearchDirs(o.PluginDir)}
	}
	if o.Simulator {
		d.Integrity = xapiadapt.SimIntegrity{Dest: o.Dest}
	}
	cleanup := func() {}
	if o.DryRun {
		d.Storage, d.Gateway, d.Agents = unavailableStorage{}, unavailableGateway{}, unavailableAgents{}
	} else {
		dp, clean, err := dataPath(ctx, o, log)
		if err != nil {
			return nil, nil, err
		}
		d.Storage, d.Network, d.Gateway, d.Agents = dp.Storage, dp.Network, dp.Gateway, dp.Agents
		cleanup = clean
	}
	e, err := engine.New(d)
	if err != nil {
		cleanup()
		return nil, nil, err
	}
	return e, cleanup, nil
}

// dataPathDeps are the engine dependencies the site agents provide.
type dataPathDeps struct {
	Storage engine.StorageBackend
	Network engine.NetworkBackend
	Gateway engine.Gateway
	Agents  engine.Agents
}

// dataPath builds the agents, storage, network and gateway drivers: an
// agentclient.Client whose launcher is o.Launcher, by default a
// LocalLauncher running `wanmotion agent` (this binary) on this machine for
// both sites, with their state under <state-dir>/agents-run. Backends get
// the controller's xapi sessions.
func dataPath(_ context.Context, o engineOpts, log hclog.Logger) (dataPathDeps, func(), error) {
	if o.StateDir == "" {
		return dataPathDeps{}, nil, fmt.Errorf("%w: no state directory", errNoAgents)
	}
	cfg := agentclient.Config{Launcher: o.Launcher, StateDir: o.StateDir}
	if cfg.Launcher == nil {
		bin, args := o.AgentBinary, o.AgentArgs
		if bin == "" {
			bin, args = agentExec.binary, agentExec.args
		}
		cfg.Launcher = &agentclient.LocalLauncher{Binary: bin, Args: args, Dir: filepath.Join(o.StateDir, "agents-run"),
			StartTimeout: agentExec.startTimeout}
		pluginDir := host.InstallDir(o.PluginDir)
		if abs, err := filepath.Abs(pluginDir); err == nil {
			pluginDir = abs
		}
		cfg.PluginDir, cfg.AgentStateDir = pluginDir, filepath.Join(o.StateDir, "agents-state")
	}
	cfg.SourceXAPI = xapiAccess(o.Source, o.Store, contract.RoleSource, o.HostXAPI)
	cfg.DestXAPI = xapiAccess(o.Dest, o.Store, contract.RoleDestination, o.HostXAPI)
	cfg.UUIDOf = func(ctx context.Context, site contract.Role, ref string) (string, error) {
		if site == contract.RoleSource {
			return uuidOf(ctx, o.Source, ref)
		}
		return uuidOf(ctx, o.Dest, ref)
	}
	cfg.BridgeOf = func(ctx context.Context, site contract.Role, ref string) (string, error) {
		c := o.Source
		if site == contract.RoleDestination {
			c = o.Dest
		}
		rec, err := c.NetworkGetRecord(ctx, xapi.NetworkRef(ref))
		if err != nil {
			return "", fmt.Errorf("network.get_record %s: %w", ref, err)
		}
		return rec.Bridge, nil
	}
	cfg.Logger = log
	c, err := agentclient.New(cfg)
	if err != nil {
		return dataPathDeps{}, nil, err
	}
	return dataPathDeps{Storage: c.Storage(), Network: c.Network(), Gateway: c.Gateway(), Agents: c},
		func() { _ = c.Close() }, nil
}

// xapiAccess gives the backends of one site the controller's session and
// the uuid of the host the migration uses there (from the checkpoint).
// The address is the controller's: its pool URL, or unix://<socket> for a
// client of a local socket (the agents run on this machine then); with
// hostXAPI, the local socket of the host the backend runs on.
func xapiAccess(c *xapi.Client, store engine.Store, role contract.Role, hostXAPI bool) agentclient.XAPIFunc {
	return func(ctx context.Context, migrationID string) (contract.XAPIAccess, error) {
		url := c.URL()
		switch {
		case hostXAPI:
			url = xapi.SocketURL(xapi.LocalSocket)
		case c.Socket() != "":
			url = xapi.SocketURL(c.Socket())
		}
		acc := contract.XAPIAccess{URL: url, Session: contract.Secret(string(c.Session()))}
		if strings.HasPrefix(url, "https:") {
			// the backend trusts exactly the certificate this controller
			// verified (CA, pin or --insecure): self-signed pools work
			acc.TLSPin = c.PeerCertificatePEM()
		}
		cp, err := store.Load(ctx, migrationID)
		if err != nil {
			return acc, err
		}
		hostRef := cp.SourceHost
		if role == contract.RoleDestination {
			hostRef = cp.DestHost
		}
		if hostRef != "" {
			h, err := c.HostGetRecord(ctx, xapi.HostRef(hostRef))
			if err != nil {
				return acc, fmt.Errorf("host %s: %w", hostRef, err)
			}
			acc.HostUUID = h.UUID
		}
		return acc, nil
	}
}

// uuidOf resolves a VDI, SR or network ref to its uuid.
func uuidOf(ctx context.Context, c *xapi.Client, ref string) (string, error) {
	var errs []error
	for _, cls := range []string{"VDI", "SR", "network"} {
		var u string
		err := c.CallInto(ctx, &u, cls+".get_uuid", ref)
		if err == nil {
			return u, nil
		}
		if !xapi.IsCode(err, xapi.CodeHandleInvalid) {
			return "", err
		}
		errs = append(errs, err)
	}
	return "", fmt.Errorf("uuid of %s: %w", ref, errors.Join(errs...))
}

// unavailable* stand in for the data-path dependencies of a dry-run
// engine: Plan never calls them; anything else fails with errNoAgents.
type (
	unavailableStorage struct{}
	unavailableAgents  struct{}
	unavailableGateway struct{}
)

func (unavailableStorage) PrepareReceiver(context.Context, engine.ReceiverSpec) (engine.ReceiverInfo, error) {
	return engine.ReceiverInfo{}, errNoAgents
}
func (unavailableStorage) PrepareSender(context.Context, engine.SenderSpec) ([]byte, error) {
	return nil, errNoAgents
}
func (unavailableStorage) SyncRound(context.Context, engine.SyncSpec) (engine.SyncResult, error) {
	return engine.SyncResult{}, errNoAgents
}
func (unavailableStorage) SyncStatus(context.Context, engine.DiskKey) (engine.SyncStatus, error) {
	return engine.SyncStatus{}, errNoAgents
}
func (unavailableStorage) Finalize(context.Context, engine.DiskKey) ([]byte, error) {
	return nil, errNoAgents
}
func (unavailableStorage) RecoverReceiver(context.Context, engine.DiskKey, []byte) (engine.ReceiverInfo, error) {
	return engine.ReceiverInfo{}, errNoAgents
}
func (unavailableStorage) RecoverSender(context.Context, engine.DiskKey, []byte, engine.Peer) error {
	return errNoAgents
}
func (unavailableStorage) Abort(context.Context, engine.DiskKey) error { return errNoAgents }
func (unavailableStorage) Cleanup(context.Context, engine.DiskKey, []byte, []byte) error {
	return errNoAgents
}
func (unavailableAgents) Start(context.Context, engine.AgentSpec) error { return errNoAgents }
func (unavailableAgents) Stop(context.Context, string) error            { return errNoAgents }
func (unavailableGateway) Start(context.Context, engine.GatewaySpec) error {
	return errNoAgents
}
func (unavailableGateway) Forward(context.Context, string, string) (string, error) {
	return "", errNoAgents
}
func (unavailableGateway) Stats(context.Context, string) (engine.GatewayStats, error) {
	return engine.GatewayStats{}, errNoAgents
}
func (unavailableGateway) Stop(context.Context, string) error { return errNoAgents }

var (
	_ engine.StorageBackend = unavailableStorage{}
	_ engine.Agents         = unavailableAgents{}
	_ engine.Gateway        = unavailableGateway{}
)

// isSimulator reports whether c talks to xapisim (its hosts say so in
// software_version).
func isSimulator(ctx context.Context, c *xapi.Client) bool {
	hosts, err := c.HostGetAllRecords(ctx)
	if err != nil {
		return false
	}
	for _, h := range hosts {
		if h.SoftwareVersion["wanmotion_simulator"] == "true" {
			return true
		}
	}
	return false
}
