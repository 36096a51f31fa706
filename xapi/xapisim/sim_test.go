package xapisim

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	neturl "net/url"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/xapi"
)

func TestErrorsOnTheWire(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	member := s.Info().Pools[0].Hosts[1].URL
	cu, err := neturl.Parse(s.Info().Pools[0].URL)
	require.NoError(t, err)
	coordAddr := cu.Hostname()
	mu, err := neturl.Parse(member)
	require.NoError(t, err)
	require.Equal(t, cu.Port(), mu.Port(), "hosts of a pool share a port")
	require.NotEqual(t, cu.Hostname(), mu.Hostname(), "each host has its own loopback IP")
	tests := []struct {
		name   string
		url    string
		method string
		params []any
		want   *Fault
	}{
		{"bad session", url, "VM.get_all", []any{"OpaqueRef:bogus"}, Errorf(ErrSessionInvalid, "OpaqueRef:bogus")},
		{"bad handle", url, "VM.get_record", []any{sess, "OpaqueRef:nope"}, Errorf(ErrHandleInvalid, "VM", "OpaqueRef:nope")},
		{"unknown method", url, "VM.frobnicate", []any{sess}, Errorf(ErrMethodUnknown, "VM.frobnicate")},
		{"too few", url, "VM.start", []any{sess, "OpaqueRef:x"}, Errorf(ErrParamCountMismatch, "VM.start", "3", "1")},
		{"too many", url, "VM.get_all", []any{sess, "x"}, Errorf(ErrParamCountMismatch, "VM.get_all", "0", "1")},
		{"no session", url, "VM.get_all", nil, Errorf(ErrParamCountMismatch, "VM.get_all", "0", "-1")},
		{"async count", url, "Async.VM.clean_shutdown", []any{sess}, Errorf(ErrParamCountMismatch, "VM.clean_shutdown", "1", "0")},
		{"login count", url, "session.login_with_password", []any{"root"}, Errorf(ErrParamCountMismatch, "session.login_with_password", "2", "1")},
		{"auth", url, "session.login_with_password", []any{"root", "wrong"}, Errorf(ErrAuthFailed, "root", "Authentication failure")},
		{"member login", member, "session.login_with_password", []any{"root", "xenroot"}, Errorf(ErrHostIsSlave, coordAddr)},
		{"no async", url, "Async.task.create", []any{sess, "a", "b"}, Errorf("Fault", "No async mode for this operation (rpc: task.create)")},
		{"bad uuid", url, "VM.get_by_uuid", []any{sess, "nope"}, Errorf(ErrUUIDInvalid, "VM", "nope")},
		{"bad token", url, "event.from", []any{sess, []string{"*"}, "garbage", 0.1}, Errorf(ErrEventTokenParse, "garbage")},
		{"type error", url, "VM.start", []any{sess, "OpaqueRef:x", "true", false}, Errorf(ErrFieldTypeError, "start_paused")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, f := call(t, tt.url, tt.method, tt.params...)
			require.NotNil(t, f)
			assert.Equal(t, tt.want.Code, f.Code)
			assert.Equal(t, tt.want.Params, f.Params)
		})
	}
}

func TestGoldenResponses(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	assert.Equal(t,
		`<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>SESSION_INVALID</value><value>OpaqueRef:x</value></data></array></value></member></struct></value></param></params></methodResponse>`,
		string(rawCall(t, url, "pool.get_all", "OpaqueRef:x")))
	pools := ok(t, url, "pool.get_all", sess).([]any)
	body := string(rawCall(t, url, "pool.get_name_label", sess, pools[0]))
	assert.Equal(t, `<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>site-a</value></member></struct></value></param></params></methodResponse>`, body)
	host := ok(t, url, "pool.get_master", sess, pools[0])
	assert.Contains(t, string(rawCall(t, url, "host.get_API_version_major", sess, host)), `<name>Value</name><value>2</value>`)
	assert.Contains(t, string(rawCall(t, url, "host.get_API_version_minor", sess, host)), `<name>Value</name><value>21</value>`)
	assert.Contains(t, string(rawCall(t, url, "host.get_enabled", sess, host)), `<value><boolean>1</boolean></value>`)
	rec := string(rawCall(t, url, "VM.get_record", sess, demoVM(t, url, sess)))
	assert.Contains(t, rec, `<member><name>name_description</name><value>simulated guest with a realistic disk</value></member>`)
	assert.Contains(t, rec, `<member><name>suspend_VDI</name><value>OpaqueRef:NULL</value></member>`)
	assert.Contains(t, rec, `<member><name>snapshot_time</name><value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value></member>`)
	assert.Contains(t, rec, `<member><name>PV_args</name><value></value></member>`)
	assert.NotContains(t, rec, "<string>")
	assert.NotContains(t, rec, "<int>")
	assert.NotContains(t, rec, "\n")
}

