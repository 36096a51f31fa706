package main

// The engine's wiring for the CLI: pool adapters, checkpoint store,
// backend catalog, and (when this build has them) the site agents, storage
// and network backends and the WAN gateway.

import (
	"context"
	"errors"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/xapi"
)

// errNoAgents: this build cannot run the data path.
var errNoAgents = errors.New("site agents are not available in this build")

// pluginCatalog implements engine.Catalog from the backend binaries found
// on disk (plugins/host discovery; the binaries are not launched).
type pluginCatalog struct {
	dirs []string
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
		Catalog: pluginCatalog{dirs: host.SearchDirs(o.PluginDir)},
		Store:   o.Store, Logger: log, Observe: o.Observe,
		Pause: xapiadapt.SimPauseMeter{Dest: o.Dest},
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
		d.Storage, d.Network, d.Gateway, d.Agents, d.Throttle = dp.Storage, dp.Network, dp.Gateway, dp.Agents, dp.Throttle
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
	Storage  engine.StorageBackend
	Network  engine.NetworkBackend
	Gateway  engine.Gateway
	Agents   engine.Agents
	Throttle engine.GuestThrottle
}

// dataPath builds the agents, storage, network and gateway drivers.
// This build has none (the agent client is not part of it yet).
func dataPath(_ context.Context, _ engineOpts, _ hclog.Logger) (dataPathDeps, func(), error) {
	return dataPathDeps{}, nil, errNoAgents
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
