package hostplugin

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Output of xl 4.17 (XCP-ng 8.3) as printed by xl info and
// xl sched-credit / sched-credit2 -d D (tools/xl/xl_info.c, xl_sched.c:
// header "%-33s %4s %6s %4s", row "%-33s %5d %6d %4d").
const (
	xlInfoCredit = `host                   : xcp-ng-host1
release                : 4.19.0+1
version                : #1 SMP Tue Jan 23 14:12:55 CET 2024
machine                : x86_64
nr_cpus                : 8
max_cpu_id             : 7
nr_nodes               : 1
cores_per_socket       : 4
threads_per_core       : 2
cpu_mhz                : 2394.374
hw_caps                : bfebfbff:77fef3ff:2c100800:00000121:0000000f:009c6fbf:00000000:00000100
virt_caps              : pv hvm hvm_directio pv_directio hap shadow
total_memory           : 32661
free_memory            : 20311
sharing_freed_memory   : 0
sharing_used_memory    : 0
outstanding_claims     : 0
free_cpus              : 0
xen_major              : 4
xen_minor              : 17
xen_extra              : .3-3
xen_version            : 4.17.3-3
xen_caps               : xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64
xen_scheduler          : credit
xen_pagesize           : 4096
platform_params        : virt_start=0xffff800000000000
xen_changeset          : 2bc4c1d8ed84, pq 4d2d61b7a4bd
xen_commandline        : dom0_mem=2624M,max:2624M watchdog ucode=scan dom0_max_vcpus=1-8 crashkernel=256M,below=4G console=vga vga=mode-0x0311 sched-gran=core
cc_compiler            : gcc (GCC) 11.2.1 20210728 (Red Hat 11.2.1-1)
cc_compile_by          : mockbuild
cc_compile_domain      : [unknown]
cc_compile_date        : Thu Feb  1 12:00:00 UTC 2024
build_id               : 8a3f0c2f8f8d1d6d0c6a2c7d3d8e1b3c
xend_config_format     : 4
`
	schedCredit = `Name                                ID Weight  Cap
Windows Server 2022 (1)              5    256    0
`
	schedCredit2 = `Name                                ID Weight  Cap
debian-12                           12    256  150
`
	// xl sched-credit without -d prints the cpupool line first.
	schedCreditAll = `Cpupool Pool-0: tslice=30ms ratelimit=1000us migration-delay=0us
Name                                ID Weight  Cap
Domain-0                             0    256    0
vm 7 256 0                           7    512   80
vm-12                               12    256    0
`
)

