package l2tunnel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// collidingIDs returns two migration ids whose tunnel names share their
// prefix (IfPrefix: 28 bits of a hash), found by a birthday search.
func collidingIDs(t *testing.T, stem string) (string, string) {
	t.Helper()
	seen := map[uint32]string{}
	for i := 0; i < 1<<20; i++ {
		id := fmt.Sprintf("%s-%d", stem, i)
		h := hash32(id) & 0xfffffff
		if other, ok := seen[h]; ok {
			require.Equal(t, IfPrefix(other, contract.RoleSource), IfPrefix(id, contract.RoleSource))
			return other, id
		}
		seen[h] = id
	}
	t.Fatal("no colliding migration ids found")
	return "", ""
}

// cli runs the test binary as the backend binary with args (as an admin
// in dom0 would run wanmotion-network-l2tunnel) and returns its output
// and exit status.
func cli(t *testing.T, args ...string) (string, int) {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	bin := filepath.Join(t.TempDir(), "wanmotion-network-"+Name)
	require.NoError(t, os.Symlink(exe, bin))
	var out, errb bytes.Buffer
	c := exec.Command(bin, args...)
	c.Stdout, c.Stderr = &out, &errb
	c.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	err = c.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else {
		require.NoError(t, err)
	}
	t.Logf("wanmotion-network-l2tunnel %s -> %d\n%s%s", strings.Join(args, " "), code, out.String(), errb.String())
	return out.String(), code
}

func keepOption(t *testing.T, keep bool) []byte {
	t.Helper()
	b, err := contract.EncodeOpaque(Options{KeepAfterMigration: &keep})
	require.NoError(t, err)
	return b
}

