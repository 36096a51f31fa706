package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/wan/wanemu"
	"github.com/wanmotion/wanmotion/xapi"
)

// Sizes and link of every test: small, so that the whole package stays
// within a few minutes on a loaded 2-core machine.
const (
	diskSize   = "64MiB"
	fillSize   = "12MiB"
	memorySize = "16MiB"
	guestRate  = "1MiB/s"
	dirtyRate  = "1MiB/s"
	linkBits   = 200_000_000 // emulated WAN, bit/s
	linkRTT    = 5 * time.Millisecond
	simPass    = "xenroot"
	// runTimeout bounds one migrate/resume process.
	runTimeout = 3 * time.Minute
)

// bins are the binaries under test, built once per package run.
var bins struct {
	once      sync.Once
	dir       string
	wanmotion string
	plugins   string // --plugin-dir holding wanmotion-storage-nbd
	err       error
}

func TestMain(m *testing.M) {
	flag.Parse()
	code := m.Run()
	if bins.dir != "" {
		_ = os.RemoveAll(bins.dir)
	}
	os.Exit(code)
}

// binaries builds wanmotion and wanmotion-storage-nbd (without -race: the
// processes under test are the product, not the test) into a temp dir.
func binaries(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end: builds the binaries and runs real migrations")
	}
	bins.once.Do(func() {
		bins.dir, bins.err = os.MkdirTemp("", "wanmotion-e2e-bin-")
		if bins.err != nil {
			return
		}
		bins.wanmotion = filepath.Join(bins.dir, "wanmotion")
		bins.plugins = filepath.Join(bins.dir, "plugins")
		gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
		for _, b := range []struct{ out, pkg string }{
			{bins.wanmotion, "./cmd/wanmotion"},
			{filepath.Join(bins.plugins, "wanmotion-storage-nbd"), "./storage-backends/nbd/cmd/wanmotion-storage-nbd"},
		} {
			cmd := exec.Command(gobin, "build", "-buildvcs=false", "-o", b.out, b.pkg)
			cmd.Dir = ".."
			if out, err := cmd.CombinedOutput(); err != nil {
				bins.err = fmt.Errorf("go build %s: %w: %s", b.pkg, err, out)
				return
			}
		}
	})
	require.NoError(t, bins.err)
}

// env is one simulator with two pools, a guest writing to demo-vm at
// site-a, an emulated WAN link between the destination gateway's listen and
// advertised addresses, and a fault gate in front of each pool's API.
type env struct {
	t        testing.TB
	dir      string
	stateDir string
	simDir   string    // the simulator's state dir (<simDir>/<host name> is a host's root)
	direct   [2]string // the pools' own URLs (checks)
	proxied  [2]string // the same through the gate (the CLI uses these)
	gate     *gate
	link     *wanemu.Link
	listen   string // --gateway-listen
	vmUUID   string
	store    *engine.FileStore
}

const (
	siteA = 0
	siteB = 1
)

func newEnv(t testing.TB) *env {
	t.Helper()
	binaries(t)
	e := &env{t: t, dir: t.TempDir()}
	e.stateDir = filepath.Join(e.dir, "state")
	var err error
	e.store, err = engine.NewFileStore(e.stateDir)
	require.NoError(t, err)
	e.startSim()
	e.gate = newGate(t, e.direct, filepath.Join(e.dir, "gate.log"))
	e.proxied = e.gate.urls()

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	e.listen = l.Addr().String()
	require.NoError(t, l.Close())
	e.link, err = wanemu.NewLink(context.Background(), wanemu.LinkConfig{Upstream: e.listen, RTT: linkRTT, Bandwidth: linkBits})
	require.NoError(t, err)
	t.Cleanup(func() { _ = e.link.Close() })

	c := e.client(siteA)
	refs, err := c.VMGetByNameLabel(context.Background(), "demo-vm")
	require.NoError(t, err)
	require.Len(t, refs, 1)
	rec, err := c.VMGetRecord(context.Background(), refs[0])
	require.NoError(t, err)
	e.vmUUID = rec.UUID
	t.Cleanup(e.killAgents)
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpLogs()
		}
	})
	return e
}