func TestRPCPathsAndDefaults(t *testing.T) {
	s := startSim(t, "")
	base := s.Info().Pools[0].URL
	for _, path := range []string{"", "RPC2", "xmlrpc", "some/other"} {
		// login with only 2 params: version and originator are defaulted.
		v := ok(t, base+path, "session.login_with_password", "root", "xenroot")
		assert.True(t, strings.HasPrefix(v.(string), "OpaqueRef:"), path)
	}
	_, sess := login(t, s, 0)
	names := ok(t, base, "system.listMethods").([]any)
	set := map[string]bool{}
	for _, n := range names {
		set[n.(string)] = true
	}
	for _, m := range []string{"VM.start", "VDI.list_changed_blocks", "pool.add_to_other_config", "event.from", "task.cancel", "VM.get_record", "system.listMethods"} {
		assert.True(t, set[m], m)
	}
	// Class_method alternative wire name.
	assert.NotEmpty(t, ok(t, base, "VM_get_all", sess))
	resp, err := http.Get(base)
	require.NoError(t, err)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusMethodNotAllowed, resp.StatusCode)
}

func TestPowerStateMachine(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	steps := []struct {
		method string
		args   []any
		want   string // resulting power state, or error expected/actual
		err    []string
	}{
		{"VM.unpause", nil, "", []string{"paused", "running"}},
		{"VM.start", []any{false, false}, "", []string{"halted", "running"}},
		{"VM.resume", []any{false, false}, "", []string{"suspended", "running"}},
		{"VM.pause", nil, Paused, nil},
		{"VM.pause", nil, "", []string{"running", "paused"}},
		{"VM.clean_shutdown", nil, "", []string{"running", "paused"}},
		{"VM.unpause", nil, Running, nil},
		{"VM.suspend", nil, Suspended, nil},
		{"VM.unpause", nil, "", []string{"paused", "suspended"}},
		{"VM.resume", []any{true, false}, Paused, nil},
		{"VM.hard_shutdown", nil, Halted, nil},
		{"VM.hard_shutdown", nil, "", []string{"paused, suspended, running", "halted"}},
		{"VM.start", []any{false, false}, Running, nil},
		{"VM.clean_reboot", nil, Running, nil},
		{"VM.clean_shutdown", nil, Halted, nil},
		{"VM.start", []any{false, false}, Running, nil},
	}
	for i, st := range steps {
		_, f := call(t, url, st.method, append([]any{sess, vm}, st.args...)...)
		if st.err != nil {
			require.NotNil(t, f, "step %d %s", i, st.method)
			assert.Equal(t, ErrVMBadPowerState, f.Code)
			assert.Equal(t, []string{vm, st.err[0], st.err[1]}, f.Params, "step %d %s", i, st.method)
			continue
		}
		require.Nil(t, f, "step %d %s: %v", i, st.method, f)
		assert.Equal(t, st.want, ok(t, url, "VM.get_power_state", sess, vm), "step %d %s", i, st.method)
		res := ok(t, url, "VM.get_resident_on", sess, vm)
		if st.want == Halted || st.want == Suspended {
			assert.Equal(t, NullRef, res)
		} else {
			assert.NotEqual(t, NullRef, res)
		}
	}
	// dom0 cannot be paused.
	host := ok(t, url, "pool.get_master", sess, ok(t, url, "pool.get_all", sess).([]any)[0])
	dom0 := ok(t, url, "host.get_control_domain", sess, host)
	_, f := call(t, url, "VM.pause", sess, dom0)
	require.NotNil(t, f)
	assert.Equal(t, ErrOperationNotAllowed, f.Code)
}

func TestPoolOtherConfig(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	uuid := ok(t, url, "pool.get_uuid", sess, pool).(string)
	ok(t, url, "pool.add_to_other_config", sess, pool, "wanmig:k", "v1")
	_, f := call(t, url, "pool.add_to_other_config", sess, pool, "wanmig:k", "v2")
	require.NotNil(t, f)
	assert.Equal(t, []string{"pool", "other_config", uuid, "wanmig:k"}, f.Params)
	assert.Equal(t, ErrMapDuplicateKey, f.Code)
	ok(t, url, "pool.remove_from_other_config", sess, pool, "wanmig:k")
	ok(t, url, "pool.remove_from_other_config", sess, pool, "wanmig:k") // no-op
	ok(t, url, "pool.add_to_other_config", sess, pool, "wanmig:k", "v2")
	assert.Equal(t, map[string]any{"wanmig:k": "v2"}, ok(t, url, "pool.get_other_config", sess, pool))
	ok(t, url, "pool.set_other_config", sess, pool, map[string]string{"a": "b"})
	assert.Equal(t, map[string]any{"a": "b"}, ok(t, url, "pool.get_other_config", sess, pool))
}