func TestParseXLInfoScheduler(t *testing.T) {
	for _, tc := range []struct {
		name, out, want string
		bad             bool
	}{
		{name: "credit", out: xlInfoCredit, want: "credit"},
		{name: "credit2", out: strings.Replace(xlInfoCredit, ": credit\n", ": credit2\n", 1), want: "credit2"},
		{name: "rtds", out: "host : h\nxen_scheduler          : rtds\n", want: "rtds"},
		{name: "missing", out: "host : h\nxen_version : 4.17\n", bad: true},
		{name: "empty value", out: "xen_scheduler :\n", bad: true},
		{name: "empty", out: "", bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseXLInfoScheduler(tc.out)
			if tc.bad {
				require.ErrorIs(t, err, ErrXLOutput)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseSchedCredit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		out   string
		domid int64
		want  SchedRow
		bad   bool
	}{
		{name: "credit, name with spaces", out: schedCredit, domid: 5, want: SchedRow{Name: "Windows Server 2022 (1)", ID: 5, Weight: 256, Cap: 0}},
		{name: "credit2 capped", out: schedCredit2, domid: 12, want: SchedRow{Name: "debian-12", ID: 12, Weight: 256, Cap: 150}},
		{name: "the row whose ID matches", out: schedCreditAll, domid: 7, want: SchedRow{Name: "vm 7 256 0", ID: 7, Weight: 512, Cap: 80}},
		{name: "dom0 row", out: schedCreditAll, domid: 0, want: SchedRow{Name: "Domain-0", ID: 0, Weight: 256, Cap: 0}},
		{name: "no such row", out: schedCredit, domid: 6, bad: true},
		{name: "header only", out: "Name                                ID Weight  Cap\n", domid: 5, bad: true},
		{name: "negative cap", out: "vm 5 256 -1\n", domid: 5, bad: true},
		{name: "empty", out: "", domid: 1, bad: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseSchedCredit(tc.out, tc.domid)
			if tc.bad {
				require.ErrorIs(t, err, ErrXLOutput)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func FuzzParseXLOutput(f *testing.F) {
	f.Add(xlInfoCredit, int64(5))
	f.Add(schedCredit, int64(5))
	f.Add(schedCredit2, int64(12))
	f.Add(schedCreditAll, int64(7))
	f.Add("xen_scheduler : \x00\n", int64(0))
	f.Add("a b 99999999999999999999 1 2\n", int64(-1))
	f.Fuzz(func(t *testing.T, out string, domid int64) {
		if s, err := ParseXLInfoScheduler(out); err == nil {
			assert.NotEmpty(t, s)
			assert.NotContains(t, s, " ")
		}
		row, err := ParseSchedCredit(out, domid)
		if err != nil {
			require.ErrorIs(t, err, ErrXLOutput)
			return
		}
		assert.Equal(t, domid, row.ID)
		assert.GreaterOrEqual(t, row.Cap, int64(0))
		assert.GreaterOrEqual(t, row.Weight, int64(0))
	})
}

func TestXLPathForEtc(t *testing.T) {
	assert.Equal(t, "/usr/sbin/xl", XLPathForEtc("/etc"))
	assert.Equal(t, "/state/pool1-host1/usr/sbin/xl", XLPathForEtc("/state/pool1-host1/etc"))
}

// fakeXL is an in-memory xl: one scheduler, caps per domain, a log of the
// commands run.
type fakeXL struct {
	sched   string
	caps    map[int64]int64
	ignore  bool // -c succeeds but changes nothing
	calls   []string
	setFail string
}

func (f *fakeXL) run(_ context.Context, name string, args ...string) (string, string, error) {
	f.calls = append(f.calls, strings.Join(append([]string{name}, args...), " "))
	exit := errors.New("exit status 1")
	if len(args) == 1 && args[0] == "info" {
		return strings.Replace(xlInfoCredit, ": credit\n", ": "+f.sched+"\n", 1), "", nil
	}
	if len(args) < 3 || args[1] != "-d" || args[0] != "sched-"+f.sched {
		return "", "xl: unknown command\n", exit
	}
	d, err := strconv.ParseInt(args[2], 10, 64)
	c, ok := f.caps[d]
	if err != nil || !ok {
		return "", fmt.Sprintf("  %s is an invalid domain identifier (rc=-6)\n", args[2]), exit
	}
	if len(args) == 3 {
		return fmt.Sprintf("Name                                ID Weight  Cap\nvm-%d %5d %6d %4d\n", d, d, 256, c), "", nil
	}
	if len(args) == 5 && args[3] == "-c" {
		if f.setFail != "" {
			return "", f.setFail, exit
		}
		v, err := strconv.ParseInt(args[4], 10, 64)
		if err != nil {
			return "", "bad cap", exit
		}
		if !f.ignore {
			f.caps[d] = v
		}
		return "", "", nil
	}
	return "", "bad args", exit
}

func TestXLFake(t *testing.T) {
	ctx := context.Background()
	for _, sched := range []string{SchedCredit, SchedCredit2} {
		t.Run(sched, func(t *testing.T) {
			f := &fakeXL{sched: sched, caps: map[int64]int64{0: 0, 5: 0, 9: 40}}
			x := XL{Path: "/root/usr/sbin/xl", Run: f.run}
			s, err := x.Scheduler(ctx)
			require.NoError(t, err)
			assert.Equal(t, sched, s)

			c, err := x.Cap(ctx, 9)
			require.NoError(t, err)
			assert.Equal(t, int64(40), c)
			assert.Equal(t, "/root/usr/sbin/xl sched-"+sched+" -d 9", f.calls[len(f.calls)-1])

			x.Sched = s
			f.calls = nil
			require.NoError(t, x.SetCap(ctx, 5, 100))
			assert.Equal(t, int64(100), f.caps[5])
			assert.Equal(t, []string{"/root/usr/sbin/xl sched-" + sched + " -d 5 -c 100", "/root/usr/sbin/xl sched-" + sched + " -d 5"},
				f.calls, "set then read back, no xl info once Sched is known")
			assert.Equal(t, int64(40), f.caps[9], "other domains untouched")

			_, err = x.Cap(ctx, 77)
			var xe *XLError
			require.ErrorAs(t, err, &xe)
			assert.Equal(t, "77 is an invalid domain identifier (rc=-6)", xe.Stderr, "stderr trimmed")
			assert.Contains(t, err.Error(), "domain 77")
			assert.Contains(t, err.Error(), "invalid domain identifier")

			require.ErrorIs(t, x.SetCap(ctx, 0, 50), ErrInvalidArgument, "never dom0")
			assert.Equal(t, int64(0), f.caps[0])
			require.ErrorIs(t, x.SetCap(ctx, 5, MaxCap+1), ErrInvalidArgument)
			require.ErrorIs(t, x.SetCap(ctx, 5, -1), ErrInvalidArgument)

			f.ignore = true
			require.ErrorIs(t, x.SetCap(ctx, 5, 30), ErrCapNotApplied)
			f.ignore = false
			f.setFail = "libxl: error: setting domain sched credit: Invalid argument\n"
			err = x.SetCap(ctx, 5, 30)
			require.ErrorAs(t, err, &xe)
			assert.Contains(t, err.Error(), "setting domain sched credit: Invalid argument")
		})
	}
}

func TestXLUnsupportedScheduler(t *testing.T) {
	ctx := context.Background()
	for _, sched := range []string{"rtds", "arinc653", "null"} {
		f := &fakeXL{sched: sched, caps: map[int64]int64{5: 0}}
		x := XL{Run: f.run}
		s, err := x.Scheduler(ctx)
		require.ErrorIs(t, err, ErrSchedulerUnsupported)
		var se *SchedulerError
		require.ErrorAs(t, err, &se)
		assert.Equal(t, sched, se.Scheduler)
		assert.Equal(t, sched, s)
		assert.Contains(t, err.Error(), "not supported")
		_, err = x.Cap(ctx, 5)
		require.ErrorIs(t, err, ErrSchedulerUnsupported)
		require.ErrorIs(t, x.SetCap(ctx, 5, 10), ErrSchedulerUnsupported)
		assert.Equal(t, "/usr/sbin/xl info", f.calls[0], "default path")
	}
}

// TestXLExec runs a real executable through the default Run (os/exec).
func TestXLExec(t *testing.T) {
	root := t.TempDir()
	xl := XLPathForEtc(filepath.Join(root, "etc"))
	require.NoError(t, os.MkdirAll(filepath.Dir(xl), 0o755))
	script := `#!/bin/sh
case "$1" in
info) echo "xen_scheduler          : credit2" ;;
sched-credit2) [ "$3" = 3 ] || { echo "  $3 is an invalid domain identifier (rc=-6)" >&2; exit 1; }
  echo "Name                                ID Weight  Cap"; echo "vm                                   3    256   25" ;;
*) echo "unknown $1" >&2; exit 1 ;;
esac
`
	require.NoError(t, os.WriteFile(xl, []byte(script), 0o755))
	x := XL{Path: xl}
	ctx := context.Background()
	s, err := x.Scheduler(ctx)
	require.NoError(t, err)
	assert.Equal(t, SchedCredit2, s)
	c, err := x.Cap(ctx, 3)
	require.NoError(t, err)
	assert.Equal(t, int64(25), c)
	_, err = x.Cap(ctx, 4)
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Contains(t, err.Error(), "4 is an invalid domain identifier")

	_, err = XL{Path: filepath.Join(root, "nope")}.Scheduler(ctx)
	require.Error(t, err)
	require.ErrorIs(t, err, os.ErrNotExist)
}

func TestParseThrottleArgs(t *testing.T) {
	i := func(v int64) *int64 { return &v }
	for _, tc := range []struct {
		name string
		args map[string]string
		want ThrottleArgs
		msg  string // error contains; "" = valid
	}{
		{name: "valid", args: map[string]string{"domid": "5", "cap": "100"}, want: ThrottleArgs{Domid: 5, Cap: 100}},
		{name: "release to no cap", args: map[string]string{"domid": "5", "cap": "0"}, want: ThrottleArgs{Domid: 5, Cap: 0}},
		{name: "expect_cap", args: map[string]string{"domid": "7", "cap": "0", "expect_cap": "160"}, want: ThrottleArgs{Domid: 7, Cap: 0, ExpectCap: i(160)}},
		{name: "max cap", args: map[string]string{"domid": "1", "cap": "6400"}, want: ThrottleArgs{Domid: 1, Cap: 6400}},
		{name: "dom0", args: map[string]string{"domid": "0", "cap": "100"}, msg: "dom0"},
		{name: "negative domid", args: map[string]string{"domid": "-3", "cap": "100"}, msg: "domid -3"},
		{name: "domid too big", args: map[string]string{"domid": "32752", "cap": "100"}, msg: "domid 32752"},
		{name: "domid not a number", args: map[string]string{"domid": "vm1", "cap": "100"}, msg: "not an integer"},
		{name: "no domid", args: map[string]string{"cap": "100"}, msg: "domid is required"},
		{name: "no cap", args: map[string]string{"domid": "5"}, msg: "cap is required"},
		{name: "cap too big", args: map[string]string{"domid": "5", "cap": "6401"}, msg: "cap 6401"},
		{name: "negative cap", args: map[string]string{"domid": "5", "cap": "-1"}, msg: "cap -1"},
		{name: "cap float", args: map[string]string{"domid": "5", "cap": "1.5"}, msg: "not an integer"},
		{name: "bad expect_cap", args: map[string]string{"domid": "5", "cap": "0", "expect_cap": "x"}, msg: "expect_cap"},
		{name: "check", args: map[string]string{"domid": "5", "check": "true"}, want: ThrottleArgs{Domid: 5, Check: true}},
		{name: "check false", args: map[string]string{"domid": "5", "cap": "10", "check": "false"}, want: ThrottleArgs{Domid: 5, Cap: 10}},
		{name: "check with cap", args: map[string]string{"domid": "5", "cap": "10", "check": "true"}, msg: "sets nothing"},
		{name: "check with expect_cap", args: map[string]string{"domid": "5", "expect_cap": "10", "check": "true"}, msg: "sets nothing"},
		{name: "check yes", args: map[string]string{"domid": "5", "check": "yes"}, msg: "want true or false"},
		{name: "check of dom0", args: map[string]string{"domid": "0", "check": "true"}, msg: "dom0"},
		{name: "unknown argument", args: map[string]string{"domid": "5", "cap": "0", "weight": "1"}, msg: `unknown argument "weight"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ParseThrottleArgs(tc.args)
			if tc.msg != "" {
				require.ErrorIs(t, err, ErrInvalidArgument)
				assert.Contains(t, err.Error(), tc.msg)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestThrottle(t *testing.T) {
	ctx := context.Background()
	f := &fakeXL{sched: SchedCredit2, caps: map[int64]int64{5: 0, 6: 300}}
	x := XL{Run: f.run}

	res, err := Throttle(ctx, x, ThrottleArgs{Domid: 5, Cap: 100})
	require.NoError(t, err)
	assert.Equal(t, ThrottleResult{Scheduler: SchedCredit2, Domid: 5, PreviousCap: 0, Cap: 100}, res)
	assert.Equal(t, int64(100), f.caps[5])

	res, err = Throttle(ctx, x, ThrottleArgs{Domid: 5, Cap: 50})
	require.NoError(t, err)
	assert.Equal(t, int64(100), res.PreviousCap, "a second call sees the first cap")
	assert.Equal(t, int64(50), f.caps[5])

	e := int64(100)
	_, err = Throttle(ctx, x, ThrottleArgs{Domid: 5, Cap: 0, ExpectCap: &e})
	require.ErrorIs(t, err, ErrCapChanged)
	assert.Equal(t, int64(50), f.caps[5], "not released over a cap it did not expect")
	e = 50
	res, err = Throttle(ctx, x, ThrottleArgs{Domid: 5, Cap: 0, ExpectCap: &e})
	require.NoError(t, err)
	assert.Equal(t, int64(50), res.PreviousCap)
	assert.Equal(t, int64(0), f.caps[5])

	f.calls = nil
	res, err = Throttle(ctx, x, ThrottleArgs{Domid: 6, Check: true})
	require.NoError(t, err)
	assert.Equal(t, ThrottleResult{Scheduler: SchedCredit2, Domid: 6, PreviousCap: 300, Cap: 300}, res)
	assert.Len(t, f.calls, 2, "check: xl info and one read")
	_, err = Throttle(ctx, x, ThrottleArgs{Domid: 9, Check: true})
	require.ErrorAs(t, err, new(*XLError), "check of a domain that is not there")

	f.calls = nil
	res, err = Throttle(ctx, x, ThrottleArgs{Domid: 6, Cap: 300})
	require.NoError(t, err)
	assert.Equal(t, int64(300), res.PreviousCap)
	assert.Len(t, f.calls, 2, "xl info and one read: the cap is already right")

	_, err = Throttle(ctx, x, ThrottleArgs{Domid: 9, Cap: 10})
	var xe *XLError
	require.ErrorAs(t, err, &xe)
	assert.Contains(t, err.Error(), "domain 9")
}
