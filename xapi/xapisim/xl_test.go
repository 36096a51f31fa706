package xapisim

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// runXL runs the xl stand-in as a plugin would (environment PATH only).
func runXL(t *testing.T, xl string, args ...string) (stdout, stderr string, exit int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, xl, args...)
	cmd.Env = []string{PluginPath}
	cmd.Dir = "/"
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		require.NoError(t, err)
	}
	return out.String(), errb.String(), cmd.ProcessState.ExitCode()
}

// schedRow parses `xl sched-credit -d D` output: the header and the last
// three fields of the one row (names may contain spaces).
func schedRow(t *testing.T, out string) (name string, id, weight, cap int64) {
	t.Helper()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	require.Len(t, lines, 2, out)
	require.Equal(t, "Name                                ID Weight  Cap", lines[0])
	f := strings.Fields(lines[1])
	require.GreaterOrEqual(t, len(f), 4, lines[1])
	n := len(f)
	vals := make([]int64, 3)
	for i := range vals {
		v, err := strconv.ParseInt(f[n-3+i], 10, 64)
		require.NoError(t, err, lines[1])
		vals[i] = v
	}
	return strings.Join(f[:n-3], " "), vals[0], vals[1], vals[2]
}

// demoDomain returns the demo VM's uuid, domid and host (pool 0).
func demoDomain(t *testing.T, url, sess string) (uuid string, domid int64, host string) {
	t.Helper()
	vm := demoVM(t, url, sess)
	uuid = ok(t, url, "VM.get_uuid", sess, vm).(string)
	d, err := strconv.ParseInt(ok(t, url, "VM.get_domid", sess, vm).(string), 10, 64)
	require.NoError(t, err)
	return uuid, d, ok(t, url, "VM.get_resident_on", sess, vm).(string)
}