func TestAsyncAndTasks(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	task := ok(t, url, "Async.VM.clean_shutdown", sess, vm).(string)
	require.Eventually(t, func() bool { return ok(t, url, "task.get_status", sess, task) != "pending" }, 10*time.Second, 10*time.Millisecond)
	rec := ok(t, url, "task.get_record", sess, task).(map[string]any)
	assert.Equal(t, "success", rec["status"])
	assert.Equal(t, 1.0, rec["progress"])
	assert.Equal(t, "<value></value>", rec["result"])
	assert.Equal(t, "Async.VM.clean_shutdown", rec["name_label"])
	assert.True(t, rec["finished"].(time.Time).After(Never))

	// A failing async call records error_info.
	task = ok(t, url, "Async.VM.pause", sess, vm).(string)
	require.Eventually(t, func() bool { return ok(t, url, "task.get_status", sess, task) != "pending" }, 10*time.Second, 10*time.Millisecond)
	rec = ok(t, url, "task.get_record", sess, task).(map[string]any)
	assert.Equal(t, "failure", rec["status"])
	assert.Equal(t, []any{ErrVMBadPowerState, vm, "running", "halted"}, rec["error_info"])

	// Async returning a ref stores it as an XML-RPC value string.
	vdi, _ := demoVDI(t, url, sess)
	task = ok(t, url, "Async.VDI.snapshot", sess, vdi).(string)
	require.Eventually(t, func() bool { return ok(t, url, "task.get_status", sess, task) != "pending" }, 10*time.Second, 10*time.Millisecond)
	res := ok(t, url, "task.get_result", sess, task).(string)
	require.True(t, strings.HasPrefix(res, "<value>OpaqueRef:"), res)

	// Tasks created by clients: cancel is recorded, destroy is deferred.
	my := ok(t, url, "task.create", sess, "VM.migrate_send", "wan").(string)
	assert.Equal(t, "pending", ok(t, url, "task.get_status", sess, my))
	assert.Equal(t, Never, ok(t, url, "task.get_finished", sess, my))
	ok(t, url, "task.add_to_other_config", sess, my, "applies_to", vm)
	ok(t, url, "task.set_progress", sess, my, 0.25)
	ok(t, url, "task.cancel", sess, my)
	ops := ok(t, url, "task.get_current_operations", sess, my).(map[string]any)
	require.Len(t, ops, 1)
	for _, v := range ops {
		assert.Equal(t, "cancel", v)
	}
	assert.Equal(t, "pending", ok(t, url, "task.get_status", sess, my))
	ok(t, url, "task.destroy", sess, my)
	assert.Equal(t, "pending", ok(t, url, "task.get_status", sess, my), "destroy of a pending task is deferred")
	assert.Equal(t, "destroy", ok(t, url, "task.get_current_operations", sess, my).(map[string]any)["task"],
		"Xapi_task.destroy records the deferred destroy under key \"task\"")
	_, f := call(t, url, "task.destroy", sess, my)
	require.NotNil(t, f, "a second deferred destroy is a duplicate key")
	assert.Equal(t, ErrMapDuplicateKey, f.Code)
	ok(t, url, "task.set_progress", sess, my, 0.5)
	ok(t, url, "task.set_status", sess, my, "cancelled")
	// Xapi_task.set_status sets the status only: finished stays the
	// epoch (XenCenter's completion test, finished.Year > 1970, does
	// not see a client-finished task) and progress stays where it was.
	assert.Equal(t, "cancelled", ok(t, url, "task.get_status", sess, my))
	assert.Equal(t, Never, ok(t, url, "task.get_finished", sess, my))
	assert.Equal(t, 0.5, ok(t, url, "task.get_progress", sess, my))
	ok(t, url, "task.cancel", sess, my) // xapi does not check the status
	assert.Equal(t, "cancelled", ok(t, url, "task.get_status", sess, my))
	ok(t, url, "task.destroy", sess, my)
	_, f = call(t, url, "task.get_status", sess, my)
	require.NotNil(t, f)
	assert.Equal(t, ErrHandleInvalid, f.Code)
}

func TestEventFrom(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	first := ok(t, url, "event.from", sess, []string{"VM"}, "", 1.0).(map[string]any)
	evs := first["events"].([]any)
	require.Len(t, evs, 3) // demo-vm and two dom0s
	for _, e := range evs {
		m := e.(map[string]any)
		assert.Equal(t, "vm", m["class"])
		assert.Equal(t, "add", m["operation"])
		assert.Contains(t, m, "snapshot")
	}
	assert.Equal(t, map[string]any{"vm": int64(3)}, first["valid_ref_counts"])
	tok := first["token"].(string)
	assert.Regexp(t, `^\d{20},\d{20}$`, tok)

	// A class xapi does not know is no error (Subscription.of_string): it
	// selects nothing, beside the classes that exist.
	mixed := ok(t, url, "event.from", sess, []string{"message", "VM", "nonsense/OpaqueRef:x"}, "", 0.1).(map[string]any)
	assert.Len(t, mixed["events"], 3)
	assert.Equal(t, map[string]any{"vm": int64(3)}, mixed["valid_ref_counts"])
	none := ok(t, url, "event.from", sess, []string{"nonsense"}, "", 0.1).(map[string]any)
	assert.Empty(t, none["events"])

	// Blocks until a change.
	vm := demoVM(t, url, sess)
	done := make(chan map[string]any, 1)
	go func() {
		v, _ := call(t, url, "event.from", sess, []string{"vm"}, tok, 30.0)
		m, _ := v.(map[string]any)
		done <- m
	}()
	time.Sleep(100 * time.Millisecond)
	ok(t, url, "VM.pause", sess, vm)
	var got map[string]any
	select {
	case got = <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("event.from did not return")
	}
	require.NotNil(t, got)
	evs = got["events"].([]any)
	require.NotEmpty(t, evs)
	last := evs[len(evs)-1].(map[string]any)
	assert.Equal(t, "mod", last["operation"])
	assert.Equal(t, vm, last["ref"])
	assert.Equal(t, Paused, last["snapshot"].(map[string]any)["power_state"])
	assert.Greater(t, got["token"].(string), tok)

	// Times out with an empty list; inject gives a barrier token.
	empty := ok(t, url, "event.from", sess, []string{"vm"}, got["token"], 0.2).(map[string]any)
	assert.Empty(t, empty["events"])
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	itok := ok(t, url, "event.inject", sess, "pool", pool).(string)
	ev := ok(t, url, "event.from", sess, []string{"pool"}, got["token"], 5.0).(map[string]any)
	assert.GreaterOrEqual(t, ev["token"].(string), itok)
	assert.Len(t, ev["events"], 1)

	// Deletions.
	task := ok(t, url, "task.create", sess, "x", "y").(string)
	ok(t, url, "task.set_status", sess, task, "success")
	ok(t, url, "task.destroy", sess, task)
	del := ok(t, url, "event.from", sess, []string{"task/" + task}, ev["token"], 5.0).(map[string]any)
	devs := del["events"].([]any)
	require.NotEmpty(t, devs)
	lastDel := devs[len(devs)-1].(map[string]any)
	assert.Equal(t, "del", lastDel["operation"])
	assert.NotContains(t, lastDel, "snapshot")
}