func (e *env) startSim() {
	e.simDir = filepath.Join(e.dir, "sim")
	t := e.t
	logf, err := os.Create(filepath.Join(e.dir, "sim.log"))
	require.NoError(t, err)
	t.Cleanup(func() { _ = logf.Close() })
	cmd := exec.Command(bins.wanmotion, "sim", "--state-dir", e.simDir, "--hosts", "1",
		"--disk-size", diskSize, "--fill-size", fillSize, "--memory-size", memorySize,
		"--guest-rate", guestRate, "--guest-dirty-rate", dirtyRate, "--install-plugin", "--log-level", "warn")
	cmd.Stderr = logf
	out, err := cmd.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, cmd.Start())
	t.Cleanup(func() { stopProcess(cmd) })
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(out).ReadString('\n')
		line <- s
		_, _ = io.Copy(io.Discard, out)
	}()
	var first string
	select {
	case first = <-line:
	case <-time.After(time.Minute):
		t.Fatal("the simulator printed nothing within a minute")
	}
	var info struct {
		Pools []struct {
			Name string `json:"name"`
			URL  string `json:"url"`
		} `json:"pools"`
	}
	require.NoError(t, json.Unmarshal([]byte(first), &info), "sim: %q", first)
	require.Len(t, info.Pools, 2)
	e.direct = [2]string{info.Pools[0].URL, info.Pools[1].URL}
}

// stopProcess ends a child with SIGTERM, then SIGKILL after 10 s.
func stopProcess(cmd *exec.Cmd) {
	if cmd.Process == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		<-done
	}
}

// client logs in to a pool directly (not through the gate).
func (e *env) client(site int) *xapi.Client {
	e.t.Helper()
	c, err := xapi.New(xapi.Config{URL: e.direct[site], Username: "root", Password: simPass, DisableMemberDiscovery: true})
	require.NoError(e.t, err)
	require.NoError(e.t, c.Login(context.Background()))
	e.t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// proc is a running wanmotion command.
type proc struct {
	cmd    *exec.Cmd
	stdout bytes.Buffer
	stderr string // path of its stderr file
	done   chan struct{}
	err    error
}

// start runs `wanmotion args...` with the pools' passwords in the
// environment; stderr goes to a file in the env's directory.
func (e *env) start(name string, args ...string) *proc {
	e.t.Helper()
	p := &proc{done: make(chan struct{}), stderr: filepath.Join(e.dir, name+".stderr")}
	f, err := os.Create(p.stderr)
	require.NoError(e.t, err)
	p.cmd = exec.Command(bins.wanmotion, args...)
	p.cmd.Env = append(os.Environ(), "WANMOTION_FROM_PASSWORD="+simPass, "WANMOTION_TO_PASSWORD="+simPass)
	p.cmd.Stdout, p.cmd.Stderr = &p.stdout, f
	require.NoError(e.t, p.cmd.Start())
	go func() {
		p.err = p.cmd.Wait()
		_ = f.Close()
		close(p.done)
	}()
	e.t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// migrate starts `wanmotion migrate` of demo-vm from site-a to site-b
// through the gate and the emulated link, with JSON output.
func (e *env) migrate(id string, extra ...string) *proc {
	args := append([]string{"migrate", "--id", id, "--vm", "demo-vm", "--from", e.proxied[siteA], "--to", e.proxied[siteB],
		"--plugin-dir", bins.plugins, "--state-dir", e.stateDir,
		"--gateway-listen", e.listen, "--gateway-advertise", e.link.Addr(),
		"--bandwidth", "200Mbit", "--rtt", linkRTT.String(), "--json", "--log-level", "info"}, extra...)
	return e.start(id+"-migrate", args...)
}

// resume runs `wanmotion migrate resume ID --json` to its end.
func (e *env) resume(id string) (engine.Report, int) {
	p := e.start(fmt.Sprintf("%s-resume-%d", id, time.Now().UnixNano()), "migrate", "resume", id, "--state-dir", e.stateDir,
		"--json", "--log-level", "info")
	return p.report(e.t)
}

// wait waits for the process and returns its exit code.
func (p *proc) wait(t testing.TB) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(runTimeout):
		_ = p.cmd.Process.Kill()
		<-p.done
		t.Fatalf("%v did not end within %s; stderr:\n%s", p.cmd.Args, runTimeout, p.stderrText())
	}
	var ee *exec.ExitError
	if errors.As(p.err, &ee) {
		return ee.ExitCode()
	}
	require.NoError(t, p.err)
	return 0
}