// TestKeepAfterMigration: with keep_after_migration, a migration that
// succeeded keeps its tunnels at Cleanup and the client at site A still
// reaches the VM at site B; other migrations' Cleanups (a rollback, a
// sweep by a colliding name prefix, keep switched off per migration) leave
// the kept tunnels alone; the remove command deletes them and the path is
// gone.
func TestKeepAfterMigration(t *testing.T) {
	l := newLab(t)
	vmNS, clientNS := l.addNS("vm"), l.addNS("cl")
	l.attach(vmNS, l.siteA, "vmp", vmMAC, vmIP+"/24")
	l.attach(clientNS, l.siteA, "clp", "02:00:5e:00:00:20", clientIP+"/24")
	keep := map[string]any{"keep_after_migration": true, "bridges": bridges}
	src, dst := siteBackend(t, l.siteA, l.ulA, keep), siteBackend(t, l.siteB, l.ulB, keep)
	ha, hb := handleIn(t, l.siteA), handleIn(t, l.siteB)
	ctx := context.Background()
	mig1, mig2 := collidingIDs(t, "keep")

	req := contract.NetPrepareRequest{MigrationID: mig1, VMUUID: "vm-keep", VMName: "vm1",
		VIFs: []contract.VIFInfo{{Device: "0", MAC: vmMAC, NetworkUUID: "net-a", DestNetworkUUID: "net-b", Bridge: "br0", IPv4: []string{vmIP}}}}
	dreq := req
	dreq.Role = contract.RoleDestination
	d, err := dst.Prepare(ctx, dreq)
	require.NoError(t, err)
	sreq := req
	sreq.Role, sreq.Peer = contract.RoleSource, d.Endpoint
	s, err := src.Prepare(ctx, sreq)
	require.NoError(t, err)

	flow := startFlow(t, clientNS, vmNS)
	waitFor(t, "the stream at site A", func() bool { _, r, e := flow.countsAfter(time.Time{}); return r > 5 && e > 5 })
	ipCmd(t, "-n", l.siteA, "link", "del", "vmp")
	l.attach(vmNS, l.siteB, "vmq", vmMAC, vmIP+"/24")
	act, err := dst.Activate(ctx, contract.ActivateRequest{Handle: d.Handle.ID})
	require.NoError(t, err)
	d.Handle.State = act.State
	rel, err := src.Release(ctx, contract.ReleaseRequest{Handle: s.Handle.ID})
	require.NoError(t, err)
	s.Handle.State = rel.State
	moved := time.Now()
	waitFor(t, "the stream at site B", func() bool { _, r, e := flow.countsAfter(moved); return r > 5 && e > 5 })

	for i := 0; i < 2; i++ { // twice: idempotent
		_, err = src.Cleanup(ctx, contract.NetCleanupRequest{Handle: s.Handle})
		require.NoError(t, err)
		_, err = dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: d.Handle})
		require.NoError(t, err)
	}
	nameA, nameB := IfName(mig1, contract.RoleSource, "0"), IfName(mig1, contract.RoleDestination, "0")
	checkKept := func() {
		t.Helper()
		for _, c := range []struct {
			vx   map[string]*netlink.Vxlan
			name string
			role contract.Role
		}{{vxlans(t, ha), nameA, contract.RoleSource}, {vxlans(t, hb), nameB, contract.RoleDestination}} {
			vx := c.vx[c.name]
			require.NotNil(t, vx, "kept tunnel %s", c.name)
			m, ok := ParseAlias(vx.Alias)
			require.True(t, ok, "alias %q", vx.Alias)
			assert.Equal(t, Marker{MigrationID: mig1, Role: c.role, VMUUID: "vm-keep", Kept: true}, m)
		}
	}
	checkKept()
	_, err = dst.Status(ctx, contract.NetStatusRequest{Handle: d.Handle.ID})
	require.ErrorIs(t, err, contract.ErrNotFound, "the handle is forgotten")
	cleaned := time.Now()
	waitFor(t, "the stream after Cleanup", func() bool { _, r, e := flow.countsAfter(cleaned); return r > 10 && e > 10 })

	// mig2's names share mig1's prefix: its VIF 0 would take over mig1's
	// kept tunnel; Prepare refuses.
	r2 := vmRequest(mig2, contract.RoleDestination)
	_, err = dst.Prepare(ctx, r2)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), mig1)
	// With other devices it prepares, then rolls back (no Activate, no
	// Release): keep is set, yet everything of mig2 goes, nothing of mig1.
	vifs2 := []contract.VIFInfo{{Device: "7", MAC: "02:00:5e:04:00:07", NetworkUUID: "net-a2", DestNetworkUUID: "net-b2"}}
	r2.VIFs = vifs2
	r2.VMUUID = "vm-keep" // the same VM again: Prepare warns about the kept tunnel (log only)
	d2, err := dst.Prepare(ctx, r2)
	require.NoError(t, err)
	sr2 := vmRequest(mig2, contract.RoleSource)
	sr2.VIFs, sr2.Peer, sr2.VMUUID = vifs2, d2.Endpoint, r2.VMUUID
	s2, err := src.Prepare(ctx, sr2)
	require.NoError(t, err)
	require.Contains(t, vxlans(t, ha), IfName(mig2, contract.RoleSource, "7"))
	_, err = dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: d2.Handle})
	require.NoError(t, err)
	// The source after a crash: no state, the sweep by name prefix (which
	// mig1's kept tunnel matches).
	_, err = siteBackend(t, l.siteA, l.ulA, keep).Cleanup(ctx, contract.NetCleanupRequest{
		Handle: contract.Handle{ID: s2.Handle.ID, MigrationID: mig2, Role: contract.RoleSource}})
	require.NoError(t, err)
	assert.NotContains(t, vxlans(t, ha), IfName(mig2, contract.RoleSource, "7"))
	assert.NotContains(t, vxlans(t, hb), IfName(mig2, contract.RoleDestination, "7"))
	checkKept()

	// A succeeded migration whose option switches keep off is removed.
	mig3 := "keep-off"
	r3 := vmRequest(mig3, contract.RoleDestination)
	r3.Options = keepOption(t, false)
	d3, err := dst.Prepare(ctx, r3)
	require.NoError(t, err)
	sr3 := vmRequest(mig3, contract.RoleSource)
	sr3.Options, sr3.Peer = r3.Options, d3.Endpoint
	s3, err := src.Prepare(ctx, sr3)
	require.NoError(t, err)
	_, err = dst.Activate(ctx, contract.ActivateRequest{Handle: d3.Handle.ID})
	require.NoError(t, err)
	_, err = src.Release(ctx, contract.ReleaseRequest{Handle: s3.Handle.ID})
	require.NoError(t, err)
	for _, x := range []struct {
		b *Backend
		h contract.Handle
	}{{src, s3.Handle}, {dst, d3.Handle}} {
		_, err := x.b.Cleanup(ctx, contract.NetCleanupRequest{Handle: x.h})
		require.NoError(t, err)
	}
	assert.Len(t, vxlans(t, ha), 1, "only mig1's kept tunnel at A")
	assert.Len(t, vxlans(t, hb), 1, "only mig1's kept tunnel at B")
	checkKept()
	again := time.Now()
	waitFor(t, "the stream after the other migrations", func() bool { _, r, e := flow.countsAfter(again); return r > 5 && e > 5 })

	// The admin commands, as in dom0 on each site.
	out, code := cli(t, "list", "--netns", l.siteA)
	require.Equal(t, 0, code)
	assert.Regexp(t, nameA+` +kept +`+mig1+` +source +vm-keep +br0 +[0-9]+ +`+l.ulB, out)
	out, code = cli(t, "remove", "--netns", l.siteA, "--migration", mig2)
	require.Equal(t, 0, code)
	assert.Contains(t, out, "no kernel tunnel matched", "mig2's prefix matches mig1's tunnel, its marker does not")
	out, code = cli(t, "remove", "--netns", l.siteB, "--all-kept", "--dry-run")
	require.Equal(t, 0, code)
	assert.Contains(t, out, "would remove "+nameB+" (kept, migration "+mig1+", destination, on br0")
	checkKept()
	out, code = cli(t, "remove", "--netns", l.siteA, "--migration", mig1)
	require.Equal(t, 0, code)
	assert.Contains(t, out, "removed "+nameA+" (kept, migration "+mig1+", source, on br0")
	out, code = cli(t, "remove", "--netns", l.siteB, "--all-kept")
	require.Equal(t, 0, code)
	assert.Contains(t, out, "removed "+nameB)
	assert.Empty(t, vxlans(t, ha))
	assert.Empty(t, vxlans(t, hb))
	gone := time.Now()
	time.Sleep(300 * time.Millisecond)
	sent, recv, _ := flow.countsAfter(gone)
	assert.Positive(t, sent)
	assert.Zero(t, recv, "no path from site A to the VM at site B without the tunnel")
	for _, args := range [][]string{{"remove", "--netns", l.siteA, "--migration", mig1}, {"remove", "--netns", l.siteB, "--all-kept"}} {
		out, code = cli(t, args...)
		require.Equal(t, 0, code, "remove is idempotent")
		assert.Contains(t, out, "nothing to do")
	}
	_, code = cli(t, "remove", "--netns", l.siteA)
	assert.Equal(t, 2, code, "no selection")
	_, code = cli(t, "remove", "--netns", l.siteA, "--all-kept", "--migration", mig1)
	assert.Equal(t, 2, code, "two selections")
	_, code = cli(t, "list", "--mode", "tap")
	assert.Equal(t, 2, code)
}