func TestStateSurvivesRestart(t *testing.T) {
	dir := t.TempDir()
	s := startSim(t, dir)
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	ok(t, url, "VM.pause", sess, vm)
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	ok(t, url, "pool.add_to_other_config", sess, pool, "wanmig:x", "1")
	vdi, uuid := demoVDI(t, url, sess)
	ok(t, url, "VDI.enable_cbt", sess, vdi)
	snap := ok(t, url, "VDI.snapshot", sess, vdi).(string)
	oldToken := ok(t, url, "event.from", sess, []string{"*"}, "", 0.1).(map[string]any)["token"]
	require.NoError(t, s.WriteVDI(uuid, 3*CBTBlockSize, []byte("hello")))
	require.NoError(t, s.Close())

	s2, err := New(Config{StateDir: dir})
	require.NoError(t, err)
	require.NoError(t, s2.Start(context.Background(), "127.0.0.1:0"))
	defer func() { _ = s2.Close() }()
	url2, sess2 := login(t, s2, 0)
	assert.Equal(t, vm, demoVM(t, url2, sess2))
	assert.Equal(t, Paused, ok(t, url2, "VM.get_power_state", sess2, vm))
	assert.Equal(t, map[string]any{"wanmig:x": "1"}, ok(t, url2, "pool.get_other_config", sess2, pool))
	_, f := call(t, url2, "VM.get_all", sess)
	require.NotNil(t, f, "sessions do not survive a restart")
	_, f = call(t, url2, "event.from", sess2, []string{"*"}, oldToken, 0.1)
	require.NotNil(t, f)
	assert.Equal(t, ErrEventsLost, f.Code, "deletions before a restart are not kept")
	ok(t, url2, "VM.hard_shutdown", sess2, vm)
	snap2 := ok(t, url2, "VDI.snapshot", sess2, vdi).(string)
	bm := decodeBitmap(t, ok(t, url2, "VDI.list_changed_blocks", sess2, snap, snap2).(string))
	assert.Equal(t, []int{3}, setBits(bm))
	assert.Len(t, s2.Info().Pools, 2)
}

func decodeBitmap(t *testing.T, s string) []byte {
	t.Helper()
	b, err := base64.StdEncoding.DecodeString(s)
	require.NoError(t, err)
	return b
}

func setBits(bm []byte) []int {
	var out []int
	for i := 0; i < len(bm)*8; i++ {
		if bm[i/8]&(0x80>>(i%8)) != 0 {
			out = append(out, i)
		}
	}
	return out
}

