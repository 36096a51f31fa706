package main

// `wanmotion demo`: the end-to-end migration on two simulated pools. It
// runs this binary's own commands as child processes — `wanmotion sim`,
// then `wanmotion migrate` (which starts the site agents, the nbd backend
// and the WAN gateway) — with an emulated WAN link (wan/wanemu) between
// the source gateway's dial and the destination gateway's listen address,
// and then checks the destination disk against the simulated guest's own
// record of what it wrote (SHA-256 of both). See docs/demo.md.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/wan/wanemu"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// demoExec overrides the wanmotion executable the demo runs as its child
// processes (tests build one); empty means this process's executable. The
// backends are looked for in the same directory.
var demoExec string

const demoUsage = `Usage: wanmotion demo [flags]

Starts two simulated pools (site-a, site-b) with a running VM, demo-vm,
whose simulated guest keeps writing to its disk; puts an emulated WAN link
between the sites; live-migrates demo-vm from site-a to site-b with the real
'wanmotion migrate' (nbd storage backend); checks the destination disk
against the guest's own record of its writes (SHA-256). Ctrl-C cancels the
migration (the VM stays at site-a) and stops everything.

Needs wanmotion-storage-nbd next to the wanmotion binary (make build).

Flags:`

type demoFlags struct {
	diskSize, fillSize, memSize           string
	guestRate, guestDirty, guestBlock     string
	bandwidth                             string
	rtt, downtimeTarget                   time.Duration
	workDir, logLevel, policy             string
	keep, asJSON                          bool
	diskBytes, fillBytes, memBytes, bwBps int64
}

func parseDemoFlags(args []string, stderr io.Writer) (*demoFlags, error) {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	f := &demoFlags{}
	fs.StringVar(&f.diskSize, "disk-size", "1GiB", "demo-vm's disk size")
	fs.StringVar(&f.fillSize, "fill-size", "256MiB", "data written into the disk before the demo (what the first seed round moves)")
	fs.StringVar(&f.memSize, "memory-size", "256MiB", "demo-vm's memory (streamed for real during the hand-over)")
	fs.StringVar(&f.guestRate, "guest-rate", "2MiB/s", "guest disk write rate during the demo")
	fs.StringVar(&f.guestBlock, "guest-block-size", "1MiB", "size of each guest write (see docs/demo.md on smaller writes and the measured pause)")
	fs.StringVar(&f.guestDirty, "guest-dirty-rate", "1MiB/s", "guest memory page-dirty rate")
	fs.StringVar(&f.bandwidth, "bandwidth", "100Mbit", "emulated WAN link rate per direction (also given to migrate as its cap)")
	fs.DurationVar(&f.rtt, "rtt", 50*time.Millisecond, "emulated WAN round-trip time")
	fs.DurationVar(&f.downtimeTarget, "downtime-target", time.Second, "target guest pause given to migrate")
	fs.StringVar(&f.policy, "policy", "keep-going", "convergence policy given to migrate: keep-going, throttle (slows the guest's vCPUs when it out-writes the link; try --guest-rate 20MiB/s) or stop")
	fs.StringVar(&f.workDir, "dir", "", "work directory for the simulator's and the migration's state (default: a new temporary directory)")
	fs.BoolVar(&f.keep, "keep", false, "keep the work directory (logs, checkpoint, disks) at the end")
	fs.BoolVar(&f.asJSON, "json", false, "print one JSON object (the demo's result) on stdout; everything else goes to stderr")
	fs.StringVar(&f.logLevel, "log-level", "warn", "log level of the simulator and of migrate")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), demoUsage)
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	var err error
	for _, s := range []struct {
		name string
		v    string
		dst  *int64
	}{{"disk-size", f.diskSize, &f.diskBytes}, {"fill-size", f.fillSize, &f.fillBytes}, {"memory-size", f.memSize, &f.memBytes}} {
		if *s.dst, err = parseByteSize(s.v); err != nil {
			return nil, fmt.Errorf("%w: --%s: %v", errUsage, s.name, err)
		}
	}
	if f.fillBytes > f.diskBytes {
		return nil, fmt.Errorf("%w: --fill-size is larger than --disk-size", errUsage)
	}
	if f.memBytes <= 0 || f.diskBytes <= 0 {
		return nil, fmt.Errorf("%w: --disk-size and --memory-size must be positive", errUsage)
	}
	if _, err := xapisim.GuestConfigFromMap(map[string]string{"rate": f.guestRate, "dirty_rate": f.guestDirty, "block_size": f.guestBlock}); err != nil {
		return nil, fmt.Errorf("%w: guest: %v", errUsage, err)
	}
	bw, err := engine.ParseBandwidth(f.bandwidth)
	if err != nil || bw <= 0 {
		return nil, fmt.Errorf("%w: --bandwidth %q: want a rate such as 100Mbit", errUsage, f.bandwidth)
	}
	f.bwBps = bw * 8
	if _, err := engine.ParsePolicy(f.policy); err != nil {
		return nil, fmt.Errorf("%w: --policy: %v", errUsage, err)
	}
	if f.rtt < 0 || f.downtimeTarget <= 0 {
		return nil, fmt.Errorf("%w: --rtt must not be negative and --downtime-target must be positive", errUsage)
	}
	return f, nil
}

