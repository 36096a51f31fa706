package l2tunnel

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

func vmRequest(mig string, role contract.Role) contract.NetPrepareRequest {
	return contract.NetPrepareRequest{MigrationID: mig, Role: role, VMUUID: "vm-1",
		VIFs: []contract.VIFInfo{
			{Device: "0", MAC: "02:00:5e:02:00:01", NetworkUUID: "net-a", DestNetworkUUID: "net-b", Bridge: "br0"},
			{Device: "1", MAC: "02:00:5e:02:00:02", NetworkUUID: "net-a2", DestNetworkUUID: "net-b2"}, // bridge from the config
		}}
}

var bridges = map[string]string{"net-a": "br0", "net-b": "br0", "net-a2": "br1", "net-b2": "br1"}

var bridgeMap = map[string]any{"bridges": bridges}

// prepareBoth prepares the destination, then the source with its endpoint.
func prepareBoth(t *testing.T, src, dst *Backend, mig string) (contract.NetPrepareResponse, contract.NetPrepareResponse) {
	t.Helper()
	ctx := context.Background()
	d, err := dst.Prepare(ctx, vmRequest(mig, contract.RoleDestination))
	require.NoError(t, err)
	sr := vmRequest(mig, contract.RoleSource)
	sr.Peer = d.Endpoint
	s, err := src.Prepare(ctx, sr)
	require.NoError(t, err)
	return s, d
}

func TestCleanupAfterCrash(t *testing.T) {
	l := newLab(t)
	ha, hb := handleIn(t, l.siteA), handleIn(t, l.siteB)
	src, dst := siteBackend(t, l.siteA, l.ulA, bridgeMap), siteBackend(t, l.siteB, l.ulB, bridgeMap)
	s, d := prepareBoth(t, src, dst, "crash-1")
	require.Len(t, vxlans(t, ha), 2)
	require.Len(t, vxlans(t, hb), 2)
	src.Close()
	dst.Close()

	// A fresh backend removes the destination's tunnels from the state alone.
	dst2 := siteBackend(t, l.siteB, l.ulB, nil)
	_, err := dst2.Cleanup(context.Background(), contract.NetCleanupRequest{Handle: d.Handle})
	require.NoError(t, err)
	assert.Empty(t, vxlans(t, hb))

	// A crash before the source's state was checkpointed: the handle
	// names only the migration and role; the tunnels are found by name.
	src2 := siteBackend(t, l.siteA, l.ulA, nil)
	_, err = src2.Cleanup(context.Background(), contract.NetCleanupRequest{Handle: contract.Handle{ID: s.Handle.ID, MigrationID: "crash-1", Role: contract.RoleSource}})
	require.NoError(t, err)
	assert.Empty(t, vxlans(t, ha))
}

func TestRecoverRebuildsTunnels(t *testing.T) {
	l := newLab(t)
	ha, hb := handleIn(t, l.siteA), handleIn(t, l.siteB)
	src, dst := siteBackend(t, l.siteA, l.ulA, bridgeMap), siteBackend(t, l.siteB, l.ulB, bridgeMap)
	s, d := prepareBoth(t, src, dst, "recover-1")
	src.Close()
	dst.Close()
	// Someone removed the destination's tunnels while nothing ran.
	for name, vx := range vxlans(t, hb) {
		require.NoError(t, hb.LinkDel(vx), name)
	}
	ctx := context.Background()
	dst2, src2 := siteBackend(t, l.siteB, l.ulB, bridgeMap), siteBackend(t, l.siteA, l.ulA, bridgeMap)
	rd, err := dst2.Recover(ctx, contract.NetRecoverRequest{Handle: d.Handle})
	require.NoError(t, err)
	assert.Equal(t, d.Handle.ID, rd.Handle.ID)
	assert.Len(t, vxlans(t, hb), 2, "tunnels rebuilt")
	assert.Contains(t, rd.Status.Detail, "remote none", "the remote was learned after the checkpoint and the device is gone")
	require.NotEqual(t, d.Endpoint.Address, "")
	rs, err := src2.Recover(ctx, contract.NetRecoverRequest{Handle: s.Handle, Peer: rd.Endpoint})
	require.NoError(t, err)
	st, err := dst2.Status(ctx, contract.NetStatusRequest{Handle: rd.Handle.ID})
	require.NoError(t, err)
	assert.NotContains(t, st.Detail, "remote none", "the source registered again")
	assert.Contains(t, st.Detail, "remote "+l.ulA)
	_, err = dst2.Activate(ctx, contract.ActivateRequest{Handle: rd.Handle.ID})
	require.NoError(t, err)
	for _, c := range []struct {
		b *Backend
		h contract.Handle
	}{{src2, rs.Handle}, {dst2, rd.Handle}} {
		_, err := c.b.Cleanup(ctx, contract.NetCleanupRequest{Handle: c.h})
		require.NoError(t, err)
	}
	assert.Empty(t, vxlans(t, ha))
	assert.Empty(t, vxlans(t, hb))
}

