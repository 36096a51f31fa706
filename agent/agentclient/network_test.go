package agentclient

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// TestNetworkLifecycle drives the example noop network backend in both
// agents through the engine.NetworkBackend view.
func TestNetworkLifecycle(t *testing.T) {
	l := newInProc(t)
	stateDir := t.TempDir()
	cfg := Config{Launcher: l, StateDir: stateDir, UUIDOf: uuidOf, Logger: testutil.Logger(t)}
	c, err := New(cfg)
	require.NoError(t, err)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const id = "mig-net"
	spec := engine.AgentSpec{MigrationID: id, NetworkBackend: "noop"}
	require.NoError(t, c.Start(ctx, spec))
	require.NoError(t, c.Gateway().Start(ctx, engine.GatewaySpec{MigrationID: id}))

	ns := engine.NetSpec{MigrationID: id, Backend: "noop", VMUUID: "vm-1", VMName: "vm",
		VIFs:   []engine.VIF{{Ref: "OpaqueRef:vif0", Device: "0", MAC: "52:54:00:12:34:56", NetworkRef: "OpaqueRef:net-a"}},
		VIFMap: map[string]string{"OpaqueRef:vif0": "OpaqueRef:net-b"}}
	net := c.Network()
	st, err := net.Prepare(ctx, ns)
	require.NoError(t, err)
	require.NotEmpty(t, st)
	ns.State = st

	status := func(role contract.Role) contract.NetStatus {
		t.Helper()
		ds, err := decodeNet(ns.State)
		require.NoError(t, err)
		h := ds.Dest
		if role == contract.RoleSource {
			h = ds.Source
		}
		require.NotNil(t, h)
		s, err := callRole[contract.NetStatusRequest, contract.NetStatus](ctx, c, id, role, agent.MethodNetworkStatus, contract.NetStatusRequest{Handle: h.ID})
		require.NoError(t, err)
		return s
	}
	assert.Equal(t, contract.StatePrepared, status(contract.RoleDestination).State)
	assert.Equal(t, contract.StatePrepared, status(contract.RoleSource).State)

	// A restarted controller recovers both handles from the state.
	c2, err := New(cfg)
	require.NoError(t, err)
	defer c2.Close()
	require.NoError(t, c2.Start(ctx, spec))
	assert.Equal(t, 2, l.count())
	st, err = c2.Network().Recover(ctx, ns)
	require.NoError(t, err)
	ns.State = st

	st, err = c2.Network().Activate(ctx, ns)
	require.NoError(t, err)
	ns.State = st
	assert.Equal(t, contract.StateActive, status(contract.RoleDestination).State)
	st, err = c2.Network().Release(ctx, ns)
	require.NoError(t, err)
	ns.State = st
	assert.Equal(t, contract.StateReleased, status(contract.RoleSource).State)

	require.NoError(t, c2.Network().Cleanup(ctx, ns))
	ds, err := decodeNet(ns.State)
	require.NoError(t, err)
	_, err = callRole[contract.NetStatusRequest, contract.NetStatus](ctx, c2, id, contract.RoleDestination, agent.MethodNetworkStatus, contract.NetStatusRequest{Handle: ds.Dest.ID})
	require.ErrorIs(t, err, contract.ErrNotFound)
	require.NoError(t, c2.Stop(ctx, id))
}

// Network backends get each VIF's bridge at their own site: the source
// network's at the source, the mapped destination network's at the
// destination.
func TestNetworkBridgesPerSite(t *testing.T) {
	bridges := map[string]string{"source/OpaqueRef:net-a": "xenbr0", "destination/OpaqueRef:net-b": "xapi7"}
	n := &Network{c: &Client{cfg: Config{BridgeOf: func(_ context.Context, site contract.Role, ref string) (string, error) {
		b, ok := bridges[string(site)+"/"+ref]
		if !ok {
			return "", errors.New("no such network")
		}
		return b, nil
	}}}}
	spec := engine.NetSpec{VIFs: []engine.VIF{{Ref: "OpaqueRef:vif0", Device: "0", NetworkRef: "OpaqueRef:net-a"}},
		VIFMap: map[string]string{"OpaqueRef:vif0": "OpaqueRef:net-b"}}
	vifs := []contract.VIFInfo{{Device: "0", MAC: "52:54:00:12:34:56"}}
	ctx := context.Background()
	src, err := n.withBridges(ctx, spec, vifs, contract.RoleSource)
	require.NoError(t, err)
	dst, err := n.withBridges(ctx, spec, vifs, contract.RoleDestination)
	require.NoError(t, err)
	assert.Equal(t, "xenbr0", src[0].Bridge)
	assert.Equal(t, "xapi7", dst[0].Bridge)
	assert.Empty(t, vifs[0].Bridge, "the shared list is not changed")
	assert.Equal(t, "52:54:00:12:34:56", dst[0].MAC)

	spec.VIFMap["OpaqueRef:vif0"] = "OpaqueRef:gone"
	_, err = n.withBridges(ctx, spec, vifs, contract.RoleDestination)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "bridge of network OpaqueRef:gone at the destination")

	none := &Network{c: &Client{}}
	out, err := none.withBridges(ctx, spec, vifs, contract.RoleSource)
	require.NoError(t, err)
	assert.Empty(t, out[0].Bridge)
}

// Each site's backends are configured from their own pool's section; the
// client's own config is the fallback.
func TestBackendConfigPerSite(t *testing.T) {
	c := &Client{cfg: Config{NetworkConfig: map[string][]byte{"l2tunnel": []byte("fallback")}}}
	spec := engine.AgentSpec{SourceConfig: map[string][]byte{"l2tunnel": []byte(`{"netns":"a"}`)},
		DestConfig: map[string][]byte{"l2tunnel": []byte(`{"netns":"b"}`), "bad": []byte(`[1]`)}}
	src, err := c.backendConfig(spec, contract.RoleSource, "l2tunnel", c.cfg.NetworkConfig)
	require.NoError(t, err)
	dst, err := c.backendConfig(spec, contract.RoleDestination, "l2tunnel", c.cfg.NetworkConfig)
	require.NoError(t, err)
	wantA, err := contract.ConfigFromJSON([]byte(`{"netns":"a"}`))
	require.NoError(t, err)
	wantB, err := contract.ConfigFromJSON([]byte(`{"netns":"b"}`))
	require.NoError(t, err)
	assert.Equal(t, wantA, src)
	assert.Equal(t, wantB, dst)
	fb, err := c.backendConfig(engine.AgentSpec{}, contract.RoleSource, "l2tunnel", c.cfg.NetworkConfig)
	require.NoError(t, err)
	assert.Equal(t, []byte("fallback"), fb)
	_, err = c.backendConfig(spec, contract.RoleDestination, "bad", nil)
	require.ErrorIs(t, err, contract.ErrInvalidArgument)
	assert.Contains(t, err.Error(), `the destination pool's "bad" section of wanmotion:config`)
}