// report waits for the process and decodes the one JSON object it printed.
func (p *proc) report(t testing.TB) (engine.Report, int) {
	t.Helper()
	code := p.wait(t)
	var r engine.Report
	dec := json.NewDecoder(bytes.NewReader(p.stdout.Bytes()))
	require.NoError(t, dec.Decode(&r), "stdout %q; stderr:\n%s", p.stdout.String(), p.stderrText())
	assert.False(t, dec.More(), "exactly one JSON object on stdout: %q", p.stdout.String())
	return r, code
}

func (p *proc) stderrText() string {
	b, _ := os.ReadFile(p.stderr)
	return string(b)
}

// checkpoint loads a migration's checkpoint (nil while there is none).
func (e *env) checkpoint(id string) *engine.Checkpoint {
	cp, err := e.store.Load(context.Background(), id)
	if err != nil {
		return nil
	}
	return cp
}

// waitFor polls the checkpoint until cond holds (or the process ended).
func (e *env) waitFor(id string, p *proc, what string, cond func(*engine.Checkpoint) bool) *engine.Checkpoint {
	e.t.Helper()
	deadline := time.Now().Add(runTimeout)
	for time.Now().Before(deadline) {
		if cp := e.checkpoint(id); cp != nil && cond(cp) {
			return cp
		}
		select {
		case <-p.done:
			e.t.Fatalf("the migration ended before %s: %s\nstderr:\n%s", what, p.stdout.String(), p.stderrText())
		case <-time.After(20 * time.Millisecond):
		}
	}
	e.t.Fatalf("timed out waiting for %s", what)
	return nil
}

// ---- fault gate ----

// gate is a reverse proxy in front of each pool's API. Armed with a
// condition, it holds the first API call (from anyone) for which the
// condition is true, reports it on hit and waits for release: the
// controller is then stopped inside a known phase, so a fault (cancel,
// kill) lands there deterministically.
type gate struct {
	t       testing.TB
	servers [2]*httptest.Server
	mu      sync.Mutex
	cond    func(method string) bool
	gen     int
	client  *http.Client
	log     *os.File
	hit     chan string
	release chan bool // true: answer 502 instead of forwarding
}

var methodRE = regexp.MustCompile(`<methodName>([^<]+)</methodName>`)

func newGate(t testing.TB, upstream [2]string, logPath string) *gate {
	g := &gate{t: t, hit: make(chan string, 1), release: make(chan bool, 1)}
	logf, err := os.Create(logPath)
	require.NoError(t, err)
	g.log = logf
	// a fresh upstream connection per call: no keep-alive reuse race
	// between a killed controller's calls and its successor's
	g.client = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	for i, u := range upstream {
		target := strings.TrimSuffix(u, "/")
		g.servers[i] = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, err := io.ReadAll(r.Body)
			if err != nil {
				g.logf("read request %s: %v", r.URL, err)
				return
			}
			if g.hold(r.Method, body) {
				w.WriteHeader(http.StatusBadGateway)
				return
			}
			g.forward(w, r, target, body)
		}))
	}
	t.Cleanup(func() {
		g.disarm()
		select { // a request still held must not block Close
		case g.release <- false:
		default:
		}
		for _, s := range g.servers {
			s.CloseClientConnections()
			s.Close()
		}
		g.mu.Lock()
		_ = g.log.Close()
		g.log = nil
		g.mu.Unlock()
	})
	return g
}

// forward sends the call upstream and copies the answer back; a failure
// is logged with the caller's state (gate.log in the test's directory).
func (g *gate) forward(w http.ResponseWriter, r *http.Request, target string, body []byte) {
	out, err := http.NewRequestWithContext(r.Context(), r.Method, target+r.URL.RequestURI(), bytes.NewReader(body))
	if err != nil {
		w.WriteHeader(http.StatusBadGateway)
		return
	}
	for k, v := range r.Header {
		out.Header[k] = v
	}
	resp, err := g.client.Do(out)
	if err != nil {
		g.logf("%s %s: upstream: %v (caller: %v)", r.Method, r.URL, err, r.Context().Err())
		w.WriteHeader(http.StatusBadGateway)
		return
	}
	defer resp.Body.Close()
	rb, err := io.ReadAll(resp.Body)
	if err != nil {
		g.logf("%s %s: upstream body: %v (caller: %v)", r.Method, r.URL, err, r.Context().Err())
		w.WriteHeader(http.StatusBadGateway)
		return
	}
	for k, v := range resp.Header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(rb)))
	w.WriteHeader(resp.StatusCode)
	if _, err := w.Write(rb); err != nil {
		g.logf("%s %s: write answer: %v (caller: %v)", r.Method, r.URL, err, r.Context().Err())
	}
}

