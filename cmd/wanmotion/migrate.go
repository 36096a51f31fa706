package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/term"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/xapi"
)

const migrateUsage = `Usage:
  wanmotion migrate --vm NAME|UUID --from URL --to URL [flags]   start a migration
  wanmotion migrate status [ID] [--json] [--state-dir D]         show one or all migrations
  wanmotion migrate cancel ID [--state-dir D]                    roll back (before handoff, or after a failed one)
  wanmotion migrate resume ID [--json] [--state-dir D]           continue after a crash or failure

Passwords: $WANMOTION_FROM_PASSWORD / $WANMOTION_TO_PASSWORD, a credentials
file (--credentials, default ~/.config/wanmotion/credentials, mode 0600) or a
prompt on the terminal; never from a flag.

Exit codes: 0 success, 1 failed, 2 usage, 3 cancelled. See docs/cli.md.

Flags:`

// Exit codes of migrate (docs/cli.md).
const (
	exitFailed    = 1
	exitUsage     = 2
	exitCancelled = 3
)

// exitError carries a process exit code (realMain uses ExitCode when the
// error has one).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

// ExitCode is the process exit code for this error.
func (e *exitError) ExitCode() int { return e.code }

// migrateFlags are the flags of `wanmotion migrate`.
type migrateFlags struct {
	vm, from, to, fromUser, toUser, credentials string
	destSR, destHost                            string
	networkMap                                  stringList
	storage, network, bandwidth, compression    string
	rtt, downtimeTarget                         time.Duration
	streams, throttleMax                        int
	policy                                      string
	stateDir, pluginDir                         string
	gatewayListen, gatewayAdvertise             string
	id, logLevel, agents                        string
	dryRun, asJSON, skipAssert                  bool
	taskLinger                                  time.Duration
	tls                                         tlsFlags
	given                                       map[string]bool
}

func defaultStateDir() string {
	if d := os.Getenv("WANMOTION_STATE_DIR"); d != "" {
		return d
	}
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "wanmotion")
	}
	if h, err := os.UserHomeDir(); err == nil {
		return filepath.Join(h, ".local", "state", "wanmotion")
	}
	return "wanmotion-state"
}

