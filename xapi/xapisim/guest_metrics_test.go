package xapisim

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
)

// demo-vm's guest agent reports VIF 0's addresses in VM_guest_metrics as
// xapi writes them; VMs without an agent (dom0) have a null ref.
func TestGuestMetricsOnTheWire(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	gm := ok(t, url, "VM.get_guest_metrics", sess, vm).(string)
	require.NotEqual(t, NullRef, gm)
	assert.Regexp(t, `^OpaqueRef:[0-9a-f-]{36}$`, gm)

	want := map[string]any{"0/ip": DefaultDemoIPv4, "0/ipv4/0": DefaultDemoIPv4, "0/ipv6/0": DefaultDemoIPv6}
	assert.Equal(t, want, ok(t, url, "VM_guest_metrics.get_networks", sess, gm))
	rec := ok(t, url, "VM_guest_metrics.get_record", sess, gm).(map[string]any)
	assert.Equal(t, want, rec["networks"])
	assert.Equal(t, true, rec["live"])
	assert.Equal(t, true, rec["PV_drivers_detected"])
	assert.Equal(t, "yes", rec["can_use_hotplug_vif"])
	assert.Equal(t, map[string]any{}, rec["memory"], "removed fields are still in the record, empty")
	assert.Equal(t, map[string]any{}, rec["disks"])
	for _, f := range []string{"uuid", "os_version", "netbios_name", "PV_drivers_version", "PV_drivers_up_to_date",
		"other", "last_updated", "other_config", "can_use_hotplug_vbd", "services"} {
		assert.Contains(t, rec, f)
	}
	assert.Equal(t, []any{gm}, ok(t, url, "VM_guest_metrics.get_all", sess))
	assert.Equal(t, gm, ok(t, url, "VM_guest_metrics.get_by_uuid", sess, rec["uuid"]))

	// Exact bytes: untyped strings, sorted struct members, a dateTime.
	body := string(rawCall(t, url, "VM_guest_metrics.get_networks", sess, gm))
	assert.Contains(t, body, `<value><struct><member><name>0/ip</name><value>`+DefaultDemoIPv4+`</value></member>`+
		`<member><name>0/ipv4/0</name><value>`+DefaultDemoIPv4+`</value></member>`+
		`<member><name>0/ipv6/0</name><value>`+DefaultDemoIPv6+`</value></member></struct></value>`)
	body = string(rawCall(t, url, "VM_guest_metrics.get_record", sess, gm))
	assert.Regexp(t, `<member><name>last_updated</name><value><dateTime.iso8601>\d{8}T\d\d:\d\d:\d\dZ</dateTime.iso8601></value></member>`, body)

	// No constructor on the wire; a bad ref is HANDLE_INVALID.
	_, f := call(t, url, "VM_guest_metrics.create", sess, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, ErrMethodUnknown, f.Code)
	_, f = call(t, url, "VM_guest_metrics.get_networks", sess, NullRef)
	require.NotNil(t, f)
	assert.Equal(t, []string{"VM_guest_metrics", NullRef}, append([]string{}, f.Params...))
	assert.Equal(t, ErrHandleInvalid, f.Code)

	// Control domains have no guest agent.
	for ref, r := range ok(t, url, "VM.get_all_records", sess).(map[string]any) {
		rec := r.(map[string]any)
		if rec["is_control_domain"] == true {
			assert.Equal(t, NullRef, rec["guest_metrics"], ref)
		} else {
			assert.Equal(t, gm, rec["guest_metrics"], ref)
		}
	}
	// The class is in events, lowercased.
	ev := ok(t, url, "event.from", sess, []string{"vm_guest_metrics"}, "", 0.1).(map[string]any)
	evs := ev["events"].([]any)
	require.Len(t, evs, 1)
	assert.Equal(t, "vm_guest_metrics", evs[0].(map[string]any)["class"])
	assert.Equal(t, gm, evs[0].(map[string]any)["ref"])
}

