package main

// The host-plugin entry: xapi runs /etc/xapi.d/plugins/wanmotion (a link
// to this binary) with one argument, an XML-RPC methodCall (xenapi-facts
// §2); the answer goes to stdout as a Status/Value methodResponse and the
// process exits 0, also for failures (Status/Failure with our codes, which
// the XenAPI caller sees as the API error). Long work (a migration) runs in
// a detached controller process (hostplugin_worker.go).

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/agent/agentclient"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapiplugin"
)

// Plugin functions (host.call_plugin(host, "wanmotion", fn, args)).
const (
	fnMigrate   = "migrate"
	fnStatus    = "status"
	fnCancel    = "cancel"
	fnResume    = "resume"
	fnPlan      = "plan"
	fnConfigGet = "config-get"
	fnConfigSet = "config-set"
	fnVersion   = "version"
	fnThrottle  = hostplugin.FnThrottle // "throttle": a guest's Xen scheduler cap (hostplugin_throttle.go)
)

// pluginArgv0 is the plugin's path as xapi ran it (not resolved: the link
// in <etc>/xapi.d/plugins names the host's etc).
var pluginArgv0 = func() string { return os.Args[0] }

// pluginError is a plugin failure with its API error code.
type pluginError struct {
	code   string
	params []string
	err    error
}

func (e *pluginError) Error() string { return e.err.Error() }
func (e *pluginError) Unwrap() error { return e.err }

func perr(code string, err error, params ...string) error {
	return &pluginError{code: code, err: err, params: params}
}

func invalidArg(format string, a ...any) error {
	return perr(hostplugin.CodeInvalidArgument, fmt.Errorf("%w: "+format, append([]any{hostplugin.ErrInvalidArgument}, a...)...))
}

// errorDescription is [code, message, extra params...] for err.
func errorDescription(err error) (string, []string) {
	var pe *pluginError
	if errors.As(err, &pe) {
		return pe.code, append([]string{pe.err.Error()}, pe.params...)
	}
	return pluginCode(err), []string{err.Error()}
}

// pluginCode maps an error onto our API error codes.
func pluginCode(err error) string {
	var pe *pluginError
	switch {
	case errors.As(err, &pe):
		return pe.code
	case errors.Is(err, hostplugin.ErrInvalidArgument), errors.Is(err, errUsage), errors.Is(err, engine.ErrConfig):
		return hostplugin.CodeInvalidArgument
	case errors.Is(err, engine.ErrUnknownBackend):
		return hostplugin.CodeBackendNotFound
	case errors.Is(err, engine.ErrNotFound), errors.Is(err, os.ErrNotExist):
		return hostplugin.CodeNotFound
	case errors.Is(err, errNoAgents), errors.Is(err, hostplugin.ErrNoXapi):
		return hostplugin.CodeUnavailable
	}
	var te *xapi.TransportError
	if errors.As(err, &te) {
		return hostplugin.CodeUnavailable
	}
	return hostplugin.CodeInternal
}

// hostPluginEntry runs the binary as xapi's host plugin when args is one
// methodCall, or as the detached controller the plugin starts. ok is false
// for anything else (the CLI).
func hostPluginEntry(ctx context.Context, args []string, stdout, stderr io.Writer) (code int, ok bool) {
	if len(args) == 2 && args[0] == workerMarker {
		return runPluginWorker(ctx, args[1], os.Stdin, stderr), true
	}
	if len(args) != 1 || !xapiplugin.LooksLikeCall(args[0]) {
		return 0, false
	}
	call, err := xapiplugin.ParseCall(args[0])
	if err != nil {
		_, _ = stdout.Write(xapiplugin.Failure(hostplugin.CodeInvalidArgument, err.Error()))
		return 0, true
	}
	out, err := servePluginSafe(ctx, call, stderr)
	if err != nil {
		code, params := errorDescription(err)
		_, _ = stdout.Write(xapiplugin.Failure(code, params...))
		return 0, true
	}
	_, _ = stdout.Write(xapiplugin.Success(out))
	return 0, true
}

// servePluginSafe turns a panic into WANMOTION_INTERNAL: xapi must always
// get a methodResponse (a crash would be XENAPI_PLUGIN_FAILURE with our
// stderr).
func servePluginSafe(ctx context.Context, call xapiplugin.Call, stderr io.Writer) (out string, err error) {
	defer func() {
		if r := recover(); r != nil {
			fmt.Fprintf(stderr, "wanmotion plugin: panic in %s: %v\n", call.Method, r)
			out, err = "", perr(hostplugin.CodeInternal, fmt.Errorf("internal error in %s: %v", call.Method, r))
		}
	}()
	return servePlugin(ctx, call, stderr)
}

// pluginCall is one plugin invocation with its environment.
type pluginCall struct {
	call   xapiplugin.Call
	env    hostplugin.Env
	cfg    hostplugin.Config
	binary string // this executable, resolved
	log    hclog.Logger
}