func newMigrateFlagSet(stderr io.Writer) (*flag.FlagSet, *migrateFlags) {
	fs := flag.NewFlagSet("migrate", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &migrateFlags{}
	fs.StringVar(&f.vm, "vm", "", "VM to move: name label or UUID (required)")
	fs.StringVar(&f.from, "from", "", "source pool coordinator URL (required)")
	fs.StringVar(&f.to, "to", "", "destination pool coordinator URL (required)")
	fs.StringVar(&f.fromUser, "from-user", "root", "source pool user")
	fs.StringVar(&f.toUser, "to-user", "root", "destination pool user")
	fs.StringVar(&f.credentials, "credentials", "", "credentials file (default ~/.config/wanmotion/credentials)")
	fs.StringVar(&f.destSR, "dest-sr", "", "destination SR for all disks: name or UUID (default pool.default_SR)")
	fs.StringVar(&f.destHost, "dest-host", "", "destination host: name or UUID (default the pool coordinator)")
	fs.Var(&f.networkMap, "network-map", "SRC=DST network mapping by name or UUID, SRC may be * (repeatable; default: same name)")
	fs.StringVar(&f.storage, "storage", "", "storage backend (overrides the pools' wanmotion:storage)")
	fs.StringVar(&f.network, "network", "", "network backend, or none (overrides wanmotion:network)")
	fs.StringVar(&f.bandwidth, "bandwidth", "", "WAN bandwidth cap, e.g. 200Mbit, 1Gbps, 50MB/s, unlimited")
	fs.StringVar(&f.compression, "compression", "", "WAN compression: zstd or none")
	fs.DurationVar(&f.rtt, "rtt", 0, "WAN round-trip time for the plan, e.g. 50ms")
	fs.IntVar(&f.streams, "streams", 0, "parallel WAN streams (1..256)")
	fs.DurationVar(&f.downtimeTarget, "downtime-target", 0, "target guest pause, e.g. 500ms")
	fs.StringVar(&f.policy, "policy", "", "when the guest writes faster than the link: keep-going, throttle or stop")
	fs.IntVar(&f.throttleMax, "throttle-max", 0, "policy throttle: slow the guest's vCPUs by at most this percent (1..99, default 90)")
	fs.StringVar(&f.stateDir, "state-dir", defaultStateDir(), "checkpoint directory")
	fs.StringVar(&f.pluginDir, "plugin-dir", "", "backend install directory (default $"+host.EnvPluginDir+" or "+host.DefaultInstallDir+")")
	fs.StringVar(&f.gatewayListen, "gateway-listen", "", "destination gateway listen address host:port")
	fs.StringVar(&f.gatewayAdvertise, "gateway-advertise", "", "address the source dials to reach the gateway, host:port")
	fs.StringVar(&f.id, "id", "", "migration id (default generated)")
	fs.StringVar(&f.logLevel, "log-level", "warn", "log level for stderr")
	fs.BoolVar(&f.dryRun, "dry-run", false, "print the plan (estimated duration and guest pause) and exit")
	fs.BoolVar(&f.asJSON, "json", false, "print exactly one JSON object (the report) on stdout")
	fs.BoolVar(&f.skipAssert, "skip-assert", false, "do not call host.migrate_receive / VM.assert_can_migrate while planning")
	fs.StringVar(&f.agents, "agents", agentsLocal, "where the site agents (and the data path) run: local (on this machine, for both sites) or hosts (on the VM's host and the destination host, started through the wanmotion host plugin: the data goes host to host, not through this machine)")
	fs.DurationVar(&f.taskLinger, "task-linger", 0, "keep the finished xapi task this long before destroying it (XenCenter then shows it complete); negative: keep it for xapi's task GC")
	f.tls.register(fs)
	fs.Usage = func() {
		fmt.Fprintln(stderr, migrateUsage)
		fs.PrintDefaults()
	}
	return fs, f
}

// parseMigrateFlags parses and checks the flags of a new migration. The
// returned error wraps errUsage for bad input (naming the flag).
func parseMigrateFlags(args []string, stderr io.Writer) (*migrateFlags, engine.Overrides, error) {
	var o engine.Overrides
	if err := refusePasswordFlags(args, EnvFromPassword, EnvToPassword); err != nil {
		return nil, o, err
	}
	fs, f := newMigrateFlagSet(stderr)
	if err := parseFlags(fs, args); err != nil {
		return nil, o, err
	}
	f.given = map[string]bool{}
	fs.Visit(func(fl *flag.Flag) { f.given[fl.Name] = true })
	if err := checkLogLevel(f.logLevel); err != nil {
		return nil, o, err
	}
	for _, req := range []struct{ name, v string }{{"vm", f.vm}, {"from", f.from}, {"to", f.to}} {
		if req.v == "" {
			return nil, o, fmt.Errorf("%w: --%s is required", errUsage, req.name)
		}
	}
	for _, u := range []struct{ name, v string }{{"from", f.from}, {"to", f.to}} {
		if _, err := xapi.New(xapi.Config{URL: u.v}); err != nil {
			return nil, o, fmt.Errorf("%w: --%s %q: %v (give the pool coordinator's URL, e.g. https://pool-a.example.com)", errUsage, u.name, u.v, err)
		}
	}
	if strings.TrimRight(f.from, "/") == strings.TrimRight(f.to, "/") {
		return nil, o, fmt.Errorf("%w: --from and --to are the same pool; wanmotion moves VMs between pools", errUsage)
	}
	if err := f.tls.check(); err != nil {
		return nil, o, err
	}
	if f.id != "" && !engine.ValidMigrationID(f.id) {
		return nil, o, fmt.Errorf("%w: --id %q: letters, digits, '.', '_' and '-' only", errUsage, f.id)
	}
	for _, m := range f.networkMap {
		a, b, ok := strings.Cut(m, "=")
		if !ok || a == "" || b == "" {
			return nil, o, fmt.Errorf("%w: --network-map %q: want SRC=DST", errUsage, m)
		}
	}
	if f.given["storage"] {
		if f.storage == "" {
			return nil, o, fmt.Errorf("%w: --storage: empty backend name", errUsage)
		}
		o.Storage = &f.storage
	}
	if f.given["network"] {
		if f.network == "" {
			return nil, o, fmt.Errorf("%w: --network: empty backend name (use none)", errUsage)
		}
		o.Network = &f.network
	}
	if f.given["bandwidth"] {
		bw, err := engine.ParseBandwidth(f.bandwidth)
		if err != nil {
			return nil, o, fmt.Errorf("%w: --bandwidth: %v", errUsage, err)
		}
		o.BandwidthBytesPerSec = &bw
	}
	if f.given["compression"] {
		if f.compression != "zstd" && f.compression != "none" {
			return nil, o, fmt.Errorf("%w: --compression %q: want zstd or none", errUsage, f.compression)
		}
		o.Compression = &f.compression
	}
	if f.given["rtt"] && f.rtt < 0 {
		return nil, o, fmt.Errorf("%w: --rtt must not be negative", errUsage)
	}
	if f.given["streams"] {
		if f.streams < 1 || f.streams > 256 {
			return nil, o, fmt.Errorf("%w: --streams %d: want 1..256", errUsage, f.streams)
		}
		o.Streams = &f.streams
	}
	if f.given["downtime-target"] {
		if f.downtimeTarget <= 0 {
			return nil, o, fmt.Errorf("%w: --downtime-target must be positive", errUsage)
		}
		o.DowntimeTarget = &f.downtimeTarget
	}
	if f.agents != agentsLocal && f.agents != agentsHosts {
		return nil, o, fmt.Errorf("%w: --agents %q: want local or hosts", errUsage, f.agents)
	}
	if f.given["policy"] {
		p, err := engine.ParsePolicy(f.policy)
		if err != nil {
			return nil, o, fmt.Errorf("%w: --policy: %v", errUsage, err)
		}
		o.Policy = &p
	}
	if f.given["throttle-max"] {
		if f.throttleMax < 1 || f.throttleMax > 99 {
			return nil, o, fmt.Errorf("%w: --throttle-max %d: want 1..99 (percent)", errUsage, f.throttleMax)
		}
		o.ThrottleMax = &f.throttleMax
	}
	for _, g := range []struct {
		name string
		v    *string
		dst  **string
	}{{"gateway-listen", &f.gatewayListen, &o.GatewayListen}, {"gateway-advertise", &f.gatewayAdvertise, &o.GatewayAdvertise}} {
		if !f.given[g.name] {
			continue
		}
		i := strings.LastIndex(*g.v, ":")
		if i < 0 || i == len(*g.v)-1 {
			return nil, o, fmt.Errorf("%w: --%s %q: want host:port", errUsage, g.name, *g.v)
		}
		*g.dst = g.v
	}
	return f, o, nil
}

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "status":
			return migrateStatus(ctx, args[1:], stdout, stderr)
		case "cancel":
			return migrateCancel(ctx, args[1:], stdout, stderr)
		case "resume":
			return migrateResume(ctx, args[1:], stdout, stderr)
		case "-h", "--help", "help":
			fs, _ := newMigrateFlagSet(stdout)
			fs.SetOutput(stdout)
			fs.Usage()
			return nil
		}
		if !strings.HasPrefix(args[0], "-") {
			return fmt.Errorf("%w: unknown migrate command %q: want status, cancel or resume, or flags (--vm, --from, --to ...) to start a migration", errUsage, args[0])
		}
	}
	f, o, err := parseMigrateFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	m := &migration{f: f, overrides: o, stdout: stdout, stderr: stderr}
	err = m.run(ctx)
	if f.asJSON && !m.printed {
		m.printFailure(err)
	}
	return err
}