// demoResult is the --json object.
type demoResult struct {
	Result    string            `json:"result"` // success | failed | cancelled
	Error     string            `json:"error,omitempty"`
	VMUUID    string            `json:"vm_uuid"`
	Settings  demoSettings      `json:"settings"`
	Migration json.RawMessage   `json:"migration,omitempty"` // `migrate status --json`
	Placement demoPlacement     `json:"placement"`
	Integrity demoIntegrity     `json:"integrity"`
	Link      wanemu.Counters   `json:"link_bytes"`
	Guest     map[string]string `json:"guest,omitempty"` // sim.guest_stats at the end
	// XAPIMigration is the simulator's record of the hand-over's
	// VM.migrate_send (sim.last_migration): memory rounds, final pages,
	// mirrored writes, pause.
	XAPIMigration map[string]string `json:"xapi_migration,omitempty"`
	// Processes are the child processes the demo saw (simulator, migrate,
	// site agents, their backends and helpers); all are gone when it
	// returns.
	Processes []demoProc `json:"processes"`
	StateDir  string     `json:"state_dir,omitempty"` // with --keep
}

type demoSettings struct {
	DiskBytes     int64   `json:"disk_bytes"`
	FillBytes     int64   `json:"fill_bytes"`
	MemoryBytes   int64   `json:"memory_bytes"`
	GuestRate     string  `json:"guest_rate"`
	GuestDirty    string  `json:"guest_dirty_rate"`
	LinkBitsPerS  int64   `json:"link_bits_per_sec"`
	RTTSeconds    float64 `json:"rtt_seconds"`
	DowntimeGoalS float64 `json:"downtime_target_seconds"`
}

type demoPlacement struct {
	// Sites where the VM exists after the migration, with its power state
	// ("Running" at exactly one site on success).
	Sites    map[string]string `json:"sites"`
	DestHost string            `json:"dest_host,omitempty"`
}

type demoIntegrity struct {
	// Result: "ok" (every disk's SHA-256 equal), "mismatch", "skipped".
	Result string `json:"result"`
	// Source: SHA-256 of the guest's record of each disk (its content when
	// the guest started plus every write since), by device.
	Source map[string]string `json:"source_sha256"`
	// Destination: SHA-256 of each disk read back from the destination
	// pool with GET /export_raw_vdi, by device.
	Destination map[string]string `json:"destination_sha256"`
	Bytes       int64             `json:"bytes_hashed"`
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f, err := parseDemoFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	// Child processes write to these too: a terminal or file is handed to
	// them as is (migrate's live progress needs the terminal); other
	// writers are shared under one lock.
	var mu sync.Mutex
	d := &demo{f: f, out: lockWriter(&mu, stdout), stderr: lockWriter(&mu, stderr)}
	if f.asJSON {
		d.out = d.stderr // the story goes to stderr, the object to stdout
	}
	res, err := d.run(ctx)
	if f.asJSON {
		if err != nil && res.Error == "" {
			res.Error = err.Error()
		}
		if jerr := writeJSON(stdout, res); jerr != nil && err == nil {
			err = jerr
		}
	}
	return err
}

type demo struct {
	f           *demoFlags
	out, stderr io.Writer
	bin         string
	pluginDir   string
	root        string
	log         hclog.Logger
	procs       map[int]string // pid → command line, of this run's processes
}

func (d *demo) printf(format string, a ...any) { fmt.Fprintf(d.out, format, a...) }