func TestXLStandIn(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	uuid, domid, host := demoDomain(t, url, sess)
	require.Positive(t, domid)
	xl := s.XLPath(host)
	require.Equal(t, filepath.Join(filepath.Dir(s.HostEtcDir(host)), "usr", "sbin", "xl"), xl)
	fi, err := os.Stat(xl)
	require.NoError(t, err)
	assert.NotZero(t, fi.Mode()&0o111, "executable")
	hostName := ok(t, url, "host.get_name_label", sess, host).(string)
	assert.Equal(t, xl, s.XLPath(hostName), "by name too")
	D := strconv.FormatInt(domid, 10)

	t.Run("info", func(t *testing.T) {
		out, stderr, code := runXL(t, xl, "info")
		require.Equal(t, 0, code, stderr)
		assert.Contains(t, out, "\nxen_scheduler          : credit\n")
		assert.Contains(t, out, "host                   : "+hostName+"\n")
		line := regexp.MustCompile(`^[a-z_]{1,23} *: `)
		for _, l := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
			assert.Regexp(t, line, l)
			assert.Equal(t, ": ", l[23:25], l)
		}
	})

	t.Run("read, set, read back", func(t *testing.T) {
		out, stderr, code := runXL(t, xl, "sched-credit", "-d", D)
		require.Equal(t, 0, code, stderr)
		name, id, w, c := schedRow(t, out)
		assert.Equal(t, uuid, name)
		assert.Equal(t, domid, id)
		assert.Equal(t, int64(256), w)
		assert.Equal(t, int64(0), c)
		for _, tc := range []struct {
			args         []string
			weight, cap_ int64
		}{
			{[]string{"-c", "50"}, 256, 50},
			{[]string{"-w", "512"}, 512, 50},
			{[]string{"-w", "128", "-c", "0"}, 128, 0},
			{[]string{"--cap=30"}, 128, 30},
			{[]string{"--weight", "256", "--cap", "007"}, 256, 7},
			{[]string{"-c160"}, 256, 160},
		} {
			for _, sub := range []string{"sched-credit", "sched-credit2"} {
				args := append([]string{sub, "-d", D}, tc.args...)
				out, stderr, code := runXL(t, xl, args...)
				require.Equal(t, 0, code, "%v: %s", args, stderr)
				assert.Empty(t, out, "setting is silent")
				assert.Empty(t, stderr)
				for _, rd := range []string{"sched-credit", "sched-credit2"} {
					out, _, code = runXL(t, xl, rd, "-d", D)
					require.Equal(t, 0, code)
					_, id, w, c := schedRow(t, out)
					assert.Equal(t, []int64{domid, tc.weight, tc.cap_}, []int64{id, w, c}, "%v then %s", args, rd)
				}
			}
		}
		b, err := os.ReadFile(filepath.Join(s.XLStateDir(host), "sched", D))
		require.NoError(t, err)
		assert.Equal(t, "256 160\n", string(b))
		// By name (the VM uuid, as xenopsd names domains), and dom0.
		out, _, code = runXL(t, xl, "sched-credit", "-d", uuid)
		require.Equal(t, 0, code)
		_, id, _, _ = schedRow(t, out)
		assert.Equal(t, domid, id)
		out, _, code = runXL(t, xl, "sched-credit", "-d", "0")
		require.Equal(t, 0, code)
		name, id, _, _ = schedRow(t, out)
		assert.Equal(t, []any{"Domain-0", int64(0)}, []any{name, id})
		// The listing holds every domain of the host.
		out, _, code = runXL(t, xl, "sched-credit")
		require.Equal(t, 0, code)
		assert.Contains(t, out, "Cpupool Pool-0:")
		assert.Regexp(t, `(?m)^Domain-0 +0 +256 +0$`, out)
		assert.Regexp(t, `(?m)^`+uuid+` +`+D+` +256 +160$`, out)
		_, _, code = runXL(t, xl, "sched-credit", "-d", D, "-c", "0")
		require.Equal(t, 0, code)
	})

	t.Run("errors", func(t *testing.T) {
		for _, tc := range []struct {
			args   []string
			stderr string
		}{
			{[]string{"sched-credit", "-d", "9999"}, "invalid domain identifier"},
			{[]string{"sched-credit", "-d", "9999", "-c", "10"}, "invalid domain identifier"},
			{[]string{"sched-credit2", "-d", "9999"}, "Domain 9999"},
			{[]string{"sched-credit", "-d", "no-such-vm"}, "no-such-vm is an invalid domain identifier"},
			{[]string{"sched-credit", "-d", D, "-c", "abc"}, "invalid cap"},
			{[]string{"sched-credit", "-d", D, "-c", "-5"}, "invalid cap"},
			{[]string{"sched-credit", "-d", D, "-c", ""}, "invalid cap"},
			{[]string{"sched-credit", "-d", D, "-c", "99999999999"}, "invalid cap"},
			{[]string{"sched-credit", "-d", D, "-w", "0"}, "weight out of range"},
			{[]string{"sched-credit", "-d", D, "-c"}, "requires an argument"},
			{[]string{"sched-credit", "-c", "10"}, "Must specify a domain"},
			{[]string{"sched-credit", "-d", D, "-x"}, "unrecognized option"},
			{[]string{"sched-rtds"}, "command not implemented"},
			{nil, "Usage"},
		} {
			out, stderr, code := runXL(t, xl, tc.args...)
			assert.Equal(t, 1, code, "%v", tc.args)
			assert.Contains(t, stderr, tc.stderr, "%v", tc.args)
			assert.NotContains(t, out, "Name", "%v", tc.args)
		}
		out, _, _ := runXL(t, xl, "sched-credit", "-d", D)
		_, _, w, c := schedRow(t, out)
		assert.Equal(t, []int64{256, 0}, []int64{w, c}, "failed calls changed nothing")
	})

	t.Run("credit2 host", func(t *testing.T) {
		require.NoError(t, s.SetXLScheduler(host, XLSchedCredit2))
		t.Cleanup(func() { require.NoError(t, s.SetXLScheduler(host, XLSchedCredit)) })
		out, _, code := runXL(t, xl, "info")
		require.Equal(t, 0, code)
		assert.Contains(t, out, "\nxen_scheduler          : credit2\n")
		_, stderr, code := runXL(t, xl, "sched-credit", "-d", D, "-c", "20")
		assert.Equal(t, 1, code, "the other scheduler's subcommand fails as with a real xl")
		assert.Contains(t, stderr, "libxl_domain_sched_params_set failed")
		_, stderr, code = runXL(t, xl, "sched-credit2", "-d", D, "-c", "20")
		require.Equal(t, 0, code, stderr)
		out, _, _ = runXL(t, xl, "sched-credit2", "-d", D)
		_, _, _, c := schedRow(t, out)
		assert.Equal(t, int64(20), c)
		assert.Error(t, s.SetXLScheduler(host, "rtds"))
	})
}

