package xapiadapt

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
	"github.com/wanmotion/wanmotion/xapiplugin"
)

func TestThrottleCap(t *testing.T) {
	for _, tc := range []struct {
		vcpus   int64
		percent int
		want    int64
	}{
		{vcpus: 2, percent: 50, want: 100},
		{vcpus: 1, percent: 20, want: 80},
		{vcpus: 4, percent: 90, want: 40},
		{vcpus: 8, percent: 0, want: 800},
		{vcpus: 1, percent: 100, want: 1},
		{vcpus: 3, percent: 99, want: 3},
	} {
		assert.Equal(t, tc.want, ThrottleCap(tc.vcpus, tc.percent), "%d vCPUs, %d%%", tc.vcpus, tc.percent)
	}
}

// buildPlugin builds the wanmotion command (the host plugin).
func buildPlugin(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "wanmotion")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, gobin, "build", "-buildvcs=false", "-o", bin, "../../cmd/wanmotion").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

// simCap reads the domain's cap with the host's xl stand-in.
func simCap(t *testing.T, s *xapisim.Sim, host string, domid int64) int64 {
	t.Helper()
	c, err := hostplugin.XL{Path: s.XLPath(host)}.Cap(context.Background(), domid)
	require.NoError(t, err)
	return c
}

// otherHost is a host of c's pool other than h.
func otherHost(t *testing.T, c *xapi.Client, h xapi.HostRef) xapi.HostRef {
	t.Helper()
	hosts, err := c.HostGetAll(context.Background())
	require.NoError(t, err)
	for _, o := range hosts {
		if o != h {
			return o
		}
	}
	t.Fatalf("no host but %s", h)
	return ""
}

type throttleEnv struct {
	sim *xapisim.Sim
	src *xapi.Client
}

func (e throttleEnv) demoVM(t *testing.T) engine.VMRecord {
	t.Helper()
	vm, err := NewPool(e.src, testutil.Logger(t)).FindVM(context.Background(), xapisim.DemoVMName)
	require.NoError(t, err)
	return vm
}