func (d *demo) run(ctx context.Context) (res demoResult, err error) {
	f := d.f
	res = demoResult{Result: string(engine.ResultFailed), Integrity: demoIntegrity{Result: "skipped"}, Processes: []demoProc{},
		Settings: demoSettings{DiskBytes: f.diskBytes, FillBytes: f.fillBytes, MemoryBytes: f.memBytes,
			GuestRate: f.guestRate, GuestDirty: f.guestDirty, LinkBitsPerS: f.bwBps,
			RTTSeconds: f.rtt.Seconds(), DowntimeGoalS: f.downtimeTarget.Seconds()}}
	d.log = hclog.New(&hclog.LoggerOptions{Name: "demo", Level: hclog.LevelFromString(f.logLevel), Output: d.stderr})
	d.procs = map[int]string{}
	if d.bin, err = demoBinary(); err != nil {
		return res, err
	}
	d.pluginDir = filepath.Dir(d.bin)
	if _, err := os.Stat(filepath.Join(d.pluginDir, "wanmotion-storage-nbd")); err != nil {
		return res, fmt.Errorf("the nbd storage backend is not next to %s (run make build): %w", d.bin, err)
	}
	if f.workDir != "" {
		if err := os.MkdirAll(f.workDir, 0o700); err != nil {
			return res, fmt.Errorf("work dir: %w", err)
		}
		d.root, err = os.MkdirTemp(f.workDir, "run-")
	} else {
		d.root, err = os.MkdirTemp("", "wanmotion-demo-")
	}
	if err != nil {
		return res, fmt.Errorf("work dir: %w", err)
	}
	defer func() {
		d.sweep()
		for p, c := range d.procs {
			res.Processes = append(res.Processes, demoProc{Pid: p, Command: c})
		}
		sort.Slice(res.Processes, func(i, j int) bool { return res.Processes[i].Pid < res.Processes[j].Pid })
		if f.keep {
			res.StateDir = d.root
			d.printf("\nWork directory kept: %s (simulator log sim.log, agent logs under migrate/agents-run)\n", d.root)
			return
		}
		if rerr := os.RemoveAll(d.root); rerr != nil {
			d.printf("could not remove %s: %v\n", d.root, rerr)
		}
	}()

	d.intro()

	// 1. The simulator: two pools, demo-vm running with its guest writing.
	sim, info, err := d.startSim(ctx)
	if err != nil {
		return res, err
	}
	defer d.stopChild(sim, "simulator", 20*time.Second)
	if len(info.Pools) < 2 {
		return res, errors.New("the simulator reported fewer than two pools")
	}
	a, b := info.Pools[0], info.Pools[1]
	d.printf("[1/4] simulator up (pid %d): %s at %s, %s at %s\n", sim.Process.Pid, a.Name, a.URL, b.Name, b.URL)
	src, err := d.login(ctx, a)
	if err != nil {
		return res, err
	}
	defer func() { _ = src.Close(context.WithoutCancel(ctx)) }()
	dst, err := d.login(ctx, b)
	if err != nil {
		return res, err
	}
	defer func() { _ = dst.Close(context.WithoutCancel(ctx)) }()
	vmUUID, err := demoVMUUID(ctx, src)
	if err != nil {
		return res, err
	}
	res.VMUUID = vmUUID

	// 2. The WAN link in front of the destination gateway.
	gwListen, err := freeLoopbackAddr()
	if err != nil {
		return res, err
	}
	link, err := wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: gwListen, RTT: f.rtt, Bandwidth: f.bwBps, Logger: d.log.Named("link")})
	if err != nil {
		return res, fmt.Errorf("emulated link: %w", err)
	}
	defer func() {
		res.Link = link.Counters()
		_ = link.Close()
	}()
	d.printf("[2/4] emulated WAN link up: %s, %s RTT; the source gateway dials %s, the link forwards to the destination gateway on %s\n",
		humanBits(f.bwBps), f.rtt, link.Addr(), gwListen)

	// 3. The real CLI migration.
	id := "wm-demo-" + randomHex(4)
	migStart := time.Now()
	migErr := d.migrate(ctx, id, a, b, gwListen, link.Addr())
	d.printf("\n(migrate ran for %s)\n", time.Since(migStart).Round(100*time.Millisecond))
	if rep, err := d.status(context.WithoutCancel(ctx), id, a, b); err == nil {
		res.Migration = rep
		var r struct {
			Result string `json:"result"`
		}
		if json.Unmarshal(rep, &r) == nil && r.Result != "" {
			res.Result = r.Result
		}
	} else {
		d.printf("could not read the migration's report: %v\n", err)
	}
	if migErr != nil {
		var ec interface{ ExitCode() int }
		if errors.As(migErr, &ec) && ec.ExitCode() == exitCancelled {
			res.Result = string(engine.ResultCancelled)
		}
		res.Placement = d.placement(context.WithoutCancel(ctx), src, dst, a.Name, b.Name, vmUUID)
		d.printf("\nThe migration did not complete (%v). demo-vm: %s\n", migErr, describePlacement(res.Placement))
		if res.Result == string(engine.ResultCancelled) {
			return res, &exitError{code: exitCancelled, err: fmt.Errorf("migration %s cancelled: %w", id, migErr)}
		}
		return res, fmt.Errorf("migration %s: %w", id, migErr)
	}

	// 4. Where the VM runs, and the integrity check. The VM has moved: an
	// interrupt from here on does not skip the checks (they are short).
	ctx, cancelChecks := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Minute)
	defer cancelChecks()
	res.Placement = d.placement(ctx, src, dst, a.Name, b.Name, vmUUID)
	{
		var gs map[string]string
		if dst.CallInto(ctx, &gs, "sim.guest_stats", vmUUID) == nil {
			res.Guest = gs
		}
		var lm map[string]string
		if dst.CallInto(ctx, &lm, "sim.last_migration", vmUUID) == nil && len(lm) > 0 {
			res.XAPIMigration = lm
		}
	}
	res.Integrity, err = d.integrity(ctx, dst, vmUUID)
	if err != nil {
		return res, fmt.Errorf("integrity check: %w", err)
	}
	d.report(res, b.Name)
	if res.Integrity.Result != "ok" {
		return res, fmt.Errorf("integrity %s: the destination disk differs from what the guest wrote", res.Integrity.Result)
	}
	if res.Result != string(engine.ResultSuccess) {
		return res, fmt.Errorf("migration %s: result %s", id, res.Result)
	}
	return res, nil
}