func TestActivateNeedsTheRemote(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	dst := siteBackend(t, l.siteB, l.ulB, bridgeMap)
	d, err := dst.Prepare(ctx, vmRequest("noremote-1", contract.RoleDestination))
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = dst.Cleanup(context.Background(), contract.NetCleanupRequest{Handle: d.Handle}) })
	_, err = dst.Activate(ctx, contract.ActivateRequest{Handle: d.Handle.ID})
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "peer_underlay_address")

	// With a static peer address it works without the source.
	cfg := map[string]any{"peer_underlay_address": l.ulA}
	for k, v := range bridgeMap {
		cfg[k] = v
	}
	dst2 := siteBackend(t, l.siteB, l.ulB, cfg)
	d2, err := dst2.Prepare(ctx, vmRequest("noremote-2", contract.RoleDestination))
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = dst2.Cleanup(context.Background(), contract.NetCleanupRequest{Handle: d2.Handle}) })
	a, err := dst2.Activate(ctx, contract.ActivateRequest{Handle: d2.Handle.ID})
	require.NoError(t, err)
	assert.Equal(t, []string{"rarp 02:00:5e:02:00:01", "rarp 02:00:5e:02:00:02"}, a.Announced)
}

func TestRegistrationNeedsTheToken(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	dst := siteBackend(t, l.siteB, l.ulB, bridgeMap)
	d, err := dst.Prepare(ctx, vmRequest("token-1", contract.RoleDestination))
	require.NoError(t, err)
	t.Cleanup(func() { _, _ = dst.Cleanup(context.Background(), contract.NetCleanupRequest{Handle: d.Handle}) })
	ep := d.Endpoint
	_, err = register(ctx, ep, registration{Token: "wrong", MigrationID: "token-1", VMUUID: "vm-1", Underlay: "10.250.0.9"})
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	_, err = register(ctx, ep, registration{Token: string(ep.Token), MigrationID: "token-1", VMUUID: "vm-1", Underlay: "2001:db8::9"})
	require.ErrorIs(t, err, contract.ErrFailedPrecondition, "wrong address family")
	st, err := dst.Status(ctx, contract.NetStatusRequest{Handle: d.Handle.ID})
	require.NoError(t, err)
	assert.Contains(t, st.Detail, "remote none")
}

func TestPreconditions(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	b := siteBackend(t, l.siteB, l.ulB, nil)
	r := vmRequest("pre-1", contract.RoleDestination)
	r.VIFs[0].Bridge, r.VIFs[1].Bridge = "nosuchbr", "br0"
	_, err := b.Prepare(ctx, r)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "nosuchbr")
	r = vmRequest("pre-1", contract.RoleDestination)
	_, err = b.Prepare(ctx, r)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition, "vif 1 has no bridge and the config no map")
	assert.Contains(t, err.Error(), "net-b")
	assert.Empty(t, vxlans(t, handleIn(t, l.siteB)), "a failed prepare leaves nothing")

	// An underlay address this host does not have.
	b2 := siteBackend(t, l.siteB, "10.250.255.254", bridgeMap)
	_, err = b2.Prepare(ctx, vmRequest("pre-2", contract.RoleDestination))
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "not configured on this host")

	// The underlay taken from an interface, and a per-host map.
	b3 := siteBackend(t, l.siteB, "", map[string]any{"underlay_interface": "ul", "bridges": bridges,
		"underlay_address": nil})
	d, err := b3.Prepare(ctx, vmRequest("pre-3", contract.RoleDestination))
	require.NoError(t, err)
	var pp peerParams
	require.NoError(t, contract.DecodeOpaque(d.Endpoint.Params, &pp))
	assert.Equal(t, l.ulB, pp.Underlay)
	_, err = b3.Cleanup(ctx, contract.NetCleanupRequest{Handle: d.Handle})
	require.NoError(t, err)

	// A source without any way to know the destination's address.
	_, err = b.Prepare(ctx, vmRequest("pre-4", contract.RoleSource))
	require.ErrorIs(t, err, contract.ErrInvalidArgument)
}

