package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi"
)

// xlStandIn is a POSIX sh xl with the state layout of the simulator's
// stand-in (notes: throttle-wire): domains in var/lib/xl-sim/domains/<domid>,
// "weight cap" in var/lib/xl-sim/sched/<domid>. Used when the simulator
// does not write its own.
const xlStandIn = `#!/bin/sh
root=$(dirname "$(dirname "$(dirname "$0")")")
st=$root/var/lib/xl-sim
case "$1" in
info) printf 'host                   : sim\nxen_major              : 4\nxen_scheduler          : %s\nxen_pagesize           : 4096\n' "${XL_SCHED:-credit}"; exit 0 ;;
sched-credit|sched-credit2) ;;
*) echo "xl: unknown command $1" >&2; exit 1 ;;
esac
[ "$2" = -d ] || { echo "usage" >&2; exit 1; }
d=$3
[ -f "$st/domains/$d" ] || { echo "  $d is an invalid domain identifier (rc=-6)" >&2; exit 1; }
w=256; c=0
[ -f "$st/sched/$d" ] && read w c < "$st/sched/$d"
if [ "$4" = -c ]; then mkdir -p "$st/sched"; echo "$w $5" > "$st/sched/$d"; exit 0; fi
printf '%-33s %4s %6s %4s\n' Name ID Weight Cap
printf '%-33s %5d %6d %4d\n' "vm $d" "$d" "$w" "$c"
`

// throttleHost prepares host h's xl for the throttle function: the
// simulator's stand-in when it writes one, else xlStandIn, with domain
// domid present. It returns xl's path.
func throttleHost(t *testing.T, e pluginEnv, h xapi.HostRef, domid int64, vmUUID string) string {
	t.Helper()
	root := filepath.Dir(e.sim.HostEtcDir(string(h)))
	xl := hostplugin.XLPathForEtc(filepath.Join(root, "etc"))
	if _, err := os.Stat(xl); err != nil {
		t.Logf("the simulator has no xl stand-in at %s: using the test's", xl)
		require.NoError(t, os.MkdirAll(filepath.Dir(xl), 0o755))
		require.NoError(t, os.WriteFile(xl, []byte(xlStandIn), 0o755))
	}
	dom := filepath.Join(root, "var", "lib", "xl-sim", "domains", fmt.Sprint(domid))
	if _, err := os.Stat(dom); err != nil {
		require.NoError(t, os.MkdirAll(filepath.Dir(dom), 0o755))
		require.NoError(t, os.WriteFile(dom, []byte(vmUUID+"\n"), 0o644))
	}
	return xl
}

// schedCap reads domain domid's cap with xl sched-credit -d (what an
// administrator would run in dom0).
func schedCap(t *testing.T, xl string, domid int64) int64 {
	t.Helper()
	c, err := hostplugin.XL{Path: xl, Sched: hostplugin.SchedCredit}.Cap(context.Background(), domid)
	require.NoError(t, err)
	return c
}

func TestHostPluginThrottle(t *testing.T) {
	e := newPluginEnv(t)
	ctx := context.Background()
	vms, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	require.Len(t, vms, 1)
	vm, err := e.src.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	require.Equal(t, xapi.VMPowerStateRunning, vm.PowerState)
	require.Positive(t, vm.Domid)
	xl := throttleHost(t, e, vm.ResidentOn, vm.Domid, vm.UUID)
	d := fmt.Sprint(vm.Domid)
	call := func(args map[string]string) (string, error) {
		return e.src.HostCallPlugin(ctx, vm.ResidentOn, hostplugin.PluginName, fnThrottle, args)
	}

	out, err := call(map[string]string{"domid": d, "cap": "100"})
	require.NoError(t, err)
	var res hostplugin.ThrottleResult
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, hostplugin.ThrottleResult{Scheduler: "credit", Domid: vm.Domid, PreviousCap: 0, Cap: 100}, res)
	assert.Equal(t, int64(100), schedCap(t, xl, vm.Domid), "xl sched-credit shows the cap")
	assert.JSONEq(t, fmt.Sprintf(`{"scheduler":"credit","domid":%d,"previous_cap":0,"cap":100}`, vm.Domid), out)

	out, err = call(map[string]string{"domid": d, "cap": "60"})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, int64(100), res.PreviousCap)
	assert.Equal(t, int64(60), schedCap(t, xl, vm.Domid))

	_, err = call(map[string]string{"domid": d, "cap": "0", "expect_cap": "100"})
	ae := requireAPIError(t, err, hostplugin.CodeCapChanged)
	assert.Contains(t, ae.Param(0), "cap 60")
	assert.Equal(t, int64(60), schedCap(t, xl, vm.Domid), "left alone")

	out, err = call(map[string]string{"domid": d, "cap": "0", "expect_cap": "60"})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, int64(60), res.PreviousCap)
	assert.Equal(t, int64(0), schedCap(t, xl, vm.Domid), "released")

	for _, tc := range []struct {
		name string
		args map[string]string
		code string
		msg  string
	}{
		{"dom0", map[string]string{"domid": "0", "cap": "10"}, hostplugin.CodeInvalidArgument, "dom0"},
		{"cap too big", map[string]string{"domid": d, "cap": "6401"}, hostplugin.CodeInvalidArgument, "cap 6401"},
		{"negative cap", map[string]string{"domid": d, "cap": "-5"}, hostplugin.CodeInvalidArgument, "cap -5"},
		{"domid not a number", map[string]string{"domid": "demo-vm", "cap": "10"}, hostplugin.CodeInvalidArgument, "not an integer"},
		{"missing cap", map[string]string{"domid": d}, hostplugin.CodeInvalidArgument, "cap is required"},
		{"unknown argument", map[string]string{"domid": d, "cap": "10", "weight": "5"}, hostplugin.CodeInvalidArgument, "weight"},
		{"no such domain", map[string]string{"domid": "4242", "cap": "10"}, hostplugin.CodeNotFound, "domain 4242"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := call(tc.args)
			ae := requireAPIError(t, err, tc.code)
			assert.Contains(t, ae.Param(0), tc.msg)
		})
	}
	assert.Equal(t, int64(0), schedCap(t, xl, vm.Domid), "no failed call changed the cap")

	// Without xl (a host where it is not at <root>/usr/sbin/xl) the error
	// names the path.
	require.NoError(t, os.Rename(xl, xl+".away"))
	t.Cleanup(func() { _ = os.Rename(xl+".away", xl) })
	_, err = call(map[string]string{"domid": d, "cap": "10"})
	ae = requireAPIError(t, err, hostplugin.CodeUnavailable)
	assert.Contains(t, ae.Param(0), xl)
	require.NoError(t, os.Rename(xl+".away", xl))
	assert.True(t, strings.HasSuffix(xl, filepath.Join("usr", "sbin", "xl")))
}