// lockedWriter serialises writes to w (exec copies a child's output from
// its own goroutines when the writer is not an *os.File).
type lockedWriter struct {
	mu *sync.Mutex
	w  io.Writer
}

func (l lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

func lockWriter(mu *sync.Mutex, w io.Writer) io.Writer {
	if _, ok := w.(*os.File); ok {
		return w
	}
	return lockedWriter{mu: mu, w: w}
}

func demoBinary() (string, error) {
	if demoExec != "" {
		return demoExec, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return "", fmt.Errorf("own executable: %w", err)
	}
	if r, err := filepath.EvalSymlinks(exe); err == nil {
		exe = r
	}
	return exe, nil
}

func (d *demo) intro() {
	f := d.f
	d.printf(`wanmotion demo: a live migration between two pools over an emulated WAN

  - Two simulated xapi pools, site-a and site-b (wanmotion sim: the XenAPI
    calls, VM.migrate_send, disks as files, memory streamed for real).
  - demo-vm runs at site-a: %s disk with %s of data, %s memory.
    Its simulated guest keeps writing: %s of random %s disk writes,
    %s of memory dirtied. It records every write, so the result can be
    checked.
  - An emulated WAN link (%s, %s round trip) between the two sites'
    WAN gateways: all migration traffic crosses it (disk seed rounds, xapi's
    own memory and residual-disk streams during the hand-over).
  - The real 'wanmotion migrate' moves demo-vm to site-b: site agents, the
    nbd storage backend, seed rounds while the VM runs, then xapi's
    VM.migrate_send through the gateway for the short hand-over.
  - At the end the destination disk's SHA-256 is compared with the SHA-256
    of the guest's own record of what the disk must hold.

Ctrl-C cancels the migration (the VM stays at site-a) and stops everything.
More: docs/demo.md, docs/cli.md, docs/engine.md, docs/simulator.md.
Work directory: %s

`, human(f.diskBytes), human(f.fillBytes), human(f.memBytes), f.guestRate, f.guestBlock, f.guestDirty, humanBits(f.bwBps), f.rtt, d.root)
}

// startSim starts `wanmotion sim` in its own process group (a Ctrl-C on
// the terminal reaches only the demo, which then stops things in order)
// and reads its first stdout line.
func (d *demo) startSim(ctx context.Context) (*exec.Cmd, xapisim.Info, error) {
	f := d.f
	var info xapisim.Info
	logf, err := os.Create(filepath.Join(d.root, "sim.log"))
	if err != nil {
		return nil, info, fmt.Errorf("simulator log: %w", err)
	}
	defer func() { _ = logf.Close() }()
	cmd := exec.Command(d.bin, "sim", "--state-dir", filepath.Join(d.root, "sim"), "--pools", "2",
		"--disk-size", f.diskSize, "--fill-size", f.fillSize, "--memory-size", f.memSize,
		"--guest-rate", f.guestRate, "--guest-pattern", "random", "--guest-block-size", f.guestBlock,
		"--guest-dirty-rate", f.guestDirty, "--install-plugin", "--log-level", f.logLevel)
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, info, err
	}
	d.printf("[1/4] starting the simulator (writing %s into demo-vm's disk)...\n", human(f.fillBytes))
	if err := cmd.Start(); err != nil {
		return nil, info, fmt.Errorf("start the simulator: %w", err)
	}
	d.notePids()
	line := make(chan string, 1)
	go func() {
		r := bufio.NewReader(out)
		l, _ := r.ReadString('\n')
		line <- l
		_, _ = io.Copy(io.Discard, r)
	}()
	fail := func(err error) (*exec.Cmd, xapisim.Info, error) {
		d.stopChild(cmd, "simulator", 10*time.Second)
		if b, rerr := os.ReadFile(logf.Name()); rerr == nil && len(b) > 0 {
			err = fmt.Errorf("%w; simulator log:\n%s", err, lastLines(string(b), 20))
		}
		return nil, info, err
	}
	select {
	case l := <-line:
		if err := json.Unmarshal([]byte(strings.TrimSpace(l)), &info); err != nil {
			return fail(fmt.Errorf("the simulator did not start (first line %q): %w", strings.TrimSpace(l), err))
		}
	case <-ctx.Done():
		return fail(fmt.Errorf("interrupted while the simulator started: %w", ctx.Err()))
	case <-time.After(5 * time.Minute):
		return fail(errors.New("the simulator did not start within 5 minutes"))
	}
	return cmd, info, nil
}