func TestCBTAndSnapshots(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	vdi, uuid := demoVDI(t, url, sess)
	size := int64(16 << 20)
	ok(t, url, "VDI.enable_cbt", sess, vdi)
	assert.Equal(t, true, ok(t, url, "VDI.get_cbt_enabled", sess, vdi))

	s0 := ok(t, url, "VDI.snapshot", sess, vdi).(string)
	cid := ok(t, url, "VDI.get_other_config", sess, vdi).(map[string]any)["content_id"]
	require.NotEmpty(t, cid)
	assert.Equal(t, cid, ok(t, url, "VDI.get_other_config", sess, s0).(map[string]any)["content_id"], "snapshot carries content_id")
	assert.Equal(t, true, ok(t, url, "VDI.get_is_a_snapshot", sess, s0))
	assert.Equal(t, vdi, ok(t, url, "VDI.get_snapshot_of", sess, s0))
	assert.Equal(t, []any{s0}, ok(t, url, "VDI.get_snapshots", sess, vdi))

	// Epoch 1: blocks 0, 5 and 7..9 (a write straddling a boundary).
	require.NoError(t, s.WriteVDI(uuid, 10, []byte("x")))
	require.NoError(t, s.WriteVDI(uuid, 5*CBTBlockSize+100, []byte("y")))
	require.NoError(t, s.WriteVDI(uuid, 8*CBTBlockSize-1, make([]byte, CBTBlockSize+2)))
	newCID := ok(t, url, "VDI.get_other_config", sess, vdi).(map[string]any)["content_id"]
	assert.NotEqual(t, cid, newCID, "a write changes the live content_id")
	assert.Error(t, s.WriteVDI(uuid, size-1, []byte("ab")), "write past the end")

	// The live disk is attached to a running VM: list_changed_blocks refuses.
	_, f := call(t, url, "VDI.list_changed_blocks", sess, s0, vdi)
	require.NotNil(t, f)
	assert.Equal(t, ErrVDIInUse, f.Code)

	s1 := ok(t, url, "VDI.snapshot", sess, vdi).(string)
	// Epoch 2: block 5 again and block 200.
	require.NoError(t, s.WriteVDI(uuid, 5*CBTBlockSize, []byte("z")))
	require.NoError(t, s.WriteVDI(uuid, 200*CBTBlockSize, []byte("w")))
	s2 := ok(t, url, "VDI.snapshot", sess, vdi).(string)

	cases := []struct {
		from, to string
		want     []int
	}{
		{s0, s1, []int{0, 5, 7, 8, 9}},
		{s1, s2, []int{5, 200}},
		{s0, s2, []int{0, 5, 7, 8, 9, 200}},
		{s2, s0, []int{0, 5, 7, 8, 9, 200}},
		{s1, s1, nil},
	}
	for _, c := range cases {
		bm := decodeBitmap(t, ok(t, url, "VDI.list_changed_blocks", sess, c.from, c.to).(string))
		assert.Len(t, bm, int(size/CBTBlockSize/8))
		assert.Equal(t, c.want, setBits(bm))
	}
	// Live VDI when detached.
	ok(t, url, "VM.hard_shutdown", sess, vm)
	require.NoError(t, s.WriteVDI(uuid, 100*CBTBlockSize, []byte("v")))
	assert.Equal(t, []int{100}, setBits(decodeBitmap(t, ok(t, url, "VDI.list_changed_blocks", sess, s2, vdi).(string))))

	// Snapshot data equals the source at snapshot time.
	p1, err := s.VDIPath(ok(t, url, "VDI.get_uuid", sess, s2).(string))
	require.NoError(t, err)
	pl, err := s.VDIPath(uuid)
	require.NoError(t, err)
	a, err := os.ReadFile(p1)
	require.NoError(t, err)
	b, err := os.ReadFile(pl)
	require.NoError(t, err)
	require.Len(t, a, int(size))
	assert.NotEqual(t, a, b)
	b[100*CBTBlockSize] = a[100*CBTBlockSize]
	assert.Equal(t, a, b, "snapshot equals source but for the later write")

	// Destroying the middle snapshot keeps s0..s2 exact.
	ok(t, url, "VDI.destroy", sess, s1)
	assert.Equal(t, []int{0, 5, 7, 8, 9, 200}, setBits(decodeBitmap(t, ok(t, url, "VDI.list_changed_blocks", sess, s0, s2).(string))))

	// data_destroy: only CBT metadata remains, comparisons still work.
	ok(t, url, "VDI.data_destroy", sess, s0)
	assert.Equal(t, "cbt_metadata", ok(t, url, "VDI.get_type", sess, s0))
	_, err = os.Stat(mustPath(t, s, ok(t, url, "VDI.get_uuid", sess, s0).(string)))
	assert.True(t, os.IsNotExist(err))
	assert.Equal(t, []int{0, 5, 7, 8, 9, 200}, setBits(decodeBitmap(t, ok(t, url, "VDI.list_changed_blocks", sess, s0, s2).(string))))
	_, f = call(t, url, "VDI.data_destroy", sess, vdi)
	require.NotNil(t, f)
	assert.Equal(t, ErrVDINoCBTMetadata, f.Code)
	_, f = call(t, url, "VDI.snapshot", sess, s0)
	require.NotNil(t, f)
	assert.Equal(t, []string{s0, "cbt_metadata"}, f.Params)

	// Unrelated VDIs.
	clone := ok(t, url, "VDI.clone", sess, vdi).(string)
	assert.Equal(t, false, ok(t, url, "VDI.get_cbt_enabled", sess, clone))
	ok(t, url, "VDI.enable_cbt", sess, clone)
	_, f = call(t, url, "VDI.list_changed_blocks", sess, s2, clone)
	require.NotNil(t, f)
	assert.Equal(t, ErrSRBackendFailure, f.Code)

	// Disable then re-enable starts a new chain.
	ok(t, url, "VDI.disable_cbt", sess, vdi)
	ok(t, url, "VDI.enable_cbt", sess, vdi)
	_, f = call(t, url, "VDI.list_changed_blocks", sess, s2, vdi)
	require.NotNil(t, f)
}

func mustPath(t *testing.T, s *Sim, uuid string) string {
	t.Helper()
	p, err := s.VDIPath(uuid)
	require.NoError(t, err)
	return p
}