// migration is one run of `wanmotion migrate`.
type migration struct {
	f              *migrateFlags
	overrides      engine.Overrides
	stdout, stderr io.Writer
	printed        bool // the JSON object was printed
	vmUUID         string
	id             string
}

// connInfo is saved next to a checkpoint (<id>.conn.json, no passwords) so
// that status/cancel/resume know the pools.
type connInfo struct {
	From        string   `json:"from"`
	To          string   `json:"to"`
	FromUser    string   `json:"from_user"`
	ToUser      string   `json:"to_user"`
	Credentials string   `json:"credentials,omitempty"`
	Insecure    bool     `json:"insecure,omitempty"`
	CAFile      string   `json:"ca_file,omitempty"`
	Thumbprints []string `json:"thumbprints,omitempty"`
	PluginDir   string   `json:"plugin_dir,omitempty"`
	// Agents is where the site agents run: "local" ("" in older files) or
	// "hosts" (started on the pools' hosts through the host plugin).
	Agents string `json:"agents,omitempty"`
}

// Where the site agents of a CLI-run migration run (--agents).
const (
	agentsLocal = "local"
	agentsHosts = "hosts"
)

// agentPlacement sets the engine options for where the site agents run:
// hosts starts them on the VM's host and the destination host through the
// pools' host plugin (agent-start) and gives their backends that host's
// own xapi socket (the simulator's hosts share the pools' URLs instead).
func agentPlacement(o *engineOpts, agents string, log hclog.Logger) {
	if agents != agentsHosts {
		return
	}
	o.Launcher = &hostplugin.PluginLauncher{Source: o.Source, Dest: o.Dest, HostListen: true, Logger: log}
	o.Catalog = hostsCatalog{src: o.Source, dst: o.Dest}
	o.HostXAPI = !o.Simulator
}