func TestOptionsAndMTU(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	hb := handleIn(t, l.siteB)
	b := siteBackend(t, l.siteB, l.ulB, map[string]any{"mtu": 1400, "bridges": bridges})
	r := vmRequest("opt-1", contract.RoleDestination)
	var err error
	r.Options, err = contract.EncodeOpaque(Options{VNIs: map[string]int{"1": 4242}})
	require.NoError(t, err)
	d, err := b.Prepare(ctx, r)
	require.NoError(t, err)
	vx := vxlans(t, hb)
	v0, v1 := vx[IfName("opt-1", contract.RoleDestination, "0")], vx[IfName("opt-1", contract.RoleDestination, "1")]
	require.NotNil(t, v0)
	require.NotNil(t, v1)
	assert.Equal(t, 1400, v0.MTU)
	assert.Equal(t, 4242, v1.VxlanId)
	assert.Equal(t, DeriveVNI("opt-1", "0", DefaultVNIBase, DefaultVNICount), v0.VxlanId)
	var pp peerParams
	require.NoError(t, contract.DecodeOpaque(d.Endpoint.Params, &pp))
	assert.Equal(t, map[string]int{"0": v0.VxlanId, "1": 4242}, pp.VNIs, "the source gets the destination's VNIs")
	_, err = b.Cleanup(ctx, contract.NetCleanupRequest{Handle: d.Handle})
	require.NoError(t, err)
}

// TestVIFsShareTheirBridgesTunnel: two VIFs on one bridge get one tunnel
// (two would loop), named after the lower device; both are announced; and
// every tunnel port is isolated on its bridge, so the tunnels of two
// migrations on the same bridge cannot loop either.
func TestVIFsShareTheirBridgesTunnel(t *testing.T) {
	l := newLab(t)
	ctx := context.Background()
	src, dst := siteBackend(t, l.siteA, l.ulA, bridgeMap), siteBackend(t, l.siteB, l.ulB, bridgeMap)
	req := func(mig string, role contract.Role) contract.NetPrepareRequest {
		r := vmRequest(mig, role)
		r.VIFs = []contract.VIFInfo{
			{Device: "10", MAC: "02:00:5e:03:00:10", NetworkUUID: "net-a", DestNetworkUUID: "net-b", IPv4: []string{"192.0.2.10"}},
			{Device: "2", MAC: "02:00:5e:03:00:02", NetworkUUID: "net-a", DestNetworkUUID: "net-b"},
		}
		return r
	}
	var handles []contract.Handle
	for _, mig := range []string{"share-1", "share-2"} {
		d, err := dst.Prepare(ctx, req(mig, contract.RoleDestination))
		require.NoError(t, err)
		sr := req(mig, contract.RoleSource)
		sr.Peer = d.Endpoint
		s, err := src.Prepare(ctx, sr)
		require.NoError(t, err)
		handles = append(handles, d.Handle, s.Handle)
		a, err := dst.Activate(ctx, contract.ActivateRequest{Handle: d.Handle.ID})
		require.NoError(t, err)
		assert.Equal(t, []string{"rarp 02:00:5e:03:00:02", "rarp 02:00:5e:03:00:10", "garp 192.0.2.10 02:00:5e:03:00:10"}, a.Announced)
	}
	hb := handleIn(t, l.siteB)
	vx := vxlans(t, hb)
	require.Len(t, vx, 2, "one tunnel per migration")
	for _, mig := range []string{"share-1", "share-2"} {
		name := IfName(mig, contract.RoleDestination, "2")
		require.Contains(t, vx, name)
		pi, err := hb.LinkGetProtinfo(vx[name])
		require.NoError(t, err)
		assert.True(t, pi.Isolated, "%s isolated", name)
	}
	for i, h := range handles {
		b := src
		if i%2 == 0 {
			b = dst
		}
		_, err := b.Cleanup(ctx, contract.NetCleanupRequest{Handle: h})
		require.NoError(t, err)
	}
	assert.Empty(t, vxlans(t, hb))
}