func TestVDILifecycleAndDom0Plug(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 1)
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	sr := ok(t, url, "pool.get_default_SR", sess, pool).(string)
	assert.Equal(t, "ext", ok(t, url, "SR.get_type", sess, sr))
	assert.Empty(t, ok(t, url, "SR.get_VDIs", sess, sr))
	vdi := ok(t, url, "VDI.create", sess, map[string]any{
		"SR": sr, "virtual_size": "4194304", "type": "user", "name_label": "replica",
		"sharable": false, "read_only": false, "other_config": map[string]any{"content_id": "abc"},
	}).(string)
	assert.Equal(t, "4194304", ok(t, url, "VDI.get_virtual_size", sess, vdi))
	assert.Equal(t, map[string]any{"content_id": "abc"}, ok(t, url, "VDI.get_other_config", sess, vdi))
	assert.Equal(t, []any{vdi}, ok(t, url, "SR.get_VDIs", sess, sr))
	uuid := ok(t, url, "VDI.get_uuid", sess, vdi).(string)
	path := mustPath(t, s, uuid)
	st, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, int64(4<<20), st.Size())

	host := ok(t, url, "pool.get_master", sess, pool)
	dom0 := ok(t, url, "host.get_control_domain", sess, host)
	vbd := ok(t, url, "VBD.create", sess, map[string]any{
		"VM": dom0, "VDI": vdi, "userdevice": "autodetect", "bootable": false, "mode": "RW", "type": "Disk",
		"unpluggable": true, "empty": false, "other_config": map[string]any{}, "qos_algorithm_type": "", "qos_algorithm_params": map[string]any{},
	}).(string)
	ok(t, url, "VBD.plug", sess, vbd)
	assert.Equal(t, path, ok(t, url, "VBD.get_device", sess, vbd))
	assert.Equal(t, path, ok(t, url, "VBD.get_other_config", sess, vbd).(map[string]any)[DeviceKey])
	_, f := call(t, url, "VBD.plug", sess, vbd)
	require.NotNil(t, f)
	assert.Equal(t, ErrDeviceAlreadyAttached, f.Code)
	_, f = call(t, url, "VDI.destroy", sess, vdi)
	require.NotNil(t, f)
	assert.Equal(t, []string{vdi, "destroy"}, f.Params)
	ok(t, url, "VBD.unplug", sess, vbd)
	ok(t, url, "VBD.destroy", sess, vbd)

	// Raw import/export.
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<16) // 1 MiB
	q := fmt.Sprintf("?vdi=%s&format=raw&session_id=%s", vdi, sess)
	req, err := http.NewRequest(http.MethodPut, url+"import_raw_vdi"+q, bytes.NewReader(data))
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.NotEqual(t, "abc", ok(t, url, "VDI.get_other_config", sess, vdi).(map[string]any)["content_id"])

	req, err = http.NewRequest(http.MethodPut, url+"import_raw_vdi"+q, io.MultiReader(bytes.NewReader(data)))
	require.NoError(t, err)
	req.ContentLength = -1
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusBadRequest, resp.StatusCode, "chunked upload is refused")

	req, err = http.NewRequest(http.MethodGet, url+"export_raw_vdi?format=raw&vdi="+uuid, nil)
	require.NoError(t, err)
	req.SetBasicAuth("root", "xenroot")
	resp, err = http.DefaultClient.Do(req)
	require.NoError(t, err)
	got, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	require.NoError(t, err)
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Len(t, got, 4<<20)
	assert.Equal(t, data, got[:len(data)])
	assert.Equal(t, make([]byte, len(got)-len(data)), got[len(data):])

	resp, err = http.Get(url + "export_raw_vdi?vdi=" + uuid + "&session_id=OpaqueRef:bad")
	require.NoError(t, err)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusUnauthorized, resp.StatusCode)

	ok(t, url, "VDI.destroy", sess, vdi)
	_, err = os.Stat(path)
	assert.True(t, os.IsNotExist(err))
}

func TestDemoDiskIsRealistic(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	_, uuid := demoVDI(t, url, sess)
	b, err := os.ReadFile(mustPath(t, s, uuid))
	require.NoError(t, err)
	zero := make([]byte, 256<<10)
	var data, text int
	for off := 0; off < len(b); off += len(zero) {
		c := b[off : off+len(zero)]
		if bytes.Equal(c, zero) {
			continue
		}
		data++
		if bytes.Contains(c, []byte(" the ")) || bytes.Contains(c, []byte(" kernel ")) {
			text++
		}
	}
	assert.Equal(t, 16, data, "4 MiB of 256 KiB chunks")
	assert.Positive(t, text)
	assert.Less(t, text, data)
	assert.Less(t, physicalUtilisation(mustPath(t, s, uuid)), int64(8<<20), "the disk is sparse")
}