func connPath(stateDir, id string) string { return filepath.Join(stateDir, id+".conn.json") }

func saveConnInfo(stateDir, id string, ci connInfo) error {
	b, err := json.MarshalIndent(ci, "", "  ")
	if err != nil {
		return err
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	return os.WriteFile(connPath(stateDir, id), append(b, '\n'), 0o600)
}

func loadConnInfo(stateDir, id string) (connInfo, error) {
	var ci connInfo
	b, err := os.ReadFile(connPath(stateDir, id))
	if err != nil {
		return ci, fmt.Errorf("connection details of %s: %w", id, err)
	}
	if err := json.Unmarshal(b, &ci); err != nil {
		return ci, fmt.Errorf("connection details of %s: %w", id, err)
	}
	return ci, nil
}

// pools logs in to both pools.
type pools struct {
	src, dst *xapi.Client
}

func (p pools) close(ctx context.Context) {
	for _, c := range []*xapi.Client{p.src, p.dst} {
		if c != nil {
			_ = c.Close(context.WithoutCancel(ctx))
		}
	}
}

func openPools(ctx context.Context, ci connInfo, tf tlsFlags, logLevel string, stderr io.Writer) (pools, error) {
	var p pools
	log := newCLILogger(logLevel, stderr)
	fromPW, err := credSource{env: EnvFromPassword, file: ci.Credentials, fileGiven: ci.Credentials != "", label: "source pool"}.password(ci.From, ci.FromUser, stderr)
	if err != nil {
		return p, err
	}
	toPW, err := credSource{env: EnvToPassword, file: ci.Credentials, fileGiven: ci.Credentials != "", label: "destination pool"}.password(ci.To, ci.ToUser, stderr)
	if err != nil {
		return p, err
	}
	if p.src, err = connect(ctx, ci.From, ci.FromUser, fromPW, tf, log); err != nil {
		return p, err
	}
	if p.dst, err = connect(ctx, ci.To, ci.ToUser, toPW, tf, log); err != nil {
		p.close(ctx)
		return pools{}, err
	}
	return p, nil
}

func (m *migration) run(ctx context.Context) error {
	f := m.f
	ci := connInfo{From: f.from, To: f.to, FromUser: f.fromUser, ToUser: f.toUser, Credentials: f.credentials,
		Insecure: f.tls.insecure, CAFile: f.tls.caFile, Thumbprints: f.tls.thumbprints, PluginDir: f.pluginDir, Agents: f.agents}
	p, err := openPools(ctx, ci, f.tls, f.logLevel, m.stderr)
	if err != nil {
		return err
	}
	defer p.close(ctx)
	log := newCLILogger(f.logLevel, m.stderr)
	src, dst := xapiadapt.NewPool(p.src, log), xapiadapt.NewPool(p.dst, log)
	req, err := m.request(ctx, src, dst)
	if err != nil {
		return err
	}
	var store engine.Store = engine.NewMemStore()
	if !f.dryRun {
		fsStore, err := engine.NewFileStore(f.stateDir)
		if err != nil {
			return err
		}
		store = fsStore
	}
	tty := !f.asJSON && isTerminal(m.stderr)
	view := newProgressView(m.stderr, tty, nil)
	eo := engineOpts{Source: p.src, Dest: p.dst, Store: store, PluginDir: f.pluginDir,
		Logger: log, Observe: view.Observe, DryRun: f.dryRun, Simulator: isSimulator(ctx, p.dst), StateDir: f.stateDir,
		TaskLinger: f.taskLinger}
	agentPlacement(&eo, f.agents, log)
	eng, cleanup, err := buildEngine(ctx, eo)
	if err != nil {
		return err
	}
	defer cleanup()
	if f.dryRun {
		plan, err := eng.Plan(ctx, req)
		if err != nil {
			return err
		}
		srs := srNames(ctx, p.dst, plan)
		plan.SRLabels = map[string]string{}
		for ref, sr := range srs {
			plan.SRLabels[ref] = fmt.Sprintf("%s (%s)", sr.NameLabel, sr.UUID)
		}
		if f.asJSON {
			m.printed = true
			return writeJSON(m.stdout, planJSON(plan, srs))
		}
		fmt.Fprint(m.stdout, plan.Text())
		return nil
	}
	if err := saveConnInfo(f.stateDir, req.MigrationID, ci); err != nil {
		return err
	}
	if !f.asJSON {
		fmt.Fprintf(m.stderr, "migration %s: VM %s from %s to %s (state in %s)\n", req.MigrationID, req.VMUUID, f.from, f.to, f.stateDir)
	}
	rep, err := runWithSignals(ctx, eng, req.MigrationID, m.stderr, func(rctx context.Context) (engine.Report, error) {
		return eng.Run(rctx, req)
	})
	view.Done()
	return m.finish(rep, err)
}

// finish prints the report and maps the outcome onto the exit code.
func (m *migration) finish(rep engine.Report, err error) error {
	if rep.MigrationID == "" {
		return err
	}
	if m.f.asJSON {
		m.printed = true
		if jerr := writeReport(m.stdout, rep); jerr != nil {
			return jerr
		}
	} else {
		fmt.Fprint(m.stdout, rep.Text())
	}
	return outcomeError(rep, err)
}

// outcomeError maps an engine outcome onto an error with an exit code.
func outcomeError(rep engine.Report, err error) error {
	switch {
	case err == nil:
		return nil
	case errors.Is(err, engine.ErrCancelled):
		return &exitError{code: exitCancelled, err: fmt.Errorf("migration %s cancelled and rolled back: %w", rep.MigrationID, err)}
	case errors.Is(err, engine.ErrInterrupted) && rep.GuestThrottleActive:
		return &exitError{code: exitFailed, err: fmt.Errorf("%w; the guest is still throttled (%d%% of its CPU taken): continue with: wanmotion migrate resume %s, or give it back with: wanmotion migrate cancel %s",
			err, rep.GuestThrottlePercent, rep.MigrationID, rep.MigrationID)}
	case errors.Is(err, engine.ErrInterrupted):
		return &exitError{code: exitFailed, err: fmt.Errorf("%w; continue with: wanmotion migrate resume %s", err, rep.MigrationID)}
	case errors.Is(err, engine.ErrHandoffFailed):
		return &exitError{code: exitFailed, err: fmt.Errorf("%w; the replicas are kept: retry with: wanmotion migrate resume %s, or roll back with: wanmotion migrate cancel %s",
			err, rep.MigrationID, rep.MigrationID)}
	}
	return &exitError{code: exitFailed, err: err}
}

// runWithSignals runs fn; the first interrupt (the caller's ctx ending)
// asks the engine to cancel (roll back before handoff), a second one stops
// the engine where it is (resume later).
func runWithSignals(ctx context.Context, eng *engine.Engine, id string, stderr io.Writer,
	fn func(context.Context) (engine.Report, error)) (engine.Report, error) {
	rctx, stop := context.WithCancel(context.WithoutCancel(ctx))
	defer stop()
	done := make(chan struct{})
	defer close(done)
	go func() {
		select {
		case <-done:
			return
		case <-ctx.Done():
		}
		second := make(chan os.Signal, 1)
		signal.Notify(second, os.Interrupt, syscall.SIGTERM)
		defer signal.Stop(second)
		eng.Cancel(id)
		fmt.Fprintf(stderr, "\ncancelling %s: rolling back if before handoff (interrupt again to stop without rollback and resume later)\n", id)
		select {
		case <-done:
		case <-second:
			stop()
		}
	}()
	return fn(rctx)
}

// request resolves names into the engine's request.
func (m *migration) request(ctx context.Context, src, dst *xapiadapt.Pool) (engine.Request, error) {
	f := m.f
	vm, err := src.FindVM(ctx, f.vm)
	if err != nil {
		return engine.Request{}, fmt.Errorf("--vm: %w", err)
	}
	m.vmUUID = vm.UUID
	req := engine.Request{MigrationID: f.id, VMUUID: vm.UUID, Overrides: m.overrides,
		Link: engine.Link{RTT: f.rtt}, SkipAssert: f.skipAssert}
	if req.MigrationID == "" {
		req.MigrationID = engine.NewMigrationID()
	}
	m.id = req.MigrationID
	if f.destSR != "" {
		if req.DestSR, err = dst.FindSR(ctx, f.destSR); err != nil {
			return req, fmt.Errorf("--dest-sr: %w", err)
		}
	}
	if f.destHost != "" {
		if req.DestHost, err = dst.FindHost(ctx, f.destHost); err != nil {
			return req, fmt.Errorf("--dest-host: %w", err)
		}
	}
	req.NetworkMap, err = networkMap(ctx, src, dst, vm.Ref, f.networkMap)
	return req, err
}

// networkMap resolves --network-map entries and maps every other network
// of the VM's VIFs to the destination network of the same name.
func networkMap(ctx context.Context, src, dst *xapiadapt.Pool, vm string, entries []string) (map[string]string, error) {
	out := map[string]string{}
	for _, e := range entries {
		a, b, _ := strings.Cut(e, "=")
		to, err := dst.FindNetwork(ctx, b)
		if err != nil {
			return nil, fmt.Errorf("--network-map %s: destination: %w", e, err)
		}
		from := "*"
		if a != "*" {
			if from, err = src.FindNetwork(ctx, a); err != nil {
				return nil, fmt.Errorf("--network-map %s: source: %w", e, err)
			}
		}
		out[from] = to
	}
	if _, all := out["*"]; all {
		return out, nil
	}
	vifs, err := src.VMVIFs(ctx, vm)
	if err != nil {
		return nil, err
	}
	for _, v := range vifs {
		if _, ok := out[v.NetworkRef]; ok {
			continue
		}
		rec, err := src.Client().NetworkGetRecord(ctx, xapi.NetworkRef(v.NetworkRef))
		if err != nil {
			return nil, fmt.Errorf("network of vif %s: %w", v.Device, err)
		}
		to, err := dst.FindNetwork(ctx, rec.NameLabel)
		if err != nil {
			return nil, fmt.Errorf("no destination network named %q for vif %s: give --network-map: %w", rec.NameLabel, v.Device, err)
		}
		out[v.NetworkRef] = to
	}
	return out, nil
}

// planView is the --dry-run --json object.
type planView struct {
	DryRun      bool            `json:"dry_run"`
	VMUUID      string          `json:"vm_uuid"`
	VMName      string          `json:"vm_name"`
	Storage     string          `json:"storage_backend"`
	Network     string          `json:"network_backend"`
	Disks       []planDisk      `json:"disks"`
	Settings    engine.Settings `json:"settings"`
	Estimate    engine.Estimate `json:"estimate"`
	Assumptions []string        `json:"assumptions"`
}

type planDisk struct {
	VDIUUID     string `json:"vdi_uuid"`
	Device      string `json:"device"`
	VirtualSize int64  `json:"virtual_size"`
	Allocated   int64  `json:"allocated"`
	DestSR      string `json:"dest_sr"`
	DestSRUUID  string `json:"dest_sr_uuid"`
	DestSRName  string `json:"dest_sr_name"`
}

// srNames looks up the name and uuid of each destination SR of the plan
// (the plan holds refs); an SR that cannot be read is left out.
func srNames(ctx context.Context, c *xapi.Client, p engine.PlanResult) map[string]xapi.SRRecord {
	out := map[string]xapi.SRRecord{}
	for _, d := range p.Disks {
		if _, ok := out[d.DestSR]; ok || d.DestSR == "" {
			continue
		}
		if rec, err := c.SRGetRecord(ctx, xapi.SRRef(d.DestSR)); err == nil {
			out[d.DestSR] = rec
		}
	}
	return out
}

func planJSON(p engine.PlanResult, srs map[string]xapi.SRRecord) planView {
	v := planView{DryRun: true, VMUUID: p.VMUUID, VMName: p.VMName, Storage: p.Settings.Storage, Network: p.Settings.Network,
		Disks: []planDisk{}, Settings: p.Settings, Estimate: p.Estimate, Assumptions: append([]string{}, p.Assumptions...)}
	for _, d := range p.Disks {
		v.Disks = append(v.Disks, planDisk{VDIUUID: d.Disk.VDIUUID, Device: d.Disk.Device, VirtualSize: d.Disk.VirtualSize,
			Allocated: d.Disk.PhysicalUtilisation, DestSR: d.DestSR, DestSRUUID: srs[d.DestSR].UUID, DestSRName: srs[d.DestSR].NameLabel})
	}
	return v
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

func writeReport(w io.Writer, r engine.Report) error {
	b, err := r.JSON()
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// printFailure prints the JSON object for a migration that ended before
// the engine produced a report (bad input, login failure...).
func (m *migration) printFailure(err error) {
	if err == nil {
		return
	}
	m.printed = true
	_ = writeReport(m.stdout, failureReport(m.id, m.vmUUID, err))
}

func failureReport(id, vmUUID string, err error) engine.Report {
	r := engine.Report{MigrationID: id, VMUUID: vmUUID, Result: engine.ResultFailed, Error: err.Error(),
		Integrity: engine.IntegritySkipped}
	for _, p := range engine.WorkPhases {
		r.Phases = append(r.Phases, engine.PhaseTime{Name: p.String()})
	}
	return r
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}