// stopChild stops a child: SIGTERM, then SIGKILL after grace.
func (d *demo) stopChild(cmd *exec.Cmd, what string, grace time.Duration) {
	if cmd == nil || cmd.Process == nil {
		return
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		d.log.Warn("child did not stop; killing it", "what", what, "pid", cmd.Process.Pid)
		_ = cmd.Process.Kill()
		<-done
	}
}

func (d *demo) login(ctx context.Context, p xapisim.PoolInfo) (*xapi.Client, error) {
	c, err := xapi.New(xapi.Config{URL: p.URL, Username: p.Username, Password: p.Password, Logger: d.log.Named("xapi")})
	if err != nil {
		return nil, err
	}
	if err := c.Login(ctx); err != nil {
		return nil, fmt.Errorf("log in to %s: %w", p.Name, err)
	}
	return c, nil
}

func demoVMUUID(ctx context.Context, c *xapi.Client) (string, error) {
	refs, err := c.VMGetByNameLabel(ctx, xapisim.DemoVMName)
	if err != nil {
		return "", fmt.Errorf("find %s: %w", xapisim.DemoVMName, err)
	}
	if len(refs) != 1 {
		return "", fmt.Errorf("find %s: %d VMs of that name", xapisim.DemoVMName, len(refs))
	}
	rec, err := c.VMGetRecord(ctx, refs[0])
	if err != nil {
		return "", fmt.Errorf("%s: %w", xapisim.DemoVMName, err)
	}
	return rec.UUID, nil
}

// freeLoopbackAddr returns a loopback address with a port that was free.
func freeLoopbackAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("pick a port: %w", err)
	}
	addr := l.Addr().String()
	_ = l.Close()
	return addr, nil
}

func (d *demo) childEnv(a, b xapisim.PoolInfo) []string {
	env := []string{}
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); k == EnvFromPassword || k == EnvToPassword || k == EnvPassword {
			continue
		}
		env = append(env, kv)
	}
	return append(env, EnvFromPassword+"="+a.Password, EnvToPassword+"="+b.Password)
}

