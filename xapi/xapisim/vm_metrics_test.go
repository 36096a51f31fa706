package xapisim

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
)

// Every VM (dom0 included) has a VM_metrics object; VCPUs_number is the
// running domain's vCPU count, as xapi reports it.
func TestVMMetricsOnTheWire(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	m := ok(t, url, "VM.get_metrics", sess, vm).(string)
	assert.Regexp(t, `^OpaqueRef:[0-9a-f-]{36}$`, m)

	// xapi sends ints as strings.
	assert.Equal(t, "2", ok(t, url, "VM_metrics.get_VCPUs_number", sess, m))
	rec := ok(t, url, "VM_metrics.get_record", sess, m).(map[string]any)
	assert.Equal(t, "2", rec["VCPUs_number"])
	assert.Equal(t, "unspecified", rec["current_domain_type"])
	for _, f := range []string{"uuid", "memory_actual", "VCPUs_CPU", "VCPUs_params", "state", "start_time",
		"install_time", "last_updated", "other_config", "hvm", "nested_virt", "nomigrate", "numa_optimised",
		"numa_nodes", "numa_node_memory"} {
		assert.Contains(t, rec, f)
	}
	body := string(rawCall(t, url, "VM_metrics.get_VCPUs_number", sess, m))
	assert.Contains(t, body, `<member><name>Value</name><value>2</value></member>`)
	body = string(rawCall(t, url, "VM_metrics.get_record", sess, m))
	assert.Contains(t, body, `<member><name>VCPUs_number</name><value>2</value></member>`)
	assert.Regexp(t, `<member><name>start_time</name><value><dateTime.iso8601>\d{8}T\d\d:\d\d:\d\dZ</dateTime.iso8601></value></member>`, body)

	// No constructor on the wire.
	_, f := call(t, url, "VM_metrics.create", sess, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, ErrMethodUnknown, f.Code)

	recs := ok(t, url, "VM.get_all_records", sess).(map[string]any)
	seen := map[string]bool{}
	for ref, r := range recs {
		mr := r.(map[string]any)["metrics"].(string)
		require.NotEqual(t, NullRef, mr, ref)
		assert.False(t, seen[mr], "metrics shared: %s", ref)
		seen[mr] = true
		if r.(map[string]any)["is_control_domain"] == true {
			assert.Equal(t, "4", ok(t, url, "VM_metrics.get_VCPUs_number", sess, mr), "dom0")
		}
	}
	assert.Len(t, ok(t, url, "VM_metrics.get_all", sess), len(recs))
}

func TestVMSetVCPUsNumberLive(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	m := ok(t, url, "VM.get_metrics", sess, vm).(string)

	ok(t, url, "VM.set_VCPUs_number_live", sess, vm, "1")
	assert.Equal(t, "1", ok(t, url, "VM_metrics.get_VCPUs_number", sess, m))
	assert.Equal(t, "1", ok(t, url, "VM.get_VCPUs_at_startup", sess, vm), "xapi_xenops.set_vcpus sets both")

	for _, n := range []string{"0", "3", "-1"} { // VCPUs_max is 2
		_, f := call(t, url, "VM.set_VCPUs_number_live", sess, vm, n)
		require.NotNil(t, f, n)
		assert.Equal(t, ErrInvalidValue, f.Code, n)
		assert.Equal(t, []string{"VCPU values must satisfy: 0 < VCPUs ≤ VCPUs_max", n}, append([]string{}, f.Params...))
	}
	assert.Equal(t, "1", ok(t, url, "VM_metrics.get_VCPUs_number", sess, m))

	// VCPUs_at_startup may change while the VM runs (next boot); the
	// domain keeps its count until it is rebuilt.
	ok(t, url, "VM.set_VCPUs_at_startup", sess, vm, "2")
	assert.Equal(t, "1", ok(t, url, "VM_metrics.get_VCPUs_number", sess, m))

	ok(t, url, "VM.hard_shutdown", sess, vm)
	_, f := call(t, url, "VM.set_VCPUs_number_live", sess, vm, "1")
	require.NotNil(t, f)
	assert.Equal(t, ErrVMBadPowerState, f.Code)
	ok(t, url, "VM.start", sess, vm, false, false)
	assert.Equal(t, m, ok(t, url, "VM.get_metrics", sess, vm), "the object stays with the VM")
	assert.Equal(t, "2", ok(t, url, "VM_metrics.get_VCPUs_number", sess, m), "a new domain starts with VCPUs_at_startup")

	// A snapshot gets its own copy, destroyed with it.
	snap := ok(t, url, "VM.snapshot", sess, vm, "s1").(string)
	sm := ok(t, url, "VM.get_metrics", sess, snap).(string)
	assert.NotEqual(t, m, sm)
	assert.Equal(t, "2", ok(t, url, "VM_metrics.get_VCPUs_number", sess, sm))
	ok(t, url, "VM.destroy", sess, snap)
	_, f = call(t, url, "VM_metrics.get_record", sess, sm)
	require.NotNil(t, f)
	assert.Equal(t, ErrHandleInvalid, f.Code)

	// SetLiveVCPUs changes the domain's count behind xapi's back.
	uuid := ok(t, url, "VM.get_uuid", sess, vm).(string)
	require.NoError(t, s.Pools()[0].SetLiveVCPUs(uuid, 1))
	assert.Equal(t, "1", ok(t, url, "VM_metrics.get_VCPUs_number", sess, m))
	assert.Equal(t, "2", ok(t, url, "VM.get_VCPUs_at_startup", sess, vm))
	require.Error(t, s.Pools()[0].SetLiveVCPUs("no-such-uuid", 1))
}