func (g *gate) logf(format string, args ...any) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.log != nil {
		fmt.Fprintf(g.log, time.Now().UTC().Format(time.RFC3339Nano)+" "+format+"\n", args...)
	}
}

func (g *gate) urls() [2]string {
	return [2]string{g.servers[0].URL + "/", g.servers[1].URL + "/"}
}

// arm sets the condition; the next call for which it holds is held.
func (g *gate) arm(cond func(method string) bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.cond = cond
	g.gen++
}

func (g *gate) disarm() { g.arm(nil) }

// hold reports whether the call was held and must be dropped.
func (g *gate) hold(httpMethod string, body []byte) bool {
	if httpMethod != http.MethodPost {
		return false
	}
	g.mu.Lock()
	cond, gen := g.cond, g.gen
	g.mu.Unlock()
	if cond == nil {
		return false
	}
	method := ""
	if m := methodRE.FindSubmatch(body); m != nil {
		method = string(m[1])
	}
	if !cond(method) {
		return false
	}
	g.mu.Lock()
	if g.gen != gen || g.cond == nil {
		g.mu.Unlock()
		return false
	}
	g.cond = nil
	g.gen++
	g.mu.Unlock()
	g.hit <- method
	return <-g.release
}

// waitHit waits until the armed condition caught a call.
func (g *gate) waitHit(p *proc) string {
	g.t.Helper()
	select {
	case m := <-g.hit:
		return m
	case <-p.done:
		g.t.Fatalf("the migration ended before the gate caught a call: %s\nstderr:\n%s", p.stdout.String(), p.stderrText())
	case <-time.After(runTimeout):
		g.t.Fatal("the gate caught no call")
	}
	return ""
}

// inPhase is a gate condition: the migration's checkpoint is in phase ph
// (and more holds, when given).
func (e *env) inPhase(id string, ph engine.Phase, more func(method string, cp *engine.Checkpoint) bool) func(string) bool {
	return func(method string) bool {
		cp := e.checkpoint(id)
		return cp != nil && cp.Phase == ph && (more == nil || more(method, cp))
	}
}

// ---- checks ----

// location returns the site where the VM runs, failing unless it runs in
// exactly one place.
func (e *env) location() int {
	e.t.Helper()
	running := []int{}
	for site := range e.direct {
		c := e.client(site)
		ref, err := c.VMGetByUUID(context.Background(), e.vmUUID)
		if xapi.IsCode(err, xapi.CodeUUIDInvalid) {
			continue
		}
		require.NoError(e.t, err)
		ps, err := c.VMGetPowerState(context.Background(), ref)
		require.NoError(e.t, err)
		if ps == xapi.VMPowerStateRunning {
			running = append(running, site)
		}
	}
	require.Len(e.t, running, 1, "the VM runs in exactly one place")
	return running[0]
}

// guestVerify checks every disk of the VM against the guest's own record
// of what it wrote (sim.guest_verify).
func (e *env) guestVerify(site int) {
	e.t.Helper()
	var res map[string]string
	require.NoError(e.t, e.client(site).CallInto(context.Background(), &res, "sim.guest_verify", e.vmUUID))
	assert.Equal(e.t, "true", res["ok"], "sim.guest_verify: %v", res)
	assert.NotEqual(e.t, "0", res["disks"], "the guest wrote to its disk")
}

// tagged lists the VDIs of a pool that wanmotion tagged (snapshots,
// replicas) and no VM uses.
func (e *env) tagged(site int) []string {
	e.t.Helper()
	recs, err := e.client(site).VDIGetAllRecords(context.Background())
	require.NoError(e.t, err)
	var out []string
	for _, r := range recs {
		if r.OtherConfig["wanmotion:migration_id"] != "" && len(r.VBDs) == 0 {
			out = append(out, fmt.Sprintf("%s (%s, snapshot %v)", r.UUID, r.NameLabel, r.IsASnapshot))
		}
	}
	return out
}

