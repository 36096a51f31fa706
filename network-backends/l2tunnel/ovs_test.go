package l2tunnel

import (
	"bytes"
	"context"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// ovsDB is a private ovsdb-server (no ovs-vswitchd) on a socket in a
// temp dir: ovs-vsctl --no-wait commands run against the real schema.
type ovsDB struct {
	db string // unix:<socket>
}

func (o *ovsDB) vsctl(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("ovs-vsctl", append([]string{"--timeout=10", "--db=" + o.db, "--no-wait"}, args...)...).CombinedOutput()
	require.NoError(t, err, "ovs-vsctl %s: %s", strings.Join(args, " "), out)
	return strings.TrimSpace(string(out))
}

func startOVSDB(t *testing.T) *ovsDB {
	t.Helper()
	testutil.RequireTool(t, "ovsdb-tool", "openvswitch-common")
	testutil.RequireTool(t, "ovsdb-server", "openvswitch-switch")
	testutil.RequireTool(t, "ovs-vsctl", "openvswitch-switch")
	schema := "/usr/share/openvswitch/vswitch.ovsschema"
	dir := t.TempDir()
	conf, sock := filepath.Join(dir, "conf.db"), filepath.Join(dir, "db.sock")
	out, err := exec.Command("ovsdb-tool", "create", conf, schema).CombinedOutput()
	require.NoError(t, err, "ovsdb-tool create: %s", out)
	srv := exec.Command("ovsdb-server", conf, "--remote=punix:"+sock, "--unixctl="+filepath.Join(dir, "ctl"),
		"--log-file="+filepath.Join(dir, "ovsdb.log"))
	require.NoError(t, srv.Start())
	t.Cleanup(func() {
		_ = srv.Process.Kill()
		_ = srv.Wait()
	})
	o := &ovsDB{db: "unix:" + sock}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := exec.Command("ovs-vsctl", "--timeout=2", "--db="+o.db, "--no-wait", "init").Run(); err == nil {
			break
		}
		require.True(t, time.Now().Before(deadline), "ovsdb-server did not come up")
		time.Sleep(50 * time.Millisecond)
	}
	return o
}

// TestOVSModeAgainstOVSDB runs the OVS data plane against a real ovsdb
// (the commands and the schema are real; no ovs-vswitchd forwards
// anything). The destination's announcements go out on a Linux bridge of
// the same name in a lab namespace, standing in for the OVS bridge's
// internal port.
func TestOVSModeAgainstOVSDB(t *testing.T) {
	o := startOVSDB(t)
	l := newLab(t)
	o.vsctl(t, "add-br", "br0")
	o.vsctl(t, "add-br", "br1")
	ovs := map[string]any{"mode": "ovs", "ovs_db": o.db, "ovs_no_wait": true, "bridges": bridges}
	src := siteBackend(t, l.siteA, l.ulA, ovs)
	dst := siteBackend(t, l.siteB, l.ulB, ovs)
	ctx := context.Background()
	const mig = "ovs-1"
	s, d := prepareBoth(t, src, dst, mig)

	ports := append(strings.Fields(o.vsctl(t, "list-ports", "br0")), strings.Fields(o.vsctl(t, "list-ports", "br1"))...)
	names := map[string]string{}
	for _, role := range []contract.Role{contract.RoleSource, contract.RoleDestination} {
		for _, dev := range []string{"0", "1"} {
			names[string(role)+dev] = IfName(mig, role, dev)
		}
	}
	for _, n := range names {
		assert.Contains(t, ports, n)
	}
	dn := names["destination0"]
	assert.Equal(t, "vxlan", o.vsctl(t, "get", "interface", dn, "type"))
	vni := DeriveVNI(mig, "0", DefaultVNIBase, DefaultVNICount)
	opts := o.vsctl(t, "get", "interface", dn, "options")
	for _, want := range []string{`dst_port="4789"`, `key="` + strconv.Itoa(vni) + `"`, `local_ip="` + l.ulB + `"`, `remote_ip="` + l.ulA + `"`} {
		assert.Contains(t, opts, want, "destination options (remote set by the source's registration)")
	}
	assert.Contains(t, o.vsctl(t, "get", "interface", names["source0"], "options"), `remote_ip="`+l.ulB+`"`)
	assert.Equal(t, "l2tunnel", o.vsctl(t, "get", "interface", dn, "external_ids:wanmotion"))
	assert.Equal(t, "true", o.vsctl(t, "get", "port", dn, "protected"))
	assert.Equal(t, "br1", o.vsctl(t, "port-to-br", names["destination1"]))

	st, err := dst.Status(ctx, contract.NetStatusRequest{Handle: d.Handle.ID})
	require.NoError(t, err)
	assert.Contains(t, st.Detail, "ovs vxlan key "+strconv.Itoa(vni)+" remote "+l.ulA)

	a, err := dst.Activate(ctx, contract.ActivateRequest{Handle: d.Handle.ID})
	require.NoError(t, err)
	assert.Len(t, a.Announced, 2)

	// Prepare again is idempotent in the database too (--may-exist).
	again, err := dst.Prepare(ctx, vmRequest(mig, contract.RoleDestination))
	require.NoError(t, err)
	assert.True(t, again.Existing)
	// Recover re-applies the ports (a fresh backend).
	dst2 := siteBackend(t, l.siteB, l.ulB, ovs)
	o.vsctl(t, "del-port", dn)
	_, err = dst2.Recover(ctx, contract.NetRecoverRequest{Handle: d.Handle})
	require.NoError(t, err)
	assert.Contains(t, strings.Fields(o.vsctl(t, "list-ports", "br0")), dn)

	// Cleanup from state, and the sweep after a crash.
	_, err = dst2.Cleanup(ctx, contract.NetCleanupRequest{Handle: d.Handle})
	require.NoError(t, err)
	_, err = src.Cleanup(ctx, contract.NetCleanupRequest{Handle: contract.Handle{ID: s.Handle.ID, MigrationID: mig, Role: contract.RoleSource}})
	require.NoError(t, err)
	assert.Empty(t, o.vsctl(t, "list-ports", "br0"))
	assert.Empty(t, o.vsctl(t, "list-ports", "br1"))
	_, err = dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: d.Handle})
	require.NoError(t, err, "cleanup twice")

	// A missing OVS bridge is a precondition error.
	r := vmRequest("ovs-2", contract.RoleDestination)
	r.VIFs[0].Bridge = "xenbr9"
	_, err = dst.Prepare(ctx, r)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "xenbr9")
}