// TestKeepRollbackRemovesEverything: keep is set, but the migration
// rolled back (never activated, never released): Cleanup removes the
// tunnels, in the live backend and in a fresh one working from the state.
func TestKeepRollbackRemovesEverything(t *testing.T) {
	l := newLab(t)
	keep := map[string]any{"keep_after_migration": true, "bridges": bridges}
	src, dst := siteBackend(t, l.siteA, l.ulA, keep), siteBackend(t, l.siteB, l.ulB, keep)
	s, d := prepareBoth(t, src, dst, "keep-rollback")
	ha, hb := handleIn(t, l.siteA), handleIn(t, l.siteB)
	require.Len(t, vxlans(t, ha), 2)
	require.Len(t, vxlans(t, hb), 2)
	ctx := context.Background()
	_, err := src.Cleanup(ctx, contract.NetCleanupRequest{Handle: s.Handle})
	require.NoError(t, err)
	dst.Close()
	_, err = siteBackend(t, l.siteB, l.ulB, keep).Cleanup(ctx, contract.NetCleanupRequest{Handle: d.Handle})
	require.NoError(t, err)
	assert.Empty(t, vxlans(t, ha))
	assert.Empty(t, vxlans(t, hb))
}

func TestKeepRefusedInTapMode(t *testing.T) {
	_, _, err := ParseConfig(configBytes(t, `{"mode":"tap","keep_after_migration":true}`))
	require.ErrorIs(t, err, contract.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "tap tunnel lives only as long as the backend process")
	c, _, err := ParseConfig(configBytes(t, `{"keep_after_migration":true}`))
	require.NoError(t, err)
	assert.True(t, c.KeepAfterMigration)

	b := New(nil)
	defer b.Close()
	raw, err := contract.ConfigFromJSON([]byte(`{"mode":"tap"}`))
	require.NoError(t, err)
	_, err = b.Configure(context.Background(), contract.ConfigureRequest{APIVersion: contract.APIVersion10, Config: raw})
	require.NoError(t, err)
	r := vmRequest("tap-keep", contract.RoleDestination)
	r.Options = keepOption(t, true)
	_, err = b.Prepare(context.Background(), r)
	require.ErrorIs(t, err, contract.ErrInvalidArgument)
	assert.Contains(t, err.Error(), "keep_after_migration needs kernel or ovs mode")
}