// newThrottleEnv is one simulated pool of two hosts.
func newThrottleEnv(t *testing.T) throttleEnv {
	t.Helper()
	ctx := context.Background()
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 1, HostsPerPool: 2, DiskSize: 4 << 20, FillSize: 1 << 20,
		MemorySize: 4 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(ctx, "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	pi := s.Info().Pools[0]
	c, err := xapi.New(xapi.Config{URL: pi.URL, Username: pi.Username, Password: pi.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return throttleEnv{sim: s, src: c}
}

func TestThrottleSimulator(t *testing.T) {
	ctx := context.Background()
	e := newThrottleEnv(t)
	require.NoError(t, e.sim.InstallPlugin(hostplugin.PluginName, buildPlugin(t)))
	th := NewThrottle(e.src, testutil.Logger(t))
	vm := e.demoVM(t)
	rec, err := e.src.VMGetRecord(ctx, xapi.VMRef(vm.Ref))
	require.NoError(t, err)
	require.Equal(t, int64(2), rec.VCPUsAtStartup, "the demo VM has 2 vCPUs")
	host := string(rec.ResidentOn)

	require.NoError(t, th.CheckThrottle(ctx, vm.UUID))
	assert.Equal(t, int64(0), simCap(t, e.sim, host, rec.Domid), "check sets nothing")

	st, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.NoError(t, err)
	assert.Equal(t, engine.ThrottleState{Host: host, Domid: rec.Domid, VCPUs: 2, Scheduler: "credit", PrevCap: 0, Percent: 50, Cap: 100}, st)
	assert.Equal(t, int64(100), simCap(t, e.sim, host, rec.Domid), "xl sched-credit shows cap 100")

	st2, err := th.ThrottleGuest(ctx, vm.UUID, 80, &st)
	require.NoError(t, err)
	assert.Equal(t, int64(40), st2.Cap)
	assert.Equal(t, int64(0), st2.PrevCap, "the original cap stays known across steps")
	assert.Equal(t, int64(40), simCap(t, e.sim, host, rec.Domid))

	require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st2))
	assert.Equal(t, int64(0), simCap(t, e.sim, host, rec.Domid), "released to the cap before the throttle")

	t.Run("a cap changed meanwhile is left alone", func(t *testing.T) {
		x := hostplugin.XL{Path: e.sim.XLPath(host)}
		st, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.NoError(t, err)
		require.NoError(t, x.SetCap(ctx, rec.Domid, 30), "an administrator caps the guest harder")
		_, err = th.ThrottleGuest(ctx, vm.UUID, 60, &st)
		require.ErrorIs(t, err, engine.ErrThrottleConflict, "a step does not overwrite it")
		assert.Equal(t, int64(30), simCap(t, e.sim, host, rec.Domid))
		err = th.ReleaseThrottle(ctx, vm.UUID, st)
		require.ErrorIs(t, err, engine.ErrThrottleConflict, "nor does the release")
		assert.Equal(t, int64(30), simCap(t, e.sim, host, rec.Domid))
		// a replay after a crash (the cap already is the target) is fine
		require.NoError(t, x.SetCap(ctx, rec.Domid, 100))
		st60, err := th.ThrottleGuest(ctx, vm.UUID, 60, &st)
		require.NoError(t, err)
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st60))
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st60), "a second release (crash before saving) finds the cap already back")
		assert.Equal(t, int64(0), simCap(t, e.sim, host, rec.Domid))
	})

	t.Run("an administrator's cap is put back", func(t *testing.T) {
		x := hostplugin.XL{Path: e.sim.XLPath(host)}
		require.NoError(t, x.SetCap(ctx, rec.Domid, 150))
		st, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.NoError(t, err)
		assert.Equal(t, int64(150), st.PrevCap)
		assert.Equal(t, int64(100), simCap(t, e.sim, host, rec.Domid))
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st))
		assert.Equal(t, int64(150), simCap(t, e.sim, host, rec.Domid))
		require.NoError(t, x.SetCap(ctx, rec.Domid, 0))
	})

	t.Run("a domain that moved", func(t *testing.T) {
		st, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.NoError(t, err)
		require.NoError(t, e.src.VMSuspend(ctx, xapi.VMRef(vm.Ref)))
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st), "suspended: nothing to release")
		_, err = th.ThrottleGuest(ctx, vm.UUID, 50, &st)
		require.ErrorIs(t, err, ErrVMNotRunning)
		assert.Contains(t, err.Error(), "Suspended")
		require.NoError(t, e.src.VMResume(ctx, xapi.VMRef(vm.Ref), false, false))

		st, err = th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.NoError(t, err)
		other := otherHost(t, e.src, xapi.HostRef(st.Host))
		require.NoError(t, e.src.VMPoolMigrate(ctx, xapi.VMRef(vm.Ref), other, map[string]string{"live": "true"}))
		now, err := e.src.VMGetRecord(ctx, xapi.VMRef(vm.Ref))
		require.NoError(t, err)
		require.Equal(t, xapi.VMPowerStateRunning, now.PowerState)
		require.Equal(t, other, now.ResidentOn)
		x := hostplugin.XL{Path: e.sim.XLPath(string(other))}
		require.NoError(t, x.SetCap(ctx, now.Domid, 70), "a cap the new domain got from someone else")

		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st), "the old domain's throttle went with it")
		assert.Equal(t, int64(70), simCap(t, e.sim, string(other), now.Domid), "the new domain is left alone")

		st2, err := th.ThrottleGuest(ctx, vm.UUID, 60, &st)
		require.NoError(t, err)
		assert.Equal(t, now.Domid, st2.Domid)
		assert.Equal(t, string(other), st2.Host)
		assert.Equal(t, int64(70), st2.PrevCap, "a fresh start: the new domain's cap")
		assert.Equal(t, int64(80), st2.Cap)
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st2))
		assert.Equal(t, int64(70), simCap(t, e.sim, string(other), now.Domid))
	})

	t.Run("paused", func(t *testing.T) {
		st, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.NoError(t, err)
		require.NotEqual(t, st.Cap, st.PrevCap)
		require.NoError(t, e.src.VMPause(ctx, xapi.VMRef(vm.Ref)))
		t.Cleanup(func() { _ = e.src.VMUnpause(context.Background(), xapi.VMRef(vm.Ref)) })
		_, err = th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.ErrorIs(t, err, ErrVMNotRunning)
		assert.Contains(t, err.Error(), "Paused")
		require.ErrorIs(t, th.CheckThrottle(ctx, vm.UUID), ErrVMNotRunning)

		now, err := e.src.VMGetRecord(ctx, xapi.VMRef(vm.Ref))
		require.NoError(t, err)
		require.Equal(t, st.Domid, now.Domid)
		assert.Equal(t, int64(100), simCap(t, e.sim, st.Host, st.Domid), "a paused domain keeps its cap")
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st))
		assert.Equal(t, st.PrevCap, simCap(t, e.sim, st.Host, st.Domid), "and is released")
	})

	t.Run("no such vm", func(t *testing.T) {
		_, err := th.ThrottleGuest(ctx, "00000000-0000-0000-0000-00000000abcd", 50, nil)
		require.ErrorIs(t, err, engine.ErrNotFound)
		require.NoError(t, th.ReleaseThrottle(ctx, "00000000-0000-0000-0000-00000000abcd", st), "gone: nothing to release")
	})

	t.Run("bad percent", func(t *testing.T) {
		_, err := th.ThrottleGuest(ctx, vm.UUID, 101, nil)
		require.ErrorIs(t, err, engine.ErrConfig)
	})
}