// The Go client reads the metrics; set_VCPUs_number_live through it.
func TestVMMetricsWithGoClient(t *testing.T) {
	s := startSim(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	pi := s.Info().Pools[0]
	c, err := xapi.New(xapi.Config{URL: pi.URL, Username: pi.Username, Password: pi.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	defer func() { _ = c.Close(context.Background()) }()
	vms, err := c.VMGetByNameLabel(ctx, DemoVMName)
	require.NoError(t, err)
	require.Len(t, vms, 1)
	rec, err := c.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	require.False(t, rec.Metrics.IsNull())
	mr, err := c.VMMetricsGetRecord(ctx, rec.Metrics)
	require.NoError(t, err)
	assert.Equal(t, int64(2), mr.VCPUsNumber)
	assert.False(t, xapi.IsNever(mr.StartTime))
	assert.Equal(t, "unspecified", mr.CurrentDomainType)

	require.NoError(t, c.VMSetVCPUsNumberLive(ctx, vms[0], 1))
	n, err := c.VMMetricsGetVCPUsNumber(ctx, rec.Metrics)
	require.NoError(t, err)
	assert.Equal(t, int64(1), n)
	err = c.VMSetVCPUsNumberLive(ctx, vms[0], 5)
	ae, isAPI := xapi.AsAPIError(err)
	require.True(t, isAPI, "%v", err)
	assert.Equal(t, ErrInvalidValue, ae.Code)
}

// A state.json written before VM_metrics existed loads: every VM gets a
// metrics object (xapi's dbsync_master does the same), and the running
// demo-vm's VCPUs_number is its VCPUs_at_startup.
func TestVMMetricsOldStateLoads(t *testing.T) {
	dir := t.TempDir()
	s := startSim(t, dir)
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	require.NoError(t, s.Close())

	path := filepath.Join(dir, stateFileName)
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var st stateFile
	require.NoError(t, json.Unmarshal(b, &st))
	stripped := 0
	for i := range st.Pools {
		var objs []objState
		for _, o := range st.Pools[i].Objects {
			if o.Class == "VM_metrics" {
				stripped++
				continue
			}
			delete(o.Fields, "metrics")
			objs = append(objs, o)
		}
		st.Pools[i].Objects = objs
	}
	require.Positive(t, stripped)
	b, err = json.Marshal(st)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o600))

	s2 := startSim(t, dir)
	url2, sess2 := login(t, s2, 0)
	m := ok(t, url2, "VM.get_metrics", sess2, vm).(string)
	require.NotEqual(t, NullRef, m)
	assert.Equal(t, "2", ok(t, url2, "VM_metrics.get_VCPUs_number", sess2, m))
	recs := ok(t, url2, "VM.get_all_records", sess2).(map[string]any)
	for ref, r := range recs {
		mr := r.(map[string]any)["metrics"].(string)
		_, f := call(t, url2, "VM_metrics.get_record", sess2, mr)
		assert.Nil(t, f, ref)
	}
}
