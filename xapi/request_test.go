package xapi

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestRequestGolden checks what goes on the wire: method name, session first,
// params in xapi's positional order, ints as decimal strings, bools as
// <boolean>, floats as <double>, maps as structs (member order ignored).
func TestRequestGolden(t *testing.T) {
	const sess = "OpaqueRef:s1"
	f := newFake(t, loginOK(sess, func(method string, _ []any) string {
		return successXML(xv("OpaqueRef:result"))
	}))
	c := newTestClient(t, f.URL(), func(c *Config) { c.DisableMemberDiscovery = true })
	ctx := context.Background()
	require.NoError(t, c.Login(ctx))

	dest := map[string]string{"SM": "http://192.0.2.20/services/SM?session_id=OpaqueRef:d", "host": "OpaqueRef:h2",
		"xenops": "http://192.0.2.20/services/xenops", "session_id": "OpaqueRef:d", "master": "http://192.0.2.20/"}
	destWire := map[string]any{}
	for k, v := range dest {
		destWire[k] = v
	}

	tests := []struct {
		name   string
		call   func() error
		method string
		params []any
	}{
		{"migrate_send", func() error {
			_, err := c.VMMigrateSend(ctx, "OpaqueRef:vm", dest, true,
				map[VDIRef]SRRef{"OpaqueRef:vdi1": "OpaqueRef:sr2", "OpaqueRef:vdi2": "OpaqueRef:sr2"},
				map[VIFRef]NetworkRef{"OpaqueRef:vif1": "OpaqueRef:net2"}, map[string]string{"force": "false"})
			return err
		}, "VM.migrate_send", []any{sess, "OpaqueRef:vm", destWire, true,
			map[string]any{"OpaqueRef:vdi1": "OpaqueRef:sr2", "OpaqueRef:vdi2": "OpaqueRef:sr2"},
			map[string]any{"OpaqueRef:vif1": "OpaqueRef:net2"}, map[string]any{"force": "false"}}},
		{"async migrate_send nil maps", func() error {
			_, err := c.AsyncVMMigrateSend(ctx, "OpaqueRef:vm", dest, true, nil, nil, nil)
			return err
		}, "Async.VM.migrate_send", []any{sess, "OpaqueRef:vm", destWire, true, map[string]any{}, map[string]any{}, map[string]any{}}},
		{"assert_can_migrate", func() error {
			return c.VMAssertCanMigrate(ctx, "OpaqueRef:vm", dest, false, nil, nil, nil)
		}, "VM.assert_can_migrate", []any{sess, "OpaqueRef:vm", destWire, false, map[string]any{}, map[string]any{}, map[string]any{}}},
		{"pool_migrate", func() error {
			return c.VMPoolMigrate(ctx, "OpaqueRef:vm", "OpaqueRef:h", map[string]string{"live": "true"})
		}, "VM.pool_migrate", []any{sess, "OpaqueRef:vm", "OpaqueRef:h", map[string]any{"live": "true"}}},
		{"resume", func() error { return c.VMResume(ctx, "OpaqueRef:vm", false, true) },
			"VM.resume", []any{sess, "OpaqueRef:vm", false, true}},
		{"vdi create: ints as strings, record as one struct", func() error {
			_, err := c.VDICreate(ctx, VDICreateSpec{NameLabel: "replica", SR: "OpaqueRef:sr", VirtualSize: 10737418240,
				OtherConfig: map[string]string{"a&b": "<x>"}})
			return err
		}, "VDI.create", []any{sess, map[string]any{"name_label": "replica", "name_description": "", "SR": "OpaqueRef:sr",
			"virtual_size": "10737418240", "type": "user", "sharable": false, "read_only": false,
			"other_config": map[string]any{"a&b": "<x>"}, "xenstore_data": map[string]any{}, "sm_config": map[string]any{},
			"tags": []any{}}}},
		{"vbd create", func() error {
			_, err := c.VBDCreate(ctx, VBDCreateSpec{VM: "OpaqueRef:vm", VDI: "OpaqueRef:vdi"})
			return err
		}, "VBD.create", []any{sess, map[string]any{"VM": "OpaqueRef:vm", "VDI": "OpaqueRef:vdi", "device": "", "userdevice": "autodetect",
			"bootable": false, "mode": "RW", "type": "Disk", "unpluggable": false, "empty": false, "other_config": map[string]any{},
			"qos_algorithm_type": "", "qos_algorithm_params": map[string]any{}}}},
		{"list_changed_blocks order", func() error {
			_, err := c.VDIListChangedBlocks(ctx, "OpaqueRef:from", "OpaqueRef:to")
			return err
		}, "VDI.list_changed_blocks", []any{sess, "OpaqueRef:from", "OpaqueRef:to"}},
		{"snapshot driver params", func() error {
			_, err := c.VDISnapshot(ctx, "OpaqueRef:vdi", nil)
			return err
		}, "VDI.snapshot", []any{sess, "OpaqueRef:vdi", map[string]any{}}},
		{"call_plugin", func() error {
			_, err := c.HostCallPlugin(ctx, "OpaqueRef:h", "wanmotion", "prepare", map[string]string{"vm": "u"})
			return err
		}, "host.call_plugin", []any{sess, "OpaqueRef:h", "wanmotion", "prepare", map[string]any{"vm": "u"}}},
		{"migrate_receive", func() error {
			_, err := c.Call(ctx, "host.migrate_receive", HostRef("OpaqueRef:h"), NetworkRef("OpaqueRef:n"), map[string]string{})
			return err
		}, "host.migrate_receive", []any{sess, "OpaqueRef:h", "OpaqueRef:n", map[string]any{}}},
		{"task progress is a double", func() error { return c.TaskSetProgress(ctx, "OpaqueRef:t", 0.25) },
			"task.set_progress", []any{sess, "OpaqueRef:t", 0.25}},
		{"task status enum", func() error { return c.TaskSetStatus(ctx, "OpaqueRef:t", TaskStatusCancelled) },
			"task.set_status", []any{sess, "OpaqueRef:t", "cancelled"}},
		{"task applies_to", func() error { return c.TaskAddToOtherConfig(ctx, "OpaqueRef:t", "applies_to", "OpaqueRef:vm") },
			"task.add_to_other_config", []any{sess, "OpaqueRef:t", "applies_to", "OpaqueRef:vm"}},
		{"event.from timeout float", func() error {
			_, err := c.Call(ctx, "event.from", []string{"task", "vm"}, "", 30.0)
			return err
		}, "event.from", []any{sess, []any{"task", "vm"}, "", 30.0}},
		{"generic int arg as string", func() error {
			_, err := c.Call(ctx, "VDI.resize", VDIRef("OpaqueRef:vdi"), int64(1)<<40)
			return err
		}, "VDI.resize", []any{sess, "OpaqueRef:vdi", "1099511627776"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := len(f.Calls())
			_ = tt.call() // results are irrelevant here; the request is what is checked
			calls := f.Calls()
			require.Len(t, calls, before+1)
			got := calls[before]
			assert.Equal(t, tt.method, got.Method)
			assert.Equal(t, tt.params, got.Params)
			assert.NotContains(t, got.Body, "<int>", "ints travel as strings")
			assert.NotContains(t, got.Body, "<i4>")
		})
	}
}