// migrate runs `wanmotion migrate` with the terminal (stderr) passed
// through for its live progress and its text report on the demo's output.
// On ctx's end it interrupts the child once: migrate cancels and rolls
// back (the VM stays at the source).
func (d *demo) migrate(ctx context.Context, id string, a, b xapisim.PoolInfo, gwListen, gwAdvertise string) error {
	f := d.f
	cmd := exec.Command(d.bin, "migrate", "--id", id, "--vm", xapisim.DemoVMName, "--from", a.URL, "--to", b.URL,
		"--from-user", a.Username, "--to-user", b.Username,
		"--storage", "nbd", "--network", "none", "--plugin-dir", d.pluginDir, "--state-dir", filepath.Join(d.root, "migrate"),
		"--bandwidth", f.bandwidth, "--rtt", f.rtt.String(), "--downtime-target", f.downtimeTarget.String(),
		"--policy", f.policy, "--gateway-listen", gwListen, "--gateway-advertise", gwAdvertise, "--log-level", f.logLevel)
	cmd.Env = d.childEnv(a, b)
	cmd.Stdout, cmd.Stderr = d.out, d.stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	d.printf("[3/4] the real migration, passwords in $%s and $%s:\n  wanmotion %s\n\n", EnvFromPassword, EnvToPassword,
		strings.Join(cmd.Args[1:], " "))
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start migrate: %w", err)
	}
	d.notePids()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	scan := time.NewTicker(500 * time.Millisecond)
	defer scan.Stop()
	interrupted := false
	var hardStop <-chan time.Time
	for {
		select {
		case err := <-done:
			d.notePids()
			return childExit(err)
		case <-scan.C:
			d.notePids()
		case <-ctx.Done():
			if interrupted {
				continue
			}
			interrupted = true
			fmt.Fprintf(d.stderr, "\ndemo interrupted: cancelling the migration (demo-vm stays at site-a unless the hand-over already began)...\n")
			_ = cmd.Process.Signal(os.Interrupt)
			hardStop = time.After(5 * time.Minute)
		case <-hardStop:
			fmt.Fprintf(d.stderr, "migrate did not stop within 5 minutes of the interrupt; killing it\n")
			_ = cmd.Process.Kill()
			hardStop = nil
		}
	}
}

// childExit turns a child's exit status into an error carrying its code.
func childExit(err error) error {
	if err == nil {
		return nil
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() > 0 {
		return &exitError{code: ee.ExitCode(), err: fmt.Errorf("wanmotion migrate exited with code %d", ee.ExitCode())}
	}
	return fmt.Errorf("wanmotion migrate: %w", err)
}

// status runs `wanmotion migrate status ID --json` and returns the object.
func (d *demo) status(ctx context.Context, id string, a, b xapisim.PoolInfo) (json.RawMessage, error) {
	var out, errb bytes.Buffer
	cmd := exec.CommandContext(ctx, d.bin, "migrate", "status", id, "--json", "--state-dir", filepath.Join(d.root, "migrate"))
	cmd.Env = d.childEnv(a, b)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("migrate status: %w: %s", err, strings.TrimSpace(errb.String()))
	}
	raw := json.RawMessage(bytes.TrimSpace(out.Bytes()))
	if !json.Valid(raw) {
		return nil, fmt.Errorf("migrate status: not JSON: %q", out.String())
	}
	return raw, nil
}

// placement says in which pool the VM exists and its power state there.
func (d *demo) placement(ctx context.Context, src, dst *xapi.Client, aName, bName, vmUUID string) demoPlacement {
	pl := demoPlacement{Sites: map[string]string{}}
	for _, s := range []struct {
		name string
		c    *xapi.Client
	}{{aName, src}, {bName, dst}} {
		ref, err := s.c.VMGetByUUID(ctx, vmUUID)
		if err != nil {
			continue
		}
		rec, err := s.c.VMGetRecord(ctx, ref)
		if err != nil {
			pl.Sites[s.name] = "unknown: " + err.Error()
			continue
		}
		pl.Sites[s.name] = string(rec.PowerState)
		if s.c == dst && rec.ResidentOn != "" {
			if h, err := s.c.HostGetRecord(ctx, rec.ResidentOn); err == nil {
				pl.DestHost = h.NameLabel
			}
		}
	}
	return pl
}

func describePlacement(pl demoPlacement) string {
	if len(pl.Sites) == 0 {
		return "not found in either pool"
	}
	var parts []string
	for _, s := range sortedKeys(pl.Sites) {
		parts = append(parts, fmt.Sprintf("%s at %s", pl.Sites[s], s))
	}
	return strings.Join(parts, ", ")
}