func servePlugin(ctx context.Context, call xapiplugin.Call, stderr io.Writer) (string, error) {
	env, err := hostplugin.Discover(pluginArgv0())
	if err != nil {
		return "", perr(hostplugin.CodeInternal, err)
	}
	bin, err := os.Executable()
	if err != nil {
		return "", perr(hostplugin.CodeInternal, fmt.Errorf("own executable: %w", err))
	}
	cfg, err := hostplugin.LoadConfig(hostplugin.ConfigCandidates(env.EtcDir, bin))
	if err != nil {
		return "", perr(hostplugin.CodeInternal, err)
	}
	p := &pluginCall{call: call, env: env, cfg: cfg, binary: bin,
		log: hclog.New(&hclog.LoggerOptions{Name: "wanmotion-plugin", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr})}
	fns := map[string]func(context.Context) (string, error){
		fnVersion: p.version, fnConfigGet: p.configGet, fnConfigSet: p.configSet,
		fnMigrate: p.migrate, fnPlan: p.plan, fnStatus: p.status, fnCancel: p.cancel,
		fnResume: p.resume, fnHookRelease: p.hookRelease, fnThrottle: p.throttle,
		hostplugin.FnAgentStart: p.agentStart, hostplugin.FnAgentStop: p.agentStop,
	}
	fn, ok := fns[call.Method]
	if !ok {
		names := make([]string, 0, len(fns))
		for n := range fns {
			names = append(names, n)
		}
		sort.Strings(names)
		return "", perr(hostplugin.CodeUnknownFunction, fmt.Errorf("unknown function %q (functions: %s)", call.Method, strings.Join(names, ", ")), call.Method)
	}
	p.log.Debug("plugin call", "fn", call.Method, "host_uuid", env.HostUUID, "simulator", env.Sim)
	return fn(ctx)
}

// checkArgs refuses argument names outside allowed.
func (p *pluginCall) checkArgs(allowed ...string) error {
	for k := range p.call.Args {
		if !contains(allowed, k) {
			sort.Strings(allowed)
			return invalidArg("unknown argument %q for %s (arguments: %s)", k, p.call.Method, strings.Join(allowed, ", "))
		}
	}
	return nil
}

func contains(l []string, s string) bool {
	for _, v := range l {
		if v == s {
			return true
		}
	}
	return false
}

// pool is this host's pool, with the caller's session (borrowed; close
// with the returned function, which never logs it out).
func (p *pluginCall) pool() (*xapi.Client, func(), error) {
	c, err := p.env.Client(p.call.Session, p.log)
	if err != nil {
		return nil, nil, err
	}
	return c, func() {
		c.Forget()
		_ = c.Close(context.Background())
	}, nil
}

func jsonString(v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", perr(hostplugin.CodeInternal, err)
	}
	return string(b), nil
}

// pluginVersion is version's result.
type pluginVersion struct {
	Version   string `json:"version"`
	Protocol  string `json:"protocol"`
	GoVersion string `json:"go_version"`
	Simulator bool   `json:"simulator"`
	HostUUID  string `json:"host_uuid,omitempty"`
	Config    string `json:"config_file,omitempty"`
	StateDir  string `json:"state_dir"`
	PluginDir string `json:"plugin_dir"`
	// Backends are the backends installed in PluginDir on this host
	// (absent when discovery failed: BackendsError says why).
	Backends      *engine.Installed `json:"backends,omitempty"`
	BackendsError string            `json:"backends_error,omitempty"`
}

func (p *pluginCall) version(context.Context) (string, error) {
	if err := p.checkArgs(); err != nil {
		return "", err
	}
	v := pluginVersion{Version: version, Protocol: "1", GoVersion: runtime.Version(), Simulator: p.env.Sim,
		HostUUID: p.env.HostUUID, Config: p.cfg.Path, StateDir: p.cfg.StateDir, PluginDir: p.cfg.PluginDir}
	if inst, err := installedBackends(p.cfg.PluginDir); err != nil {
		v.BackendsError = err.Error()
	} else {
		v.Backends = &inst
	}
	return jsonString(v)
}

// ---- config-get / config-set ----

func (p *pluginCall) thisPool(ctx context.Context) (*xapiadapt.Pool, func(), error) {
	c, closeFn, err := p.pool()
	if err != nil {
		return nil, nil, err
	}
	return xapiadapt.NewPool(c, p.log), closeFn, nil
}

func (p *pluginCall) configGet(ctx context.Context) (string, error) {
	if err := p.checkArgs(); err != nil {
		return "", err
	}
	pl, closeFn, err := p.thisPool(ctx)
	if err != nil {
		return "", err
	}
	defer closeFn()
	v, err := readPoolView(ctx, pl, pl.Client().URL())
	if err != nil {
		return "", err
	}
	return jsonString(v)
}

// Arguments of config-set: absent = unchanged, empty = remove.
const (
	argStorage = "storage"
	argNetwork = "network"
	argConfig  = "config"
)

