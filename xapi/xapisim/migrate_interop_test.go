package xapisim

import (
	"context"
	"encoding/json"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// migrateScript drives live migrations with the official XenAPI.py: a
// failed one (fault injected mid-copy), an incremental one onto a
// pre-seeded replica, and a full one back, with a guest writing all along.
const migrateScript = `
import json, sys, time, http.client
from urllib.parse import urlsplit
from os_xenapi.client import XenAPI

info = json.loads(sys.argv[1])
out = {}

def session(site):
    s = XenAPI.Session(site["url"])
    s.xenapi.login_with_password(site["username"], site["password"], "1.0", "wanmotion-migrate-test")
    return s

a, b = session(info["pools"][0]), session(info["pools"][1])

def wait(s, task):
    progress = []
    deadline = time.time() + 60
    while time.time() < deadline:
        rec = s.xenapi.task.get_record(task)
        progress.append(float(rec["progress"]))
        if rec["status"] != "pending":
            return rec, progress
        time.sleep(0.02)
    raise Exception("task did not finish")

def failure(f):
    try:
        f()
        return None
    except XenAPI.Failure as e:
        return e.details

def maps(src, dst, vm):
    sr = dst.xenapi.SR.get_all()[0]
    net = dst.xenapi.network.get_by_name_label("WAN-net")[0]
    host = dst.xenapi.host.get_all()[1]
    vdis = {}
    for vbd in src.xenapi.VM.get_VBDs(vm):
        vdis[src.xenapi.VBD.get_VDI(vbd)] = sr
    vifs = dict((vif, net) for vif in src.xenapi.VM.get_VIFs(vm))
    dest = dst.xenapi.host.migrate_receive(host, net, {})
    return dest, vdis, vifs, host, sr

def vms(s):
    return sorted(r["name_label"] for r in s.xenapi.VM.get_all_records().values()
                  if not r["is_control_domain"] and not r["is_a_snapshot"])

vm = a.xenapi.VM.get_by_name_label("demo-vm")[0]
uuid = a.xenapi.VM.get_uuid(vm)
vdi = a.xenapi.VBD.get_VDI(a.xenapi.VM.get_VBDs(vm)[0])
size = int(a.xenapi.VDI.get_virtual_size(vdi))
a.xenapi.sim.guest_start(vm, {"rate": "2MiB/s", "pattern": "random", "block_size": "64KiB", "dirty_rate": "2MiB/s"})
time.sleep(0.3)

# 1. A failure mid-copy: the VM stays at the source, intact; nothing left at the destination.
dest, vdis, vifs, host, sr = maps(a, b, vm)
a.xenapi.VM.assert_can_migrate(vm, dest, True, vdis, vifs, {"force": "false"})
b_vdis_before = len(b.xenapi.VDI.get_all())
a.xenapi.sim.inject_fault("sm_copy")
rec, _ = wait(a, a.xenapi.Async.VM.migrate_send(vm, dest, True, vdis, vifs, {"force": "false"}))
out["fault"] = {"status": rec["status"], "error": rec["error_info"],
    "power": a.xenapi.VM.get_power_state(vm), "src_vms": vms(a), "dst_vms": vms(b),
    "dst_vdis_added": len(b.xenapi.VDI.get_all()) - b_vdis_before,
    "verify": a.xenapi.sim.guest_verify(vm)}

# 2. A pre-seeded replica with the snapshot's content_id: only the difference moves.
snap = a.xenapi.VDI.snapshot(vdi, {})
cid = a.xenapi.VDI.get_other_config(snap)["content_id"]
replica = b.xenapi.VDI.create({"name_label": "replica", "name_description": "", "SR": sr,
    "virtual_size": str(size), "type": "user", "sharable": False, "read_only": False, "other_config": {}})
src_url = urlsplit(info["pools"][0]["url"])
dst_url = urlsplit(info["pools"][1]["url"])
c = http.client.HTTPConnection(src_url.hostname, src_url.port)
c.request("GET", "/export_raw_vdi?format=raw&vdi=%s&session_id=%s" % (snap, a._session))
data = c.getresponse().read()
c = http.client.HTTPConnection(dst_url.hostname, dst_url.port)
c.request("PUT", "/import_raw_vdi?format=raw&vdi=%s&session_id=%s" % (replica, b._session), body=data,
          headers={"Content-Length": str(len(data))})
out["import_status"] = c.getresponse().status
b.xenapi.VDI.remove_from_other_config(replica, "content_id")
b.xenapi.VDI.add_to_other_config(replica, "content_id", cid)
time.sleep(0.3)  # the guest writes on
dest, vdis, vifs, host, sr = maps(a, b, vm)
# Through a plain TCP forwarder (started by the Go test) in front of the destination host.
for k in ("SM", "xenops"):
    u = urlsplit(dest[k])
    dest[k] = dest[k].replace(u.netloc, sys.argv[2], 1)
out["proxied_sm"] = dest["SM"]
sm_before = b.xenapi.sim.endpoint_bytes()
task = a.xenapi.Async.VM.migrate_send(vm, dest, True, vdis, vifs, {"force": "false", "copy": "false", "compress": "OFF"})
rec, progress = wait(a, task)
out["incr"] = {"status": rec["status"], "error": rec["error_info"], "progress_rising": progress == sorted(progress),
    "max_progress": max(progress), "last": b.xenapi.sim.last_migration(uuid), "src_vms": vms(a), "dst_vms": vms(b),
    "endpoint_before": sm_before, "endpoint_after": b.xenapi.sim.endpoint_bytes()}
if rec["status"] == "success":
    dvm = rec["result"].replace("<value>", "").replace("</value>", "")
    time.sleep(0.3)  # the guest writes on at the destination
    out["incr"].update({"power": b.xenapi.VM.get_power_state(dvm), "resident_on": b.xenapi.VM.get_resident_on(dvm),
        "host": host, "uuid": b.xenapi.VM.get_uuid(dvm), "pause_ms": b.xenapi.VM.get_other_config(dvm).get("sim:migration_pause_ms"),
        "verify": b.xenapi.sim.guest_verify(dvm), "stats": b.xenapi.sim.guest_stats(dvm),
        "replica_kept": b.xenapi.VDI.get_name_label(replica)})

    # 3. A full migration back (no replica at site-a).
    dest, vdis, vifs, host, sr = maps(b, a, dvm)
    rec, _ = wait(b, b.xenapi.Async.VM.migrate_send(dvm, dest, True, vdis, vifs, {}))
    out["full"] = {"status": rec["status"], "error": rec["error_info"], "last": a.xenapi.sim.last_migration(uuid),
        "src_vms": vms(b), "dst_vms": vms(a)}
    vm = a.xenapi.VM.get_by_name_label("demo-vm")[0]
    time.sleep(0.2)
    out["full"]["verify"] = a.xenapi.sim.guest_verify(vm)

    # 4. Errors.
    dest, vdis, vifs, host, sr = maps(a, b, vm)
    out["errors"] = {}
    out["errors"]["handle"] = failure(lambda: a.xenapi.VM.migrate_send("OpaqueRef:nope", dest, True, vdis, vifs, {}))
    d2 = dict(dest); del d2["xenops"]
    out["errors"]["bad_dest"] = failure(lambda: a.xenapi.VM.assert_can_migrate(vm, d2, True, vdis, vifs, {}))
    v = list(vdis.keys())[0]
    a.xenapi.VDI.enable_cbt(v)
    out["errors"]["cbt"] = failure(lambda: a.xenapi.VM.migrate_send(vm, dest, True, vdis, vifs, {})) + [v]
    a.xenapi.VDI.disable_cbt(v)
    a.xenapi.VM.pause(vm)
    out["errors"]["power"] = failure(lambda: a.xenapi.VM.migrate_send(vm, dest, True, vdis, vifs, {})) + [vm]
    a.xenapi.VM.unpause(vm)
    out["errors"]["bad_sr"] = failure(lambda: a.xenapi.VM.assert_can_migrate(vm, dest, True, dict((k, "OpaqueRef:nosr") for k in vdis), vifs, {}))
    out["errors"]["no_vif"] = failure(lambda: a.xenapi.VM.assert_can_migrate(vm, dest, True, vdis, {}, {}))
    out["errors"]["bad_session"] = failure(lambda: a.xenapi.VM.assert_can_migrate(vm, dict(dest, session_id="OpaqueRef:bad"), True, vdis, vifs, {}))
print(json.dumps(out))
`

func TestMigrateInteropPythonXenAPI(t *testing.T) {
	testutil.RequirePythonModule(t, "os_xenapi.client.XenAPI", "python3-os-xenapi")
	s := startMigSim(t)
	info, err := json.Marshal(s.Info())
	require.NoError(t, err)
	script := filepath.Join(t.TempDir(), "migrate.py")
	require.NoError(t, os.WriteFile(script, []byte(migrateScript), 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	target, err := neturl.Parse(s.Pools()[1].Hosts()[1].URL())
	require.NoError(t, err)
	px := newTCPProxy(t, target.Host)
	cmd := exec.CommandContext(ctx, testutil.PythonPath(t), script, string(info), px.addr())
	var stderr strings.Builder
	cmd.Stderr = &stderr
	outb, err := cmd.Output()
	require.NoError(t, err, "python: %s", stderr.String())
	type migOut struct {
		Status    string            `json:"status"`
		Error     []string          `json:"error"`
		Last      map[string]string `json:"last"`
		SrcVMs    []string          `json:"src_vms"`
		DstVMs    []string          `json:"dst_vms"`
		Verify    map[string]string `json:"verify"`
		Power     string            `json:"power"`
		Resident  string            `json:"resident_on"`
		Host      string            `json:"host"`
		UUID      string            `json:"uuid"`
		PauseMS   string            `json:"pause_ms"`
		Stats     map[string]string `json:"stats"`
		Rising    bool              `json:"progress_rising"`
		MaxProg   float64           `json:"max_progress"`
		DstAdded  int               `json:"dst_vdis_added"`
		EPBefore  map[string]string `json:"endpoint_before"`
		EPAfter   map[string]string `json:"endpoint_after"`
		ReplicaNm string            `json:"replica_kept"`
	}
	var out struct {
		Fault        migOut              `json:"fault"`
		ImportStatus int                 `json:"import_status"`
		Incr         migOut              `json:"incr"`
		ProxiedSM    string              `json:"proxied_sm"`
		Full         migOut              `json:"full"`
		Errors       map[string][]string `json:"errors"`
	}
	require.NoError(t, json.Unmarshal(outb, &out), string(outb))
	num := func(m map[string]string, k string) int64 {
		n, err := strconv.ParseInt(m[k], 10, 64)
		require.NoError(t, err, "%s in %v", k, m)
		return n
	}
	const disk = 32 << 20

	// 1. Failure mid-copy.
	assert.Equal(t, "failure", out.Fault.Status)
	require.NotEmpty(t, out.Fault.Error)
	assert.Equal(t, "VM_MIGRATE_FAILED", out.Fault.Error[0])
	assert.Len(t, out.Fault.Error, 5)
	assert.Equal(t, Running, out.Fault.Power)
	assert.Equal(t, []string{DemoVMName}, out.Fault.SrcVMs)
	assert.Empty(t, out.Fault.DstVMs)
	assert.Equal(t, 0, out.Fault.DstAdded, "partial destination VDIs removed")
	assert.Equal(t, "true", out.Fault.Verify["ok"], "disk intact: %v", out.Fault.Verify)

	// 2. Incremental onto the replica.
	assert.Equal(t, 200, out.ImportStatus)
	require.Equal(t, "success", out.Incr.Status, "%v", out.Incr.Error)
	assert.True(t, out.Incr.Rising, "progress only rises")
	assert.Equal(t, "true", out.Incr.Last["incremental"])
	sm := num(out.Incr.Last, "sm_bytes")
	assert.Less(t, sm, int64(disk/4), "only the difference crossed the SM URL")
	assert.Greater(t, sm, int64(0))
	assert.Equal(t, sm, num(out.Incr.EPAfter, "SM")-num(out.Incr.EPBefore, "SM"), "the destination received what was sent")
	assert.Contains(t, out.ProxiedSM, px.addr())
	assert.Greater(t, px.up.Load(), sm+num(out.Incr.Last, "xenops_bytes")-1, "the migration's bytes crossed the proxy")
	assert.Greater(t, px.up.Load(), num(out.Incr.Last, "disk_bytes"), "more than the disk delta crossed the proxy")
	assert.GreaterOrEqual(t, num(out.Incr.Last, "xenops_bytes"), int64(16<<20), "memory streamed")
	assert.Equal(t, "true", out.Incr.Last["memory_verified"])
	assert.Equal(t, Running, out.Incr.Power)
	assert.Equal(t, out.Incr.Host, out.Incr.Resident)
	assert.Equal(t, out.Incr.Last["vm"], out.Incr.UUID, "the VM keeps its uuid")
	assert.Empty(t, out.Incr.SrcVMs, "the VM runs only at the destination")
	assert.Equal(t, []string{DemoVMName}, out.Incr.DstVMs)
	assert.Equal(t, out.Incr.Last["pause_ms"], out.Incr.PauseMS, "pause time reported")
	assert.Equal(t, "true", out.Incr.Verify["ok"], "every guest write is at the destination: %v", out.Incr.Verify)
	assert.Equal(t, "true", out.Incr.Stats["running"])
	assert.Equal(t, "replica", out.Incr.ReplicaNm, "the replica is the clone's base, kept")

	// 3. Full copy back.
	require.Equal(t, "success", out.Full.Status, "%v", out.Full.Error)
	assert.Equal(t, "false", out.Full.Last["incremental"])
	assert.GreaterOrEqual(t, num(out.Full.Last, "sm_bytes"), int64(8<<20), "the allocated data")
	assert.Empty(t, out.Full.SrcVMs)
	assert.Equal(t, []string{DemoVMName}, out.Full.DstVMs)
	assert.Equal(t, "true", out.Full.Verify["ok"], "%v", out.Full.Verify)

	// 4. Errors.
	e := out.Errors
	assert.Equal(t, []string{ErrHandleInvalid, "VM", "OpaqueRef:nope"}, e["handle"])
	require.NotEmpty(t, e["bad_dest"])
	assert.Equal(t, ErrInternal, e["bad_dest"][0])
	require.Len(t, e["cbt"], 3)
	assert.Equal(t, []string{ErrVDICBTEnabled, e["cbt"][2]}, e["cbt"][:2])
	require.Len(t, e["power"], 5)
	assert.Equal(t, []string{ErrVMBadPowerState, e["power"][4], "halted, suspended, running", "paused"}, e["power"][:4])
	assert.Equal(t, []string{ErrHandleInvalid, "SR", "OpaqueRef:nosr"}, e["bad_sr"])
	require.NotEmpty(t, e["no_vif"])
	assert.Equal(t, "VIF_NOT_IN_MAP", e["no_vif"][0])
	require.NotEmpty(t, e["bad_session"])
	assert.Equal(t, "VM_MIGRATE_FAILED", e["bad_session"][0], "the dest session is checked")
	assert.Contains(t, e["bad_session"][len(e["bad_session"])-1], ErrSessionInvalid)
}