// integrity pauses the VM at the destination (the simulated guest writes
// only while its VM runs), then compares the SHA-256 of each disk read back
// with GET /export_raw_vdi with the SHA-256 of the guest's record of it.
func (d *demo) integrity(ctx context.Context, dst *xapi.Client, vmUUID string) (demoIntegrity, error) {
	in := demoIntegrity{Result: "skipped", Source: map[string]string{}, Destination: map[string]string{}}
	ref, err := dst.VMGetByUUID(ctx, vmUUID)
	if err != nil {
		return in, fmt.Errorf("the VM at the destination: %w", err)
	}
	d.printf("\n[4/4] integrity: pausing demo-vm at the destination (its guest stops writing) and hashing its disk...\n")
	if err := dst.VMPause(ctx, ref); err != nil {
		return in, fmt.Errorf("pause the VM: %w", err)
	}
	if err := dst.CallInto(ctx, &in.Source, "sim.guest_shadow_sha256", ref); err != nil {
		return in, fmt.Errorf("sim.guest_shadow_sha256: %w", err)
	}
	rec, err := dst.VMGetRecord(ctx, ref)
	if err != nil {
		return in, err
	}
	for _, vbd := range rec.VBDs {
		v, err := dst.VBDGetRecord(ctx, vbd)
		if err != nil {
			return in, err
		}
		if v.Type != xapi.VBDTypeDisk || v.VDI.IsNull() {
			continue
		}
		sum, n, err := exportSHA256(ctx, dst, v.VDI)
		if err != nil {
			return in, fmt.Errorf("disk %s: %w", v.Userdevice, err)
		}
		in.Destination[v.Userdevice], in.Bytes = sum, in.Bytes+n
	}
	if len(in.Source) == 0 || len(in.Destination) == 0 {
		return in, nil
	}
	in.Result = "ok"
	for dev, s := range in.Source {
		if in.Destination[dev] != s {
			in.Result = "mismatch"
		}
	}
	if len(in.Source) != len(in.Destination) {
		in.Result = "mismatch"
	}
	return in, nil
}