func (p *pluginCall) configSet(ctx context.Context) (string, error) {
	if err := p.checkArgs(argStorage, argNetwork, argConfig); err != nil {
		return "", err
	}
	if len(p.call.Args) == 0 {
		return "", invalidArg("nothing to set: give storage, network and/or config")
	}
	storage, setStorage := p.call.Args[argStorage]
	network, setNetwork := p.call.Args[argNetwork]
	cfgJSON, setConfig := p.call.Args[argConfig]
	storage, network = strings.TrimSpace(storage), strings.TrimSpace(network)
	if setConfig && strings.TrimSpace(cfgJSON) != "" {
		if _, err := engine.ParseConfigJSON(cfgJSON); err != nil {
			return "", perr(hostplugin.CodeInvalidArgument, err)
		}
	}
	inst, err := installedBackends(p.cfg.PluginDir)
	if err != nil {
		return "", err
	}
	if err := checkBackendNames(inst, setStorage, storage, setNetwork, network); err != nil {
		return "", err
	}
	pl, closeFn, err := p.thisPool(ctx)
	if err != nil {
		return "", err
	}
	defer closeFn()
	c := pl.Client()
	pool, err := c.ThePool(ctx)
	if err != nil {
		return "", err
	}
	cur, err := c.PoolGetOtherConfig(ctx, pool)
	if err != nil {
		return "", err
	}
	entries, err := newPoolEntries(cur, setStorage, storage, setNetwork, network, setConfig, cfgJSON, nil)
	if err != nil {
		return "", err
	}
	keys := make([]string, 0, len(entries))
	for k := range entries {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if cur[k] == entries[k] {
			continue
		}
		if err := c.PoolRemoveFromOtherConfig(ctx, pool, k); err != nil {
			return "", err
		}
		if entries[k] == "" {
			continue
		}
		if err := c.PoolAddToOtherConfig(ctx, pool, k, entries[k]); err != nil {
			return "", err
		}
	}
	p.log.Info("pool configuration changed", "keys", strings.Join(keys, ","))
	v, err := readPoolView(ctx, pl, c.URL())
	if err != nil {
		return "", err
	}
	return jsonString(v)
}

// ---- agent-start / agent-stop ----

func (p *pluginCall) agentLauncher() *agentclient.LocalLauncher {
	return &agentclient.LocalLauncher{Binary: p.binary, Dir: filepath.Join(p.cfg.StateDir, "agents"),
		Env: []string{"PATH=" + os.Getenv("PATH")}}
}

func (p *pluginCall) agentStart(ctx context.Context) (string, error) {
	if err := p.checkArgs(hostplugin.ArgMigrationID, hostplugin.ArgRole, hostplugin.ArgControlListen, hostplugin.ArgPluginDir,
		hostplugin.ArgStateDir, hostplugin.ArgIdleTimeout, hostplugin.ArgTLS); err != nil {
		return "", err
	}
	spec, err := hostplugin.ParseAgentStart(p.call.Args)
	if err != nil {
		return "", err
	}
	if spec.ControlListen == "" {
		spec.ControlListen = p.cfg.AgentListen
	}
	if spec.PluginDir == "" {
		spec.PluginDir = p.cfg.PluginDir
	}
	addr, err := p.agentLauncher().Launch(ctx, spec)
	if err != nil {
		return "", perr(hostplugin.CodeUnavailable, err)
	}
	if addr, err = p.reachable(ctx, addr); err != nil {
		return "", err
	}
	p.log.Info("site agent started", "migration_id", spec.MigrationID, "role", spec.Role, "control", addr)
	return jsonString(hostplugin.AgentStarted{Control: addr, Host: p.env.HostUUID})
}

// reachable replaces an unspecified listen host (0.0.0.0, ::) with this
// host's management address (host.address).
func (p *pluginCall) reachable(ctx context.Context, addr string) (string, error) {
	h, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", perr(hostplugin.CodeInternal, fmt.Errorf("agent control address %q: %w", addr, err))
	}
	ip := net.ParseIP(h)
	if h != "" && (ip == nil || !ip.IsUnspecified()) {
		return addr, nil
	}
	c, closeFn, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeFn()
	ref, err := c.HostGetByUUID(ctx, p.env.HostUUID)
	if err != nil {
		return "", fmt.Errorf("this host (%s): %w", p.env.HostUUID, err)
	}
	rec, err := c.HostGetRecord(ctx, ref)
	if err != nil {
		return "", err
	}
	return net.JoinHostPort(rec.Address, port), nil
}

func (p *pluginCall) agentStop(ctx context.Context) (string, error) {
	if err := p.checkArgs(hostplugin.ArgMigrationID, hostplugin.ArgRole); err != nil {
		return "", err
	}
	var spec agentclient.AgentLaunchSpec
	if err := hostplugin.ParseAgentID(p.call.Args, &spec); err != nil {
		return "", err
	}
	if err := p.agentLauncher().Stop(ctx, spec); err != nil {
		return "", err
	}
	return jsonString(map[string]any{"stopped": true, "migration_id": spec.MigrationID, "role": spec.Role})
}