func TestVMSnapshot(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	vdi, _ := demoVDI(t, url, sess)
	snap := ok(t, url, "VM.snapshot", sess, vm, "before-migrate").(string)
	rec := ok(t, url, "VM.get_record", sess, snap).(map[string]any)
	assert.Equal(t, true, rec["is_a_snapshot"])
	assert.Equal(t, vm, rec["snapshot_of"])
	assert.Equal(t, Halted, rec["power_state"])
	assert.Equal(t, "before-migrate", rec["name_label"])
	assert.Equal(t, []any{snap}, ok(t, url, "VM.get_snapshots", sess, vm))
	vbds := rec["VBDs"].([]any)
	require.Len(t, vbds, 1)
	svdi := ok(t, url, "VBD.get_VDI", sess, vbds[0]).(string)
	assert.NotEqual(t, vdi, svdi)
	assert.Equal(t, vdi, ok(t, url, "VDI.get_snapshot_of", sess, svdi))
	assert.Equal(t, ok(t, url, "VDI.get_other_config", sess, vdi).(map[string]any)["content_id"],
		ok(t, url, "VDI.get_other_config", sess, svdi).(map[string]any)["content_id"])
	assert.Len(t, rec["VIFs"], 1)
	_, f := call(t, url, "VM.start", sess, snap, false, false)
	require.NotNil(t, f)
	assert.Equal(t, "VM_IS_SNAPSHOT", f.Code)
	// ignore_vdis leaves the disk out.
	snap2 := ok(t, url, "VM.snapshot", sess, vm, "no-disks", []string{vdi}).(string)
	assert.Empty(t, ok(t, url, "VM.get_VBDs", sess, snap2))
	ok(t, url, "VM.destroy", sess, snap2)
}

func TestSharedIPAddressesCarryPorts(t *testing.T) {
	s, err := New(Config{StateDir: t.TempDir(), DiskSize: 1 << 20, FillSize: 256 << 10, NoDemoVM: true})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "localhost:0"))
	defer func() { _ = s.Close() }()
	pi := s.Info().Pools[0]
	_, f := call(t, pi.Hosts[1].URL, "session.login_with_password", pi.Username, pi.Password)
	require.NotNil(t, f)
	cu, err := neturl.Parse(pi.URL)
	require.NoError(t, err)
	assert.Equal(t, []string{cu.Host}, f.Params, "host:port when hosts share one IP")
	// Following it reaches the coordinator.
	ok(t, "http://"+f.Params[0]+"/", "session.login_with_password", pi.Username, pi.Password)
}

func TestContextCancelClosesAndSaves(t *testing.T) {
	dir := t.TempDir()
	s, err := New(Config{StateDir: dir, DiskSize: 1 << 20, FillSize: 256 << 10})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	require.NoError(t, s.Start(ctx, "127.0.0.1:0"))
	url, sess := login(t, s, 0)
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	ok(t, url, "pool.add_to_other_config", sess, pool, "k", "v")
	cancel()
	select {
	case <-s.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("not closed after cancel")
	}
	require.NoError(t, s.Close(), "Close waits for the ctx-triggered close")
	s2, err := New(Config{StateDir: dir})
	require.NoError(t, err)
	p, found := s2.PoolByName("site-a")
	require.True(t, found)
	p.Lock()
	assert.Equal(t, "v", p.db.all("pool")[0].strMap("other_config")["k"])
	p.Unlock()
	require.NoError(t, s2.Close())
}

func TestUsageFollowsWrites(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 1)
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	sr := ok(t, url, "pool.get_default_SR", sess, pool).(string)
	vdi := ok(t, url, "VDI.create", sess, map[string]any{"SR": sr, "virtual_size": "8388608", "type": "user"}).(string)
	uuid := ok(t, url, "VDI.get_uuid", sess, vdi).(string)
	assert.Equal(t, "0", ok(t, url, "VDI.get_physical_utilisation", sess, vdi))
	require.NoError(t, s.WriteVDI(uuid, 2<<20, bytes.Repeat([]byte{1}, 1<<20)))
	require.Eventually(t, func() bool {
		return ok(t, url, "VDI.get_physical_utilisation", sess, vdi) == "1048576"
	}, 10*time.Second, 50*time.Millisecond)
	require.Eventually(t, func() bool {
		return ok(t, url, "SR.get_physical_utilisation", sess, sr) == "1048576"
	}, 10*time.Second, 50*time.Millisecond)
	assert.Equal(t, "8388608", ok(t, url, "SR.get_virtual_allocation", sess, sr))
}