func TestRequestAlwaysHasParams(t *testing.T) {
	f := newFake(t, func(method string, _ []any) string {
		return successXML(xv([]any{"VM.get_all", "system.listMethods"}))
	})
	c := newTestClient(t, f.URL())
	got, err := c.ListMethods(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []string{"VM.get_all", "system.listMethods"}, got)
	calls := f.Calls()
	require.Len(t, calls, 1)
	assert.Equal(t, "system.listMethods", calls[0].Method)
	assert.Contains(t, calls[0].Body, "<params></params>")
}

func TestLoginRequest(t *testing.T) {
	f := newFake(t, loginOK("OpaqueRef:s1", func(string, []any) string { return successXML(xv("")) }))
	c := newTestClient(t, f.URL(), func(c *Config) { c.DisableMemberDiscovery = true })
	require.NoError(t, c.Login(context.Background()))
	require.NoError(t, c.Logout(context.Background()))
	calls := f.Calls()
	require.Len(t, calls, 2)
	assert.Equal(t, "session.login_with_password", calls[0].Method)
	assert.Equal(t, []any{"root", "secret", "1.0", "wanmotion"}, calls[0].Params)
	assert.Equal(t, "session.logout", calls[1].Method)
	assert.Equal(t, []any{"OpaqueRef:s1"}, calls[1].Params)
	_, err := c.VMGetAll(context.Background())
	assert.ErrorIs(t, err, ErrNotLoggedIn)
	assert.False(t, strings.Contains(SessionRef("OpaqueRef:s1").String(), "s1"), "session refs print redacted")
}

func TestInvalidMethodNameRejected(t *testing.T) {
	f := newFake(t, loginOK("OpaqueRef:s", func(string, []any) string { return successXML(xv("")) }))
	c := newTestClient(t, f.URL())
	require.NoError(t, c.Login(context.Background()))
	before := len(f.Calls())
	_, err := c.Call(context.Background(), "VM.get_all</methodName><x>")
	require.Error(t, err)
	assert.Len(t, f.Calls(), before, "nothing sent")
}