// agents lists the live `wanmotion agent` processes of this env and the
// backend processes of this run (tests run one at a time, so any live
// backend belongs to the current test).
func (e *env) agents() []string {
	ents, _ := os.ReadDir("/proc")
	backend := filepath.Join(bins.plugins, "wanmotion-storage-nbd")
	var out []string
	for _, ent := range ents {
		if _, err := strconv.Atoi(ent.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		agent := len(args) > 2 && args[0] == bins.wanmotion && args[1] == "agent" && strings.Contains(string(b), e.stateDir)
		if agent || args[0] == backend {
			out = append(out, ent.Name()+" "+strings.Join(args, " "))
		}
	}
	return out
}

// agentPID reads the pid of a role's agent (<state>/agents-run/<id>-<role>/agent.pid).
func (e *env) agentPID(id, role string) int {
	e.t.Helper()
	b, err := os.ReadFile(filepath.Join(e.stateDir, "agents-run", id+"-"+role, "agent.pid"))
	require.NoError(e.t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(e.t, err)
	return pid
}

func (e *env) killAgents() {
	for _, p := range e.agents() {
		pid, _, _ := strings.Cut(p, " ")
		if n, err := strconv.Atoi(pid); err == nil {
			_ = syscall.Kill(n, syscall.SIGKILL)
		}
	}
}

// settled asserts the state after a migration ended: the VM runs at want
// and only there, its disks hold what the guest wrote, no wanmotion
// snapshot or replica is left, and no agent process is left.
func (e *env) settled(want int) {
	e.t.Helper()
	assert.Equal(e.t, want, e.location(), "site of the VM (0 = site-a, 1 = site-b)")
	e.guestVerify(want)
	assert.Empty(e.t, e.tagged(siteA), "no wanmotion snapshot left at the source")
	assert.Empty(e.t, e.tagged(siteB), "no replica left at the destination")
	deadline := time.Now().Add(20 * time.Second)
	for len(e.agents()) > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	assert.Empty(e.t, e.agents(), "no agent or backend process left")
}

func (e *env) dumpLogs() {
	files, _ := filepath.Glob(filepath.Join(e.dir, "*.stderr"))
	more, _ := filepath.Glob(filepath.Join(e.stateDir, "agents-run", "*", "agent.log"))
	files = append(append(files, more...), filepath.Join(e.dir, "sim.log"), filepath.Join(e.dir, "gate.log"))
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if len(b) > 20000 {
			b = b[len(b)-20000:]
		}
		e.t.Logf("==== %s:\n%s", f, b)
	}
}

// cutFree holds what a fault-free migration put on the emulated link, the
// yardstick for "re-sent bytes stay small".
var cutFree struct {
	mu   sync.Mutex
	link int64 // bytes both ways on the emulated link
	wire int64 // the report's bytes_on_wire
}

func (e *env) linkBytes() int64 {
	c := e.link.Counters()
	return c.Upstream + c.Downstream
}

// baseline returns the link bytes of a fault-free migration (measured by
// TestMigrateAndLinkCuts/success, or here when that did not run).
func baseline(t testing.TB) int64 {
	t.Helper()
	cutFree.mu.Lock()
	defer cutFree.mu.Unlock()
	if cutFree.link == 0 {
		e := newEnv(t)
		rep, code := e.migrate("wm-baseline").report(t)
		require.Equal(t, 0, code, "baseline migration: %+v", rep)
		cutFree.link, cutFree.wire = e.linkBytes(), rep.BytesOnWire
	}
	return cutFree.link
}

// assertLittleResent: the faulted migration (all its attempts) put at
// most limit× a fault-free migration's bytes on the emulated link.
func (e *env) assertLittleResent(limit float64) {
	e.t.Helper()
	b := baseline(e.t)
	ratio := float64(e.linkBytes()) / float64(b)
	e.t.Logf("link bytes: %d, fault-free %d (%.2fx)", e.linkBytes(), b, ratio)
	assert.Less(e.t, ratio, limit, "little re-sent")
}

// backendPID finds the storage backend process the agent with pid runs.
func (e *env) backendPID(agentPID int) int {
	e.t.Helper()
	backend := filepath.Join(bins.plugins, "wanmotion-storage-nbd")
	ents, _ := os.ReadDir("/proc")
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err != nil || strings.Split(string(b), "\x00")[0] != backend {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		rest := string(st[strings.LastIndexByte(string(st), ')')+1:])
		if f := strings.Fields(rest); len(f) > 1 && f[1] == strconv.Itoa(agentPID) {
			return pid
		}
	}
	e.t.Fatalf("no backend process of agent %d", agentPID)
	return 0
}