func TestGuestMetricsConfigurableAndLifecycle(t *testing.T) {
	dir := t.TempDir()
	s, err := New(Config{StateDir: dir, DiskSize: 4 << 20, FillSize: 1 << 20, DemoIPv4: "10.1.2.3", DemoIPv6: "none",
		Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	gm := ok(t, url, "VM.get_guest_metrics", sess, vm).(string)
	assert.Equal(t, map[string]any{"0/ip": "10.1.2.3", "0/ipv4/0": "10.1.2.3"}, ok(t, url, "VM_guest_metrics.get_networks", sess, gm))

	// A snapshot gets its own copy; destroying the snapshot destroys it.
	snap := ok(t, url, "VM.snapshot", sess, vm, "s1").(string)
	sgm := ok(t, url, "VM.get_guest_metrics", sess, snap).(string)
	assert.NotEqual(t, gm, sgm)
	assert.NotEqual(t, NullRef, sgm)
	assert.Equal(t, ok(t, url, "VM_guest_metrics.get_networks", sess, gm), ok(t, url, "VM_guest_metrics.get_networks", sess, sgm))
	assert.Len(t, ok(t, url, "VM_guest_metrics.get_all", sess), 2)
	ok(t, url, "VM.destroy", sess, snap)
	assert.Equal(t, []any{gm}, ok(t, url, "VM_guest_metrics.get_all", sess))

	// The agent reports new addresses; then the agent goes away.
	p := s.Pools()[0]
	uuid := ok(t, url, "VM.get_uuid", sess, vm).(string)
	require.NoError(t, p.SetGuestNetworks(uuid, map[string]string{"0/ipv6/0": "2001:db8::7"}))
	assert.Equal(t, gm, ok(t, url, "VM.get_guest_metrics", sess, vm))
	assert.Equal(t, map[string]any{"0/ipv6/0": "2001:db8::7"}, ok(t, url, "VM_guest_metrics.get_networks", sess, gm))
	require.NoError(t, p.SetGuestNetworks(uuid, nil))
	assert.Equal(t, NullRef, ok(t, url, "VM.get_guest_metrics", sess, vm))
	assert.Empty(t, ok(t, url, "VM_guest_metrics.get_all", sess))
	require.NoError(t, p.SetGuestNetworks(uuid, map[string]string{"0/ip": "10.9.9.9"}))
	gm2 := ok(t, url, "VM.get_guest_metrics", sess, vm).(string)
	require.NotEqual(t, NullRef, gm2)
	require.Error(t, p.SetGuestNetworks("no-such-uuid", nil))

	// Guest metrics survive a restart.
	require.NoError(t, s.Close())
	s2, err := New(Config{StateDir: dir})
	require.NoError(t, err)
	require.NoError(t, s2.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s2.Close() })
	url2, sess2 := login(t, s2, 0)
	assert.Equal(t, gm2, ok(t, url2, "VM.get_guest_metrics", sess2, vm))
	assert.Equal(t, map[string]any{"0/ip": "10.9.9.9"}, ok(t, url2, "VM_guest_metrics.get_networks", sess2, gm2))
}

// The Go client reads the demo VM's addresses end to end.
func TestGuestMetricsWithGoClient(t *testing.T) {
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
	require.False(t, rec.GuestMetrics.IsNull())
	gm, err := c.VMGuestMetricsGetRecord(ctx, rec.GuestMetrics)
	require.NoError(t, err)
	assert.True(t, gm.Live)
	assert.False(t, xapi.IsNever(gm.LastUpdated))
	assert.Equal(t, map[string]xapi.GuestAddresses{"0": {IPv4: []string{DefaultDemoIPv4}, IPv6: []string{DefaultDemoIPv6}}},
		xapi.GuestNetworks(gm.Networks))
	nets, err := c.VMGuestMetricsGetNetworks(ctx, rec.GuestMetrics)
	require.NoError(t, err)
	assert.Equal(t, gm.Networks, nets)
}
