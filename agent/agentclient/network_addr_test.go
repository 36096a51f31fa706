package agentclient

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// vifs copies each VIF's guest-reported addresses into VIFInfo (a copy:
// the plan's slices are not shared), next to the network UUIDs.
func TestVIFInfoCarriesAddresses(t *testing.T) {
	n := &Network{c: &Client{cfg: Config{UUIDOf: uuidOf}}}
	spec := engine.NetSpec{
		VIFs: []engine.VIF{
			{Ref: "OpaqueRef:vif0", Device: "0", MAC: "52:54:00:12:34:56", NetworkRef: "OpaqueRef:net-a",
				IPv4: []string{"10.0.0.5"}, IPv6: []string{"2001:db8::5", "fe80::1"}},
			{Ref: "OpaqueRef:vif1", Device: "1", MAC: "52:54:00:12:34:57", NetworkRef: "OpaqueRef:net-a"},
		},
		VIFMap: map[string]string{"OpaqueRef:vif0": "OpaqueRef:net-b", "OpaqueRef:vif1": "OpaqueRef:net-b"},
	}
	got, err := n.vifs(context.Background(), spec)
	require.NoError(t, err)
	assert.Equal(t, []contract.VIFInfo{
		{Device: "0", MAC: "52:54:00:12:34:56", NetworkUUID: "net-a", DestNetworkUUID: "net-b",
			IPv4: []string{"10.0.0.5"}, IPv6: []string{"2001:db8::5", "fe80::1"}},
		{Device: "1", MAC: "52:54:00:12:34:57", NetworkUUID: "net-a", DestNetworkUUID: "net-b"},
	}, got)
	got[0].IPv4[0] = "changed"
	assert.Equal(t, "10.0.0.5", spec.VIFs[0].IPv4[0], "the plan's addresses are not shared")
}

// The addresses reach a real network backend (the example noop plugin, in
// both agents) through Prepare, and it announces them on Activate.
func TestNetworkBackendGetsAddresses(t *testing.T) {
	l := newInProc(t)
	c, err := New(Config{Launcher: l, StateDir: t.TempDir(), UUIDOf: uuidOf, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const id = "mig-net-addr"
	require.NoError(t, c.Start(ctx, engine.AgentSpec{MigrationID: id, NetworkBackend: "noop"}))
	require.NoError(t, c.Gateway().Start(ctx, engine.GatewaySpec{MigrationID: id}))

	ns := engine.NetSpec{MigrationID: id, Backend: "noop", VMUUID: "vm-1", VMName: "vm",
		VIFs: []engine.VIF{{Ref: "OpaqueRef:vif0", Device: "0", MAC: "52:54:00:12:34:56", NetworkRef: "OpaqueRef:net-a",
			IPv4: []string{"198.51.100.10"}, IPv6: []string{"2001:db8:100::10"}}},
		VIFMap: map[string]string{"OpaqueRef:vif0": "OpaqueRef:net-b"}}
	st, err := c.Network().Prepare(ctx, ns)
	require.NoError(t, err)
	ns.State = st
	ds, err := decodeNet(st)
	require.NoError(t, err)
	want := []string{"198.51.100.10", "2001:db8:100::10"}
	for _, h := range []*contract.Handle{ds.Dest, ds.Source} {
		require.NotNil(t, h)
		var bst struct {
			Addrs []string `msgpack:"addrs"`
		}
		require.NoError(t, contract.DecodeOpaque(h.State.Data, &bst))
		assert.Equal(t, want, bst.Addrs, "%s handle", h.Role)
		s, err := callRole[contract.NetStatusRequest, contract.NetStatus](ctx, c, id, h.Role, agent.MethodNetworkStatus,
			contract.NetStatusRequest{Handle: h.ID})
		require.NoError(t, err)
		assert.Contains(t, s.Detail, "2 addresses")
	}
	resp, err := callRole[contract.ActivateRequest, contract.ActivateResponse](ctx, c, id, contract.RoleDestination,
		agent.MethodNetworkActivate, contract.ActivateRequest{Handle: ds.Dest.ID})
	require.NoError(t, err)
	assert.Equal(t, want, resp.Announced)
	require.NoError(t, c.Network().Cleanup(ctx, ns))
	require.NoError(t, c.Stop(ctx, id))
}