// Without the host plugin the error tells the administrator to install it.
func TestThrottleWithoutHostPlugin(t *testing.T) {
	ctx := context.Background()
	e := newThrottleEnv(t)
	th := NewThrottle(e.src, testutil.Logger(t))
	vm := e.demoVM(t)
	require.ErrorIs(t, th.CheckThrottle(ctx, vm.UUID), ErrNoHostPlugin, "found while planning")
	_, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.ErrorIs(t, err, ErrNoHostPlugin)
	require.ErrorIs(t, err, xapi.ErrXenAPIMissingPlugin)
	assert.Contains(t, err.Error(), "packaging/install.sh")
	assert.Contains(t, err.Error(), "site-a-host1", "names the host")

	rec, err := e.src.VMGetRecord(ctx, xapi.VMRef(vm.Ref))
	require.NoError(t, err)
	err = th.ReleaseThrottle(ctx, vm.UUID, engine.ThrottleState{Host: string(rec.ResidentOn), Domid: rec.Domid, Cap: 100})
	require.ErrorIs(t, err, ErrNoHostPlugin, "a release that cannot run is an error (the cap stays)")
}

// scriptPlugin installs a host plugin that always answers out.
func scriptPlugin(t *testing.T, s *xapisim.Sim, out []byte) {
	t.Helper()
	dir := t.TempDir()
	resp := filepath.Join(dir, "response.xml")
	require.NoError(t, os.WriteFile(resp, out, 0o644))
	script := filepath.Join(dir, "wanmotion")
	require.NoError(t, os.WriteFile(script, []byte("#!/bin/sh\ncat '"+resp+"'\n"), 0o755))
	require.NoError(t, s.InstallPlugin(hostplugin.PluginName, script))
}

// An older host plugin (no throttle function) or a wrong answer.
func TestThrottlePluginAnswers(t *testing.T) {
	ctx := context.Background()
	e := newThrottleEnv(t)
	th := NewThrottle(e.src, testutil.Logger(t))
	vm := e.demoVM(t)

	scriptPlugin(t, e.sim, xapiplugin.Failure(hostplugin.CodeUnknownFunction, `unknown function "throttle" (functions: migrate, version)`, "throttle"))
	_, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.ErrorIs(t, err, ErrNoHostPlugin)
	assert.Contains(t, err.Error(), "no throttle function")
	assert.Contains(t, err.Error(), "upgrade wanmotion")

	scriptPlugin(t, e.sim, xapiplugin.Failure(hostplugin.CodeUnavailable, `xen scheduler "rtds": setting a vCPU cap is not supported (the throttle needs credit or credit2)`))
	_, err = th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not supported", "the plugin's message reaches the engine")
	err = th.CheckThrottle(ctx, vm.UUID)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `xen scheduler "rtds"`)
	assert.Contains(t, err.Error(), "site-a-host1")

	scriptPlugin(t, e.sim, xapiplugin.Success(`{"scheduler":"credit","domid":1,"previous_cap":0,"cap":5}`))
	_, err = th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.Error(t, err, "an answer for another cap is refused")
	assert.Contains(t, err.Error(), "cap 100")

	scriptPlugin(t, e.sim, xapiplugin.Failure(hostplugin.CodeNotFound, "domain 1 on this host: no such domain", "1"))
	rec, err := e.src.VMGetRecord(ctx, xapi.VMRef(vm.Ref))
	require.NoError(t, err)
	err = th.ReleaseThrottle(ctx, vm.UUID, engine.ThrottleState{Host: string(rec.ResidentOn), Domid: rec.Domid, Cap: 100})
	require.Error(t, err, "xl says no such domain but xapi says the vm runs as it: not taken as released")
	assert.Contains(t, err.Error(), "although xapi says the vm runs as it")
	assert.Contains(t, err.Error(), "xl sched-credit -d 1 -c 0")
}

