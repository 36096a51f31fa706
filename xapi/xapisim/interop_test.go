package xapisim

import (
	"context"
	"encoding/json"
	neturl "net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// interopScript drives the simulator with the official XenAPI.py client
// (Debian python3-os-xenapi) and prints one JSON object of findings.
const interopScript = `
import json, sys, time
import xmlrpc.client
from os_xenapi.client import XenAPI

info = json.loads(sys.argv[1])
site = info["pools"][0]
out = {}

s = XenAPI.Session(site["url"])
s.xenapi.login_with_password(site["username"], site["password"], "1.0", "wanmotion-interop-test")
out["api_version"] = s.API_version
recs = s.xenapi.VM.get_all_records()
out["vms"] = sorted(r["name_label"] for r in recs.values() if not r["is_control_domain"])
vm = s.xenapi.VM.get_by_name_label("demo-vm")[0]
rec = s.xenapi.VM.get_record(vm)
out["power_state"] = rec["power_state"]
out["memory_static_max"] = rec["memory_static_max"]
out["vbds"] = len(rec["VBDs"])
vdi = s.xenapi.VBD.get_VDI(rec["VBDs"][0])
out["vdi_size"] = s.xenapi.VDI.get_virtual_size(vdi)
gm = rec["guest_metrics"]
out["guest_networks"] = s.xenapi.VM_guest_metrics.get_networks(gm)
out["guest_record_networks"] = s.xenapi.VM_guest_metrics.get_record(gm)["networks"]
dom0 = [r for r in recs.values() if r["is_control_domain"]][0]
out["dom0_guest_metrics"] = dom0["guest_metrics"]
s.xenapi.VM.set_VCPUs_number_live(vm, "1")
out["vcpus_number"] = s.xenapi.VM_metrics.get_VCPUs_number(rec["metrics"])
out["metrics_record_vcpus"] = s.xenapi.VM_metrics.get_record(rec["metrics"])["VCPUs_number"]

# XenAPI.py turns SESSION_INVALID into a re-login; read the raw reply through
# the same ServerProxy transport, then check XenAPI's parser recognises it.
raw = XenAPI.Session(site["url"])
r = getattr(raw, "VM.get_all")("OpaqueRef:not-a-session")
out["bad_session"] = r.get("ErrorDescription")
out["bad_session_relogin"] = XenAPI._parse_result(r) is XenAPI._RECONNECT_AND_RETRY
# A session killed server-side: XenAPI.py sees SESSION_INVALID and logs in again.
s3 = XenAPI.Session(site["url"])
s3.xenapi.login_with_password(site["username"], site["password"])
old = s3._session
XenAPI._parse_result(getattr(raw, "session.logout")(old))
out["relogin_vms"] = len(s3.xenapi.VM.get_all())
out["relogin_new_session"] = s3._session != old

member = XenAPI.Session(site["hosts"][1]["url"])
try:
    member.xenapi.login_with_password(site["username"], site["password"])
    out["member_login"] = None
except XenAPI.Failure as e:
    out["member_login"] = e.details
    # Follow the redirect as XO does: the named address, same scheme and port.
    from urllib.parse import urlsplit
    port = urlsplit(site["hosts"][1]["url"]).port
    again = XenAPI.Session("http://%s:%d/" % (e.details[1], port))
    again.xenapi.login_with_password(site["username"], site["password"])
    out["redirect_login"] = again._session.startswith("OpaqueRef:")
    again.xenapi.session.logout()

token = s.xenapi.event.__getattr__("from")(["vm"], "", 0.1)["token"]
task = s.xenapi.Async.VM.clean_shutdown(vm)
deadline = time.time() + 20
while s.xenapi.task.get_status(task) == "pending" and time.time() < deadline:
    time.sleep(0.05)
t = s.xenapi.task.get_record(task)
out["task"] = {"status": t["status"], "progress": t["progress"], "result": t["result"], "label": t["name_label"]}

seen = []
deadline = time.time() + 20
while time.time() < deadline:
    ev = s.xenapi.event.__getattr__("from")(["vm"], token, 5.0)
    token = ev["token"]
    for e in ev["events"]:
        if e["ref"] == vm:
            seen.append((e["operation"], e["snapshot"]["power_state"]))
    if ("mod", "Halted") in seen:
        break
out["events"] = seen
out["token"] = token

snap = s.xenapi.Async.VDI.snapshot(vdi)
while s.xenapi.task.get_status(snap) == "pending":
    time.sleep(0.05)
out["snapshot_result"] = s.xenapi.task.get_result(snap)
s.xenapi.session.logout()
print(json.dumps(out))
`

func TestInteropPythonXenAPI(t *testing.T) {
	testutil.RequirePythonModule(t, "os_xenapi.client.XenAPI", "python3-os-xenapi")
	s := startSim(t, "")
	info, err := json.Marshal(s.Info())
	require.NoError(t, err)
	script := filepath.Join(t.TempDir(), "interop.py")
	require.NoError(t, os.WriteFile(script, []byte(interopScript), 0o644))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, testutil.PythonPath(t), script, string(info))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	outb, err := cmd.Output()
	require.NoError(t, err, "python: %s", stderr.String())
	var out struct {
		APIVersion      string            `json:"api_version"`
		VMs             []string          `json:"vms"`
		PowerState      string            `json:"power_state"`
		MemoryStaticMax string            `json:"memory_static_max"`
		VBDs            int               `json:"vbds"`
		VDISize         string            `json:"vdi_size"`
		GuestNetworks   map[string]string `json:"guest_networks"`
		GuestRecordNets map[string]string `json:"guest_record_networks"`
		Dom0GM          string            `json:"dom0_guest_metrics"`
		VCPUsNumber     string            `json:"vcpus_number"`
		MetricsVCPUs    string            `json:"metrics_record_vcpus"`
		BadSession      []string          `json:"bad_session"`
		BadRelogin      bool              `json:"bad_session_relogin"`
		RedirectLogin   bool              `json:"redirect_login"`
		ReloginVMs      int               `json:"relogin_vms"`
		ReloginNew      bool              `json:"relogin_new_session"`
		MemberLogin     []string          `json:"member_login"`
		Task            struct {
			Status   string  `json:"status"`
			Progress float64 `json:"progress"`
			Result   string  `json:"result"`
			Label    string  `json:"label"`
		} `json:"task"`
		Events         [][]string `json:"events"`
		Token          string     `json:"token"`
		SnapshotResult string     `json:"snapshot_result"`
	}
	require.NoError(t, json.Unmarshal(outb, &out), string(outb))
	assert.Equal(t, "2.21", out.APIVersion)
	assert.Equal(t, []string{DemoVMName}, out.VMs)
	assert.Equal(t, Running, out.PowerState)
	assert.Equal(t, "536870912", out.MemoryStaticMax)
	assert.Equal(t, 1, out.VBDs)
	assert.Equal(t, "16777216", out.VDISize)
	wantNets := map[string]string{"0/ip": DefaultDemoIPv4, "0/ipv4/0": DefaultDemoIPv4, "0/ipv6/0": DefaultDemoIPv6}
	assert.Equal(t, wantNets, out.GuestNetworks)
	assert.Equal(t, wantNets, out.GuestRecordNets)
	assert.Equal(t, NullRef, out.Dom0GM)
	assert.Equal(t, "1", out.VCPUsNumber, "set_VCPUs_number_live then VM_metrics.get_VCPUs_number")
	assert.Equal(t, "1", out.MetricsVCPUs)
	assert.Equal(t, []string{ErrSessionInvalid, "OpaqueRef:not-a-session"}, out.BadSession)
	assert.True(t, out.BadRelogin, "XenAPI.py recognises SESSION_INVALID")
	assert.Equal(t, 3, out.ReloginVMs)
	assert.True(t, out.ReloginNew)
	cu, err := neturl.Parse(s.Info().Pools[0].URL)
	require.NoError(t, err)
	coord := cu.Hostname()
	assert.True(t, out.RedirectLogin, "login after following HOST_IS_SLAVE on the same port")
	assert.Equal(t, []string{ErrHostIsSlave, coord}, out.MemberLogin)
	assert.Equal(t, "success", out.Task.Status)
	assert.Equal(t, 1.0, out.Task.Progress)
	assert.Equal(t, "<value></value>", out.Task.Result)
	assert.Equal(t, "Async.VM.clean_shutdown", out.Task.Label)
	assert.Contains(t, out.Events, []string{"mod", Halted})
	assert.Regexp(t, `^\d{20},\d{20}$`, out.Token)
	assert.Regexp(t, `^<value>OpaqueRef:[0-9a-f-]{36}</value>$`, out.SnapshotResult)
}