func TestMarkerAndSelection(t *testing.T) {
	for _, m := range []Marker{
		{MigrationID: "wm-0a1b2c3d4e5f", Role: contract.RoleSource, VMUUID: "3f1c0000-0000-4000-8000-000000000001", Kept: true},
		{MigrationID: "odd id=with&chars", Role: contract.RoleDestination},
		{},
	} {
		got, ok := ParseAlias(m.Alias())
		require.True(t, ok, m.Alias())
		assert.Equal(t, m, got)
		assert.LessOrEqual(t, len(m.Alias()), maxAlias)
	}
	long := Marker{MigrationID: strings.Repeat("m", 300), VMUUID: "vm", Kept: true}
	assert.LessOrEqual(t, len(long.Alias()), maxAlias)
	got, ok := ParseAlias(long.Alias())
	require.True(t, ok)
	assert.Equal(t, Marker{VMUUID: "vm", Kept: true}, got, "a part that does not fit is left out")
	for _, a := range []string{"", "uplink", "wanmotion-l2tunnel", "wanmotion-l2tunnel gone migration=x"} {
		_, ok := ParseAlias(a)
		assert.False(t, ok, a)
	}

	mig1, mig2 := collidingIDs(t, "sel")
	name := IfName(mig1, contract.RoleSource, "0")
	kept1 := FoundTunnel{Name: name, Marked: true, Marker: Marker{MigrationID: mig1, Role: contract.RoleSource, Kept: true}}
	active1 := kept1
	active1.Marker.Kept = false
	unmarked := FoundTunnel{Name: name}
	for _, tc := range []struct {
		f       FoundTunnel
		sweep   string
		foreign bool
	}{
		{kept1, mig1, true}, {kept1, mig2, true}, {active1, mig1, false}, {active1, mig2, true},
		{unmarked, mig1, false}, {unmarked, mig2, false},
	} {
		assert.Equal(t, tc.foreign, tc.f.foreign(tc.sweep), "%+v swept by %s", tc.f, tc.sweep)
	}
	for _, tc := range []struct {
		sel  Selection
		f    FoundTunnel
		want bool
	}{
		{Selection{MigrationID: mig1}, kept1, true},
		{Selection{MigrationID: mig2}, kept1, false},
		{Selection{MigrationID: mig2}, unmarked, true},
		{Selection{MigrationID: mig1, Role: contract.RoleDestination}, kept1, false},
		{Selection{AllKept: true}, kept1, true},
		{Selection{AllKept: true}, active1, false},
		{Selection{AllKept: true}, unmarked, false},
	} {
		assert.Equal(t, tc.want, tc.sel.matches(tc.f), "%+v %+v", tc.sel, tc.f)
	}
	for _, bad := range []Selection{{}, {MigrationID: "m", AllKept: true}, {MigrationID: "m", Role: "middle"}, {AllKept: true, Role: contract.RoleSource}} {
		assert.ErrorIs(t, bad.validate(), contract.ErrInvalidArgument, "%+v", bad)
	}
}