func TestVDICopyInto(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vdi, uuid := demoVDI(t, url, sess)
	sr := ok(t, url, "VDI.get_SR", sess, vdi).(string)
	small := ok(t, url, "VDI.create", sess, map[string]any{"SR": sr, "virtual_size": "1048576"}).(string)
	_, f := call(t, url, "VDI.copy", sess, vdi, sr, NullRef, small)
	require.NotNil(t, f)
	assert.Equal(t, "VDI_TOO_SMALL", f.Code)
	big := ok(t, url, "VDI.create", sess, map[string]any{"SR": sr, "virtual_size": "33554432"}).(string)
	bigUUID := ok(t, url, "VDI.get_uuid", sess, big).(string)
	require.NoError(t, s.WriteVDI(bigUUID, 20<<20, []byte("stale")))
	assert.Equal(t, big, ok(t, url, "VDI.copy", sess, vdi, sr, NullRef, big))
	src, err := os.ReadFile(mustPath(t, s, uuid))
	require.NoError(t, err)
	dst, err := os.ReadFile(mustPath(t, s, bigUUID))
	require.NoError(t, err)
	require.Len(t, dst, 32<<20, "into keeps its size")
	assert.Equal(t, src, dst[:len(src)])
	assert.Equal(t, make([]byte, len(dst)-len(src)), dst[len(src):], "old data past the copy is gone")
	assert.Equal(t, ok(t, url, "VDI.get_other_config", sess, vdi).(map[string]any)["content_id"],
		ok(t, url, "VDI.get_other_config", sess, big).(map[string]any)["content_id"])
	// Plain copy to a new VDI.
	cp := ok(t, url, "VDI.copy", sess, vdi, sr).(string)
	assert.Equal(t, "16777216", ok(t, url, "VDI.get_virtual_size", sess, cp))
	cpData, err := os.ReadFile(mustPath(t, s, ok(t, url, "VDI.get_uuid", sess, cp).(string)))
	require.NoError(t, err)
	assert.Equal(t, src, cpData)
}

func TestRawTransferTasks(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 1)
	pool := ok(t, url, "pool.get_all", sess).([]any)[0]
	sr := ok(t, url, "pool.get_default_SR", sess, pool).(string)
	vdi := ok(t, url, "VDI.create", sess, map[string]any{"SR": sr, "virtual_size": "2097152"}).(string)
	task := ok(t, url, "task.create", sess, "upload", "").(string)
	data := bytes.Repeat([]byte{7}, 2<<20)
	req, err := http.NewRequest(http.MethodPut, url+"import_raw_vdi?format=raw&vdi="+vdi+"&task_id="+task, bytes.NewReader(data))
	require.NoError(t, err)
	req.AddCookie(&http.Cookie{Name: "session_id", Value: sess})
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, task, resp.Header.Get("task-id"))
	rec := ok(t, url, "task.get_record", sess, task).(map[string]any)
	assert.Equal(t, "success", rec["status"])
	assert.Equal(t, 1.0, rec["progress"])

	resp, err = http.Get(url + "export_raw_vdi?format=raw&vdi=" + vdi + "&session_id=" + sess)
	require.NoError(t, err)
	got, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	require.NoError(t, err)
	assert.Equal(t, data, got)
	own := resp.Header.Get("task-id")
	require.True(t, strings.HasPrefix(own, "OpaqueRef:"))
	require.Eventually(t, func() bool { return ok(t, url, "task.get_status", sess, own) == "success" }, 5*time.Second, 20*time.Millisecond)

	// A body cut short fails the task.
	task = ok(t, url, "task.create", sess, "upload", "").(string)
	req, err = http.NewRequest(http.MethodPut, url+"import_raw_vdi?format=raw&vdi="+vdi+"&task_id="+task+"&session_id="+sess, io.LimitReader(bytes.NewReader(data), 1<<20))
	require.NoError(t, err)
	req.ContentLength = int64(len(data))
	if resp, err := http.DefaultClient.Do(req); err == nil {
		_ = resp.Body.Close()
	}
	require.Eventually(t, func() bool { return ok(t, url, "task.get_status", sess, task) == "failure" }, 5*time.Second, 20*time.Millisecond)
}

// A pool member answers API calls over TCP only for its own slave-local
// sessions (anything else: HOST_IS_SLAVE with the coordinator's address);
// on its local socket it serves the pool's sessions (xapi forwards them).
func TestMemberAnswersHostIsSlave(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	hosts := s.Pools()[0].Hosts()
	require.GreaterOrEqual(t, len(hosts), 2)
	member := hosts[1]
	coord := s.Pools()[0].Coordinator()

	_, f := call(t, member.URL(), "VM.get_all", sess)
	require.NotNil(t, f, "a member refuses the pool's session over TCP")
	assert.Equal(t, ErrHostIsSlave, f.Code)
	assert.Equal(t, []string{coord.Address()}, f.Params)
	_, f = call(t, member.URL(), "session.login_with_password", "root", s.Info().Pools[0].Password)
	require.NotNil(t, f)
	assert.Equal(t, ErrHostIsSlave, f.Code)
	ok(t, url, "VM.get_all", sess)

	ls := ok(t, member.URL(), "session.slave_local_login_with_password", "root", s.Info().Pools[0].Password).(string)
	ok(t, member.URL(), "VM.get_all", ls)
	if len(hosts) > 2 {
		_, f = call(t, hosts[2].URL(), "VM.get_all", ls)
		require.NotNil(t, f, "a slave-local session is valid on its own member only")
	}

	sock := s.XapiSocketPath(member)
	if len(sock) > 107 {
		t.Skip("state dir too long for a unix socket")
	}
	c, err := xapi.NewLocal(sock, xapi.Config{})
	require.NoError(t, err)
	c.UseSession(xapi.SessionRef(sess))
	_, err = c.VMGetAll(context.Background())
	require.NoError(t, err, "the member's local socket serves the pool's session")
	c.Forget()
	_ = c.Close(context.Background())
}