func TestXLPathWithSharedEtc(t *testing.T) {
	s, err := New(Config{StateDir: t.TempDir(), EtcDir: t.TempDir(), NoDemoVM: true, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	h := s.Pools()[0].Hosts()[0]
	assert.Empty(t, s.XLPath(h.Ref), "no per-host layout: no xl stand-in")
	assert.NoDirExists(t, filepath.Join(s.HostDir(h), "usr"))
	assert.Error(t, s.SetXLScheduler(h.Ref, XLSchedCredit2))
}

// domainFiles lists a host's registered domains: domid -> VM uuid.
func domainFiles(t *testing.T, s *Sim, host string) map[string]string {
	t.Helper()
	dir := filepath.Join(s.XLStateDir(host), "domains")
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	out := map[string]string{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(dir, e.Name()))
		require.NoError(t, err)
		out[e.Name()] = strings.TrimSpace(string(b))
	}
	return out
}

func TestXLDomainsFollowTheVM(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	p0 := s.Pools()[0]
	h1, h2 := p0.Hosts()[0].Ref, p0.Hosts()[1].Ref
	dom0 := func(host string) string {
		rec := ok(t, e.srcURL, "host.get_control_domain", e.srcSess, host).(string)
		return ok(t, e.srcURL, "VM.get_uuid", e.srcSess, rec).(string)
	}
	uuid, domid, host := demoDomain(t, e.srcURL, e.srcSess)
	require.Equal(t, h1, host)
	D := strconv.FormatInt(domid, 10)
	assert.Equal(t, map[string]string{"0": dom0(h1), D: uuid}, domainFiles(t, s, h1))
	assert.Equal(t, map[string]string{"0": dom0(h2)}, domainFiles(t, s, h2))

	// A cap belongs to the domain: it goes with it.
	_, stderr, code := runXL(t, s.XLPath(h1), "sched-credit", "-d", D, "-c", "40")
	require.Equal(t, 0, code, stderr)
	sched := filepath.Join(s.XLStateDir(h1), "sched", D)
	require.FileExists(t, sched)

	task := ok(t, e.srcURL, "Async.VM.pool_migrate", e.srcSess, e.vm, h2, map[string]any{"live": "true"}).(string)
	rec := waitTask(t, e.srcURL, e.srcSess, task)
	require.Equal(t, "success", rec["status"], "%v", rec["error_info"])
	_, domid2, host := demoDomain(t, e.srcURL, e.srcSess)
	require.Equal(t, h2, host)
	D2 := strconv.FormatInt(domid2, 10)
	assert.Equal(t, map[string]string{"0": dom0(h1)}, domainFiles(t, s, h1), "gone from the source host")
	assert.NoFileExists(t, sched)
	assert.Equal(t, map[string]string{"0": dom0(h2), D2: uuid}, domainFiles(t, s, h2))
	out, _, code := runXL(t, s.XLPath(h2), "sched-credit", "-d", D2)
	require.Equal(t, 0, code)
	_, _, _, c := schedRow(t, out)
	assert.Zero(t, c, "a new domain starts uncapped")
	_, _, code = runXL(t, s.XLPath(h1), "sched-credit", "-d", D)
	assert.Equal(t, 1, code, "the old domain is unknown to the source's xl")

	ok(t, e.srcURL, "VM.suspend", e.srcSess, e.vm)
	assert.Equal(t, map[string]string{"0": dom0(h2)}, domainFiles(t, s, h2), "suspended: no domain")
	ok(t, e.srcURL, "VM.resume_on", e.srcSess, e.vm, h1, false, false)
	_, domid3, _ := demoDomain(t, e.srcURL, e.srcSess)
	assert.Equal(t, map[string]string{"0": dom0(h1), strconv.FormatInt(domid3, 10): uuid}, domainFiles(t, s, h1))
	assert.Greater(t, domid3, domid2, "like Xen, a resumed domain gets a new domid, never a recent one")

	// Across pools: the destination host gets the domain, the source loses it.
	vdiMap, vifMap := e.maps()
	task = ok(t, e.srcURL, "Async.VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{"force": "true"}).(string)
	rec = waitTask(t, e.srcURL, e.srcSess, task)
	require.Equal(t, "success", rec["status"], "%v", rec["error_info"])
	destVM := strings.TrimSuffix(strings.TrimPrefix(rec["result"].(string), "<value>"), "</value>")
	assert.Equal(t, map[string]string{"0": dom0(h1)}, domainFiles(t, s, h1))
	dd, err := strconv.ParseInt(ok(t, e.dstURL, "VM.get_domid", e.dstSess, destVM).(string), 10, 64)
	require.NoError(t, err)
	dst := domainFiles(t, s, e.dstHost)
	assert.Equal(t, uuid, dst[strconv.FormatInt(dd, 10)])
	assert.Len(t, dst, 2)

	ok(t, e.dstURL, "VM.hard_shutdown", e.dstSess, destVM)
	assert.Len(t, domainFiles(t, s, e.dstHost), 1, "halted: only dom0 is left")
}

func TestXLDomainsAfterRestart(t *testing.T) {
	dir := t.TempDir()
	s := startSim(t, dir)
	url, sess := login(t, s, 0)
	uuid, domid, host := demoDomain(t, url, sess)
	D := strconv.FormatInt(domid, 10)
	_, _, code := runXL(t, s.XLPath(host), "sched-credit", "-d", D, "-c", "25")
	require.Equal(t, 0, code)
	st := s.XLStateDir(host)
	require.NoError(t, os.WriteFile(filepath.Join(st, "domains", "77"), []byte("stale\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(st, "sched", "77"), []byte("256 10\n"), 0o644))
	require.NoError(t, s.Close())

	s2 := startSim(t, dir)
	assert.Equal(t, uuid, domainFiles(t, s2, host)[D], "the running VM keeps its domain")
	assert.NotContains(t, domainFiles(t, s2, host), "77")
	assert.NoFileExists(t, filepath.Join(st, "sched", "77"))
	out, _, code := runXL(t, s2.XLPath(host), "sched-credit", "-d", D)
	require.Equal(t, 0, code)
	_, _, _, c := schedRow(t, out)
	assert.Equal(t, int64(25), c, "a running domain keeps its cap over a simulator restart")
}

func TestGuestHonoursXLCap(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	_, domid, host := demoDomain(t, e.srcURL, e.srcSess)
	require.Equal(t, "2", ok(t, e.srcURL, "VM.get_VCPUs_at_startup", e.srcSess, e.vm))
	const rate, dirty, bs = 4 << 20, 2 << 20, 64 << 10
	ok(t, e.srcURL, "sim.guest_start", e.srcSess, e.vm, map[string]any{"rate": itoa(rate), "dirty_rate": itoa(dirty)})
	t.Cleanup(func() { _ = s.StopGuest(e.vmUUID) })
	stats := func() map[string]any {
		return ok(t, e.srcURL, "sim.guest_stats", e.srcSess, e.vm).(map[string]any)
	}
	waitFor := func(capv, eff, effDirty int64) {
		t.Helper()
		require.Eventually(t, func() bool {
			st := stats()
			return st["cap"] == itoa(capv) && st["effective_rate"] == itoa(eff) && st["effective_dirty_rate"] == itoa(effDirty)
		}, 10*time.Second, 20*time.Millisecond, "want cap %d rate %d", capv, eff)
	}
	waitFor(0, rate, dirty)
	assert.Equal(t, "2", stats()["vcpus"])
	xl := s.XLPath(host)
	D := strconv.FormatInt(domid, 10)
	setCap := func(c string) {
		t.Helper()
		_, stderr, code := runXL(t, xl, "sched-credit", "-d", D, "-c", c)
		require.Equal(t, 0, code, stderr)
	}

	setCap("50") // half of one CPU for a 2-vCPU VM: a quarter
	waitFor(50, rate/4, dirty/4)
	st0, err := s.GuestStats(e.vmUUID)
	require.NoError(t, err)
	t0 := time.Now()
	time.Sleep(2 * time.Second)
	st1, err := s.GuestStats(e.vmUUID)
	require.NoError(t, err)
	elapsed := time.Since(t0).Seconds()
	// A hard bound, not a speed expectation: the budget grows at the
	// effective rate and carries at most one second's worth (or a block).
	eff := float64(rate) / 4
	written := float64(st1.BytesWritten - st0.BytesWritten)
	assert.LessOrEqual(t, written, eff*elapsed+eff+2*bs, "written %.0f in %.2fs", written, elapsed)
	assert.Less(t, written, 0.5*rate*elapsed)
	pages := float64(st1.PagesDirtied - st0.PagesDirtied)
	assert.LessOrEqual(t, pages, (float64(dirty)/4*elapsed+float64(dirty)/4)/PageSize+2)
	require.Eventually(t, func() bool {
		st, _ := s.GuestStats(e.vmUUID)
		return st.Writes > st1.Writes
	}, 10*time.Second, 20*time.Millisecond, "still writing under the cap")

	for _, tc := range []struct {
		cap_     string
		capv     int64
		eff, drt int64
	}{
		{"400", 400, rate, dirty}, // more than the VM's 2 CPUs: no slowdown
		{"1", 1, rate / 200, dirty / 200},
		{"0", 0, rate, dirty},
	} {
		setCap(tc.cap_)
		waitFor(tc.capv, tc.eff, tc.drt)
	}
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK)
}

func TestParseSchedCap(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"256 50\n", 50, true},
		{"256 0", 0, true},
		{"", 0, false},
		{"256", 0, false},
		{"256 x", 0, false},
		{"256 -1", 0, false},
	} {
		got, ok := parseSchedCap([]byte(tc.in))
		assert.Equal(t, tc.ok, ok, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
}