// TestOVSKeepAndRemove: the per-migration option keeps the OVS ports of a
// migration that succeeded (the config says nothing), marked kept in
// their external_ids; a later migration's sweep leaves them; the remove
// command deletes them.
func TestOVSKeepAndRemove(t *testing.T) {
	o := startOVSDB(t)
	l := newLab(t)
	o.vsctl(t, "add-br", "br0")
	o.vsctl(t, "add-br", "br1")
	ovs := map[string]any{"mode": "ovs", "ovs_db": o.db, "ovs_no_wait": true, "bridges": bridges}
	src := siteBackend(t, l.siteA, l.ulA, ovs)
	dst := siteBackend(t, l.siteB, l.ulB, ovs)
	ctx := context.Background()
	mig1, mig2 := collidingIDs(t, "ovs-keep")
	d, err := dst.Prepare(ctx, func() contract.NetPrepareRequest {
		r := vmRequest(mig1, contract.RoleDestination)
		r.Options = keepOption(t, true)
		return r
	}())
	require.NoError(t, err)
	sr := vmRequest(mig1, contract.RoleSource)
	sr.Options, sr.Peer = keepOption(t, true), d.Endpoint
	s, err := src.Prepare(ctx, sr)
	require.NoError(t, err)
	_, err = dst.Activate(ctx, contract.ActivateRequest{Handle: d.Handle.ID})
	require.NoError(t, err)
	_, err = src.Release(ctx, contract.ReleaseRequest{Handle: s.Handle.ID})
	require.NoError(t, err)
	for _, x := range []struct {
		b *Backend
		h contract.Handle
	}{{src, s.Handle}, {dst, d.Handle}} {
		_, err := x.b.Cleanup(ctx, contract.NetCleanupRequest{Handle: x.h})
		require.NoError(t, err)
	}
	var names []string
	for _, role := range []contract.Role{contract.RoleSource, contract.RoleDestination} {
		for _, dev := range []string{"0", "1"} {
			names = append(names, IfName(mig1, role, dev))
		}
	}
	ports := func() []string {
		return append(strings.Fields(o.vsctl(t, "list-ports", "br0")), strings.Fields(o.vsctl(t, "list-ports", "br1"))...)
	}
	assert.ElementsMatch(t, names, ports(), "kept on both sites")
	dn := IfName(mig1, contract.RoleDestination, "0")
	assert.Equal(t, "kept", o.vsctl(t, "get", "interface", dn, "external_ids:wanmotion-state"))
	assert.Equal(t, mig1, unquoteOVS(o.vsctl(t, "get", "interface", dn, "external_ids:wanmotion-migration")))
	assert.Equal(t, "destination", o.vsctl(t, "get", "interface", dn, "external_ids:wanmotion-role"))
	assert.Contains(t, o.vsctl(t, "get", "interface", dn, "options"), `remote_ip="`+l.ulA+`"`)

	// A migration whose names share the prefix: crash sweep leaves them.
	_, err = dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: contract.Handle{ID: "x", MigrationID: mig2, Role: contract.RoleDestination}})
	require.NoError(t, err)
	assert.ElementsMatch(t, names, ports())

	common := []string{"--mode", "ovs", "--ovs-db", o.db, "--ovs-no-wait"}
	var out bytes.Buffer
	require.Equal(t, 0, RunCLI(ctx, append([]string{"list"}, common...), &out, &out), out.String())
	assert.Regexp(t, dn+` +kept +`+mig1+` +destination +vm-1 +- +[0-9]+ +`+l.ulA, out.String())
	// Values that are not plain words are quoted for ovs-vsctl.
	odd := Marker{MigrationID: `a b="c"`, Role: contract.RoleDestination, Kept: true}
	o.vsctl(t, OVSMarkArgs(dn, odd)...)
	assert.Equal(t, odd.MigrationID, unquoteOVS(o.vsctl(t, "get", "interface", dn, "external_ids:wanmotion-migration")))
	out.Reset()
	require.Equal(t, 0, RunCLI(ctx, append([]string{"remove", "--migration", mig1, "--role", "source"}, common...), &out, &out), out.String())
	assert.Equal(t, 2, strings.Count(out.String(), "removed "), out.String())
	out.Reset()
	require.Equal(t, 0, RunCLI(ctx, append([]string{"remove", "--all-kept"}, common...), &out, &out), out.String())
	assert.Equal(t, 2, strings.Count(out.String(), "removed "), out.String())
	assert.Empty(t, ports())
	out.Reset()
	require.Equal(t, 0, RunCLI(ctx, append([]string{"remove", "--all-kept"}, common...), &out, &out), out.String())
	assert.Contains(t, out.String(), "no ovs tunnel matched")
}