func exportSHA256(ctx context.Context, c *xapi.Client, vdi xapi.VDIRef) (string, int64, error) {
	body, _, err := c.ExportRawVDI(ctx, vdi)
	if err != nil {
		return "", 0, err
	}
	defer func() { _ = body.Close() }()
	h := sha256.New()
	n, err := io.Copy(h, body)
	if err != nil {
		return "", n, fmt.Errorf("read export: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// report prints the demo's own summary after migrate's report.
func (d *demo) report(res demoResult, destSite string) {
	var m struct {
		GuestPauseMS       int64   `json:"guest_pause_ms"`
		GuestPauseMeasured bool    `json:"guest_pause_measured"`
		TotalSeconds       float64 `json:"total_seconds"`
		Integrity          string  `json:"integrity"`
	}
	_ = json.Unmarshal(res.Migration, &m)
	d.printf("\n== demo result ==\n")
	d.printf("migration:     %s in %.1fs over %s / %s RTT (%s disk, %s data, %s memory, guest writing %s)\n",
		strings.ToUpper(res.Result), m.TotalSeconds, humanBits(res.Settings.LinkBitsPerS), time.Duration(res.Settings.RTTSeconds*float64(time.Second)),
		human(res.Settings.DiskBytes), human(res.Settings.FillBytes), human(res.Settings.MemoryBytes), res.Settings.GuestRate)
	where := describePlacement(res.Placement)
	if res.Placement.DestHost != "" {
		where += " (host " + res.Placement.DestHost + ")"
	}
	d.printf("demo-vm:       %s\n", where)
	kind := "estimated"
	if m.GuestPauseMeasured {
		kind = "measured by the simulator"
	}
	d.printf("guest pause:   %d ms (%s; target %s)\n", m.GuestPauseMS, kind, time.Duration(res.Settings.DowntimeGoalS*float64(time.Second)))
	if x := res.XAPIMigration; x != nil {
		mem, _ := strconv.ParseInt(x["memory_bytes"], 10, 64)
		d.printf("hand-over:     xapi streamed %s of memory in %s rounds (%s pages in the paused round), %s guest writes mirrored\n",
			human(mem), x["rounds"], x["final_pages"], x["mirrored_writes"])
	}
	if res.Guest != nil {
		if n, err := strconv.ParseInt(res.Guest["bytes_written"], 10, 64); err == nil {
			d.printf("guest writes:  %s in %s writes since the simulator started\n", human(n), res.Guest["writes"])
		}
	}
	d.printf("SHA-256 over %s of disk (engine's own byte-for-byte check: %s):\n", human(res.Integrity.Bytes), m.Integrity)
	for _, dev := range sortedKeys(res.Integrity.Source) {
		d.printf("  disk %s source (guest's record of every write): %s\n", dev, res.Integrity.Source[dev])
		d.printf("  disk %s destination (export_raw_vdi at %s): %s\n", dev, destSite, res.Integrity.Destination[dev])
	}
	verdict := map[string]string{"ok": "identical", "mismatch": "DIFFERENT", "skipped": "not compared"}[res.Integrity.Result]
	d.printf("integrity:     %s (%s)\n", res.Integrity.Result, verdict)
}

// demoProc is one process of a run.
type demoProc struct {
	Pid     int    `json:"pid"`
	Command string `json:"command"` // command line, arguments joined by spaces
}

// procInfo is what /proc says about one live process.
type procInfo struct {
	ppid int
	cmd  string
}

// liveProcs reads every live (not zombie) process except this one.
func liveProcs() map[int]procInfo {
	out := map[int]procInfo{}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// state and ppid follow the parenthesised command name
		i := bytes.LastIndexByte(st, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(st[i+1:]))
		if len(f) < 2 || f[0] == "Z" {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		cl, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		out[pid] = procInfo{ppid: ppid, cmd: strings.TrimSpace(string(bytes.ReplaceAll(cl, []byte{0}, []byte{' '})))}
	}
	return out
}

// notePids records the processes that belong to this run: every process
// whose command line mentions its work directory (the simulator, migrate,
// the site agents) and every descendant of one (the backends and their
// helpers).
func (d *demo) notePids() {
	procs := liveProcs()
	for pid, p := range procs {
		if strings.Contains(p.cmd, d.root) {
			d.procs[pid] = p.cmd
		}
	}
	for grew := true; grew; {
		grew = false
		for pid, p := range procs {
			if _, known := d.procs[pid]; known {
				continue
			}
			if c, ok := d.procs[p.ppid]; ok && procs[p.ppid].cmd == c {
				d.procs[pid], grew = p.cmd, true
			}
		}
	}
}

// leftovers are the recorded processes still running (same pid and same
// command line).
func (d *demo) leftovers() []int {
	var out []int
	procs := liveProcs()
	for pid, c := range d.procs {
		if p, ok := procs[pid]; ok && p.cmd == c {
			out = append(out, pid)
		}
	}
	for pid, p := range procs {
		if _, known := d.procs[pid]; !known && strings.Contains(p.cmd, d.root) {
			out = append(out, pid)
		}
	}
	return out
}

// sweep stops any process of the run still running (agents normally stop
// themselves when their migration ends; this makes sure).
func (d *demo) sweep() {
	d.notePids()
	left := d.leftovers()
	if len(left) == 0 {
		return
	}
	d.log.Info("stopping leftover processes", "pids", fmt.Sprint(left))
	for _, p := range left {
		_ = syscall.Kill(p, syscall.SIGTERM)
	}
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && len(d.leftovers()) > 0 {
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range d.leftovers() {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
}

// processAlive reports whether pid runs with this command line.
func processAlive(pid int, cmd string) bool {
	p, ok := liveProcs()[pid]
	return ok && p.cmd == cmd
}

// processesMentioning lists live processes (not this one) whose command
// line contains s.
func processesMentioning(s string) []int {
	var out []int
	for pid, p := range liveProcs() {
		if strings.Contains(p.cmd, s) {
			out = append(out, pid)
		}
	}
	return out
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// human formats bytes with binary units.
func human(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%d GiB", n>>30)
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%d MiB", n>>20)
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

// humanBits formats a link rate.
func humanBits(bps int64) string {
	switch {
	case bps >= 1e9 && bps%1e9 == 0:
		return fmt.Sprintf("%d Gbit/s", bps/1e9)
	case bps >= 1e6:
		return fmt.Sprintf("%g Mbit/s", float64(bps)/1e6)
	}
	return fmt.Sprintf("%g kbit/s", float64(bps)/1e3)
}