// The cap follows the domain's live vCPU count (VM_metrics.VCPUs_number),
// not VCPUs_at_startup, which may already hold the count for the next boot.
func TestThrottleLiveVCPUs(t *testing.T) {
	ctx := context.Background()
	e := newThrottleEnv(t)
	require.NoError(t, e.sim.InstallPlugin(hostplugin.PluginName, buildPlugin(t)))
	th := NewThrottle(e.src, testutil.Logger(t))
	vm := e.demoVM(t)
	ref := xapi.VMRef(vm.Ref)

	// A 4-vCPU VM: halt, resize, start.
	for _, c := range [][]any{{"VM.hard_shutdown", ref}, {"VM.set_VCPUs_max", ref, int64(4)},
		{"VM.set_VCPUs_at_startup", ref, int64(4)}, {"VM.start", ref, false, false}} {
		_, err := e.src.Call(ctx, c[0].(string), c[1:]...)
		require.NoError(t, err, "%v", c[0])
	}
	rec, err := e.src.VMGetRecord(ctx, ref)
	require.NoError(t, err)
	live, err := e.src.VMMetricsGetVCPUsNumber(ctx, rec.Metrics)
	require.NoError(t, err)
	require.Equal(t, int64(4), live)
	host := string(rec.ResidentOn)
	st, err := th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.NoError(t, err)
	assert.Equal(t, int64(200), st.Cap, "4 vCPUs throttled by 50%")
	require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st))

	// Hot-unplug to 2, then set 4 again for the next boot only.
	require.NoError(t, e.src.VMSetVCPUsNumberLive(ctx, ref, 2))
	_, err = e.src.Call(ctx, "VM.set_VCPUs_at_startup", ref, int64(4))
	require.NoError(t, err)
	rec, err = e.src.VMGetRecord(ctx, ref)
	require.NoError(t, err)
	require.Equal(t, int64(4), rec.VCPUsAtStartup)

	st, err = th.ThrottleGuest(ctx, vm.UUID, 50, nil)
	require.NoError(t, err)
	assert.Equal(t, engine.ThrottleState{Host: host, Domid: rec.Domid, VCPUs: 2, Scheduler: "credit", PrevCap: 0, Percent: 50, Cap: 100}, st,
		"2 live vCPUs throttled by 50%: cap 100, not 200")
	assert.Equal(t, int64(100), simCap(t, e.sim, host, rec.Domid))
	rd, err := th.ReadThrottle(ctx, vm.UUID)
	require.NoError(t, err)
	assert.Equal(t, int64(2), rd.VCPUs)
	require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st))
	assert.Equal(t, int64(0), simCap(t, e.sim, host, rec.Domid))

	// Metrics that cannot be read (dangling, then null): VCPUs_at_startup.
	p := e.sim.Pools()[0]
	for _, null := range []bool{false, true} {
		require.NoError(t, p.DropVMMetrics(vm.UUID, null))
		rec, err = e.src.VMGetRecord(ctx, ref)
		require.NoError(t, err)
		require.Equal(t, null, rec.Metrics.IsNull())
		st, err = th.ThrottleGuest(ctx, vm.UUID, 50, nil)
		require.NoError(t, err, "null metrics: %v", null)
		assert.Equal(t, int64(4), st.VCPUs, "null metrics: %v", null)
		assert.Equal(t, int64(200), st.Cap, "null metrics: %v", null)
		require.NoError(t, th.CheckThrottle(ctx, vm.UUID))
		require.NoError(t, th.ReleaseThrottle(ctx, vm.UUID, st))
	}
}
