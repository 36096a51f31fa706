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
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// schedCap reads domain domid's cap with xl sched-credit[2] -d (what an
// administrator would run in dom0) and checks the simulator's state file
// (what its guest workload obeys) says the same.
func schedCap(t *testing.T, xl string, domid int64) int64 {
	t.Helper()
	c, err := hostplugin.XL{Path: xl}.Cap(context.Background(), domid)
	require.NoError(t, err)
	root := filepath.Dir(filepath.Dir(filepath.Dir(xl)))
	b, err := os.ReadFile(filepath.Join(root, "var", "lib", "xl-sim", "sched", fmt.Sprint(domid)))
	if c == 0 && os.IsNotExist(err) {
		return c
	}
	require.NoError(t, err)
	f := strings.Fields(string(b))
	require.Len(t, f, 2, "sched file %q", b)
	assert.Equal(t, fmt.Sprint(c), f[1], "the sched file holds the cap")
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
	xl := e.sim.XLPath(string(vm.ResidentOn))
	require.FileExists(t, xl, "the simulator's xl stand-in")
	require.Equal(t, hostplugin.XLPathForEtc(e.sim.HostEtcDir(string(vm.ResidentOn))), xl, "where the plugin looks for xl")
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

	out, err = call(map[string]string{"domid": d, "check": "true"})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, hostplugin.ThrottleResult{Scheduler: "credit", Domid: vm.Domid, PreviousCap: 100, Cap: 100}, res, "check reads only")
	assert.Equal(t, int64(100), schedCap(t, xl, vm.Domid))

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
		{"check of no such domain", map[string]string{"domid": "4242", "check": "true"}, hostplugin.CodeNotFound, "domain 4242"},
		{"check with a cap", map[string]string{"domid": d, "check": "true", "cap": "5"}, hostplugin.CodeInvalidArgument, "sets nothing"},
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

	// credit2 (xl sched-credit2)
	require.NoError(t, e.sim.SetXLScheduler(string(vm.ResidentOn), xapisim.XLSchedCredit2))
	out, err = call(map[string]string{"domid": d, "cap": "150"})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &res))
	assert.Equal(t, hostplugin.ThrottleResult{Scheduler: "credit2", Domid: vm.Domid, PreviousCap: 0, Cap: 150}, res)
	assert.Equal(t, int64(150), schedCap(t, xl, vm.Domid))
}
