package xapisim

import (
	"context"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// startMigSim starts a simulator with a small disk and memory.
func startMigSim(t *testing.T) *Sim {
	t.Helper()
	s, err := New(Config{StateDir: t.TempDir(), DiskSize: 32 << 20, FillSize: 8 << 20, MemorySize: 16 << 20,
		Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// migEnv holds the refs a migration test needs.
type migEnv struct {
	srcURL, srcSess, dstURL, dstSess string
	vm, vmUUID, vdi, vdiUUID, vif    string
	dstHost, dstNet, dstSR           string
}

func newMigEnv(t *testing.T, s *Sim) migEnv {
	t.Helper()
	var e migEnv
	e.srcURL, e.srcSess = login(t, s, 0)
	e.dstURL, e.dstSess = login(t, s, 1)
	e.vm = demoVM(t, e.srcURL, e.srcSess)
	e.vmUUID = ok(t, e.srcURL, "VM.get_uuid", e.srcSess, e.vm).(string)
	e.vdi, e.vdiUUID = demoVDI(t, e.srcURL, e.srcSess)
	e.vif = ok(t, e.srcURL, "VM.get_VIFs", e.srcSess, e.vm).([]any)[0].(string)
	e.dstHost = ok(t, e.dstURL, "host.get_all", e.dstSess).([]any)[1].(string)
	e.dstNet = ok(t, e.dstURL, "network.get_by_name_label", e.dstSess, WANNetwork).([]any)[0].(string)
	e.dstSR = ok(t, e.dstURL, "SR.get_all", e.dstSess).([]any)[0].(string)
	return e
}

func (e migEnv) dest(t *testing.T) map[string]any {
	t.Helper()
	d := ok(t, e.dstURL, "host.migrate_receive", e.dstSess, e.dstHost, e.dstNet, map[string]any{}).(map[string]any)
	return d
}

func (e migEnv) maps() (vdiMap, vifMap map[string]any) {
	return map[string]any{e.vdi: e.dstSR}, map[string]any{e.vif: e.dstNet}
}

// waitTask waits for a task and returns its record.
func waitTask(t *testing.T, url, sess, task string) map[string]any {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		rec := ok(t, url, "task.get_record", sess, task).(map[string]any)
		if rec["status"] != "pending" {
			return rec
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("task %s did not finish", task)
	return nil
}

func TestMigrateReceive(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	d := e.dest(t)
	keys := []string{}
	for k := range d {
		keys = append(keys, k)
	}
	assert.ElementsMatch(t, []string{"SM", "host", "xenops", "session_id", "master"}, keys)
	sess := d["session_id"].(string)
	assert.NotEqual(t, e.dstSess, sess, "a new session for the migration")
	assert.Equal(t, e.dstHost, d["host"])
	var host *Host
	for _, h := range s.Pools()[1].Hosts() {
		if h.Ref == e.dstHost {
			host = h
		}
	}
	require.NotNil(t, host)
	hu, err := url.Parse(host.URL())
	require.NoError(t, err)
	for _, k := range []string{"SM", "xenops"} {
		u, err := url.Parse(d[k].(string))
		require.NoError(t, err)
		assert.Equal(t, "http", u.Scheme)
		assert.Equal(t, net.JoinHostPort(host.IP(), hu.Port()), u.Host, "PIF IP and the host's port")
		assert.Equal(t, "/services/"+k, u.Path)
		assert.Equal(t, sess, u.Query().Get("session_id"))
	}
	cu, err := url.Parse(s.Info().Pools[1].URL)
	require.NoError(t, err)
	assert.Equal(t, "http://"+cu.Host+"/", d["master"])

	// Errors.
	_, f := call(t, e.dstURL, "host.migrate_receive", e.dstSess, "OpaqueRef:nope", e.dstNet, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, []string{"host", "OpaqueRef:nope"}, f.Params)
	assert.Equal(t, ErrHandleInvalid, f.Code)
	nw := ok(t, e.dstURL, "network.create", e.dstSess, map[string]any{"name_label": "isolated"}).(string)
	_, f = call(t, e.dstURL, "host.migrate_receive", e.dstSess, e.dstHost, nw, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, "HOST_CANNOT_ATTACH_NETWORK", f.Code)
	assert.Equal(t, []string{e.dstHost, nw}, f.Params)
	p := s.Pools()[1]
	p.Lock()
	var pifRef string
	for _, o := range p.db.find("PIF", "network", e.dstNet) {
		if o.str("host") == e.dstHost {
			o.Fields["IP"] = ""
			pifRef = o.Ref
		}
	}
	p.Unlock()
	_, f = call(t, e.dstURL, "host.migrate_receive", e.dstSess, e.dstHost, e.dstNet, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, "INTERFACE_HAS_NO_IP", f.Code)
	assert.Equal(t, []string{pifRef}, f.Params)
	p.Lock()
	p.db.objs[pifRef].Fields["ip_configuration_mode"] = "None"
	p.Unlock()
	_, f = call(t, e.dstURL, "host.migrate_receive", e.dstSess, e.dstHost, e.dstNet, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, "PIF_HAS_NO_NETWORK_CONFIGURATION", f.Code)
}

func TestGuestWritesAndVerify(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	for _, pattern := range []string{PatternSequential, PatternRandom, PatternHotSet} {
		t.Run(pattern, func(t *testing.T) {
			ok(t, e.srcURL, "sim.guest_start", e.srcSess, e.vm, map[string]any{"rate": "4MiB/s", "pattern": pattern, "dirty_rate": "1MiB/s"})
			require.Eventually(t, func() bool {
				st := ok(t, e.srcURL, "sim.guest_stats", e.srcSess, e.vm).(map[string]any)
				return st["writes"] != "0" && st["pages_dirtied"] != "0"
			}, 10*time.Second, 20*time.Millisecond)
			v := ok(t, e.srcURL, "sim.guest_verify", e.srcSess, e.vm).(map[string]any)
			assert.Equal(t, "true", v["ok"])
			assert.Equal(t, "1", v["disks"])
			// Paused: no writes.
			ok(t, e.srcURL, "VM.pause", e.srcSess, e.vm)
			time.Sleep(50 * time.Millisecond)
			st1, _ := s.GuestStats(e.vmUUID)
			time.Sleep(100 * time.Millisecond)
			st2, _ := s.GuestStats(e.vmUUID)
			assert.Equal(t, st1.Writes, st2.Writes, "no writes while paused")
			ok(t, e.srcURL, "VM.unpause", e.srcSess, e.vm)
			ok(t, e.srcURL, "sim.guest_stop", e.srcSess, e.vm)
		})
	}
	// A write behind the guest's back is caught.
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{}))
	require.NoError(t, s.WriteVDI(e.vdiUUID, 12345, []byte("not the guest")))
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.False(t, v.OK)
	assert.Equal(t, int64(12345), v.MismatchOffset)
	assert.Equal(t, "0", v.Disk)
	require.NoError(t, s.StopGuest(e.vmUUID))
}

func TestMigrateSendGo(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{Rate: 2 << 20, Pattern: PatternRandom, DirtyRate: 1 << 20}))
	vdiMap, vifMap := e.maps()
	task := ok(t, e.srcURL, "Async.VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{"force": "true"}).(string)
	rec := waitTask(t, e.srcURL, e.srcSess, task)
	require.Equal(t, "success", rec["status"], "%v", rec["error_info"])
	destVM := strings.TrimSuffix(strings.TrimPrefix(rec["result"].(string), "<value>"), "</value>")
	assert.Equal(t, Running, ok(t, e.dstURL, "VM.get_power_state", e.dstSess, destVM))
	assert.Equal(t, e.dstHost, ok(t, e.dstURL, "VM.get_resident_on", e.dstSess, destVM))
	_, f := call(t, e.srcURL, "VM.get_record", e.srcSess, e.vm)
	require.NotNil(t, f, "the VM is gone from the source")
	_, f = call(t, e.srcURL, "VDI.get_record", e.srcSess, e.vdi)
	require.NotNil(t, f, "the source disk is gone")
	// The guest keeps writing at the destination, and nothing was lost.
	st0, err := s.GuestStats(e.vmUUID)
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		st, _ := s.GuestStats(e.vmUUID)
		return st.Writes > st0.Writes
	}, 10*time.Second, 20*time.Millisecond)
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK, "mismatch at %d", v.MismatchOffset)
	mr, found := s.LastMigration(e.vmUUID)
	require.True(t, found)
	assert.Equal(t, "success", mr.Result)
	assert.True(t, mr.MemoryVerified)
	assert.False(t, mr.Incremental)
	assert.GreaterOrEqual(t, mr.MemoryBytes, int64(16<<20))
	assert.GreaterOrEqual(t, mr.XenopsBytes, mr.MemoryBytes)
	assert.GreaterOrEqual(t, mr.SMBytes, int64(8<<20), "the allocated data")
	assert.Less(t, mr.SMBytes, int64(32<<20), "holes are skipped")
	oc := ok(t, e.dstURL, "VM.get_other_config", e.dstSess, destVM).(map[string]any)
	assert.Equal(t, itoa(mr.PauseMS), oc["sim:migration_pause_ms"])
	sm, xo := s.EndpointBytes()
	assert.GreaterOrEqual(t, sm, mr.SMBytes)
	assert.GreaterOrEqual(t, xo, mr.XenopsBytes)
}

// tcpProxy forwards connections to target and counts the bytes clients send.
type tcpProxy struct {
	ln      net.Listener
	target  string
	up      atomic.Int64
	delay   time.Duration // per chunk forwarded towards the target
	wg      sync.WaitGroup
	mu      sync.Mutex
	conns   []net.Conn
	stopped bool
}

func newTCPProxy(t *testing.T, target string) *tcpProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &tcpProxy{ln: ln, target: target}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", target)
			if err != nil {
				_ = c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, u)
			p.mu.Unlock()
			p.wg.Add(2)
			go func() {
				defer p.wg.Done()
				buf := make([]byte, 32<<10)
				for {
					n, err := c.Read(buf)
					if n > 0 {
						if p.delay > 0 {
							time.Sleep(p.delay)
						}
						if _, werr := u.Write(buf[:n]); werr != nil {
							break
						}
						p.up.Add(int64(n))
					}
					if err != nil {
						break
					}
				}
				_ = u.Close()
			}()
			go func() {
				defer p.wg.Done()
				_, _ = io.Copy(c, u)
				_ = c.Close()
			}()
		}
	}()
	t.Cleanup(p.close)
	return p
}

func (p *tcpProxy) close() {
	_ = p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		_ = c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

func (p *tcpProxy) addr() string { return p.ln.Addr().String() }

// addVM creates a running VM with a small disk and a VIF in pool p (for
// tests that need several VMs).
func addVM(t *testing.T, p *Pool, name string, diskSize int64) (ref, uuid string) {
	t.Helper()
	p.Lock()
	defer p.Unlock()
	sr := p.db.all("SR")[0]
	nw := p.db.find("network", "name_label", WANNetwork)[0]
	vm := p.db.create("VM", map[string]any{"name_label": name, "memory_static_max": int64(4 << 20),
		"memory_dynamic_max": int64(4 << 20), "VCPUs_max": int64(1)})
	vdi, err := p.CreateVDI(sr.Ref, diskSize, map[string]any{"name_label": name + " disk"})
	require.NoError(t, err)
	p.db.create("VBD", map[string]any{"VM": vm.Ref, "VDI": vdi, "userdevice": "0", "mode": "RW", "type": "Disk"})
	p.db.create("VIF", map[string]any{"VM": vm.Ref, "network": nw.Ref, "device": "0", "MAC": randomMAC(), "MTU": int64(1500)})
	p.setPowerState(vm, Running, p.Coordinator().Ref)
	return vm.Ref, vm.str("uuid")
}

// writeHook installs an executable hook script on host.
func writeHook(t *testing.T, s *Sim, host, hook, script string) string {
	t.Helper()
	dir := s.HookDir(host, hook)
	require.NotEmpty(t, dir)
	require.NoError(t, os.MkdirAll(dir, 0o755))
	path := filepath.Join(dir, "10test")
	require.NoError(t, os.WriteFile(path, []byte("#!/bin/sh\n"+script+"\n"), 0o755))
	t.Cleanup(func() { _ = os.Remove(path) })
	return path
}

func vmMaps(t *testing.T, url, sess, vm, sr, nw string) (vdiMap, vifMap map[string]any) {
	t.Helper()
	vdiMap, vifMap = map[string]any{}, map[string]any{}
	for _, vbd := range ok(t, url, "VM.get_VBDs", sess, vm).([]any) {
		vdiMap[ok(t, url, "VBD.get_VDI", sess, vbd).(string)] = sr
	}
	for _, vif := range ok(t, url, "VM.get_VIFs", sess, vm).([]any) {
		vifMap[vif.(string)] = nw
	}
	return vdiMap, vifMap
}

func TestTooManyStorageMigrates(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	src := s.Pools()[0]
	// A pre-migrate hook that waits for a file keeps three migrations in flight.
	release := filepath.Join(t.TempDir(), "go")
	writeHook(t, s, src.Coordinator().Ref, HookVMPreMigrate, "while [ ! -e "+release+" ]; do sleep 0.05; done")
	var tasks []string
	var firstVM string
	for i := 0; i < MaxStorageMigrates; i++ {
		ref, _ := addVM(t, src, "vm"+strconv.Itoa(i), 1<<20)
		if i == 0 {
			firstVM = ref
		}
		vdiMap, vifMap := vmMaps(t, e.srcURL, e.srcSess, ref, e.dstSR, e.dstNet)
		tasks = append(tasks, ok(t, e.srcURL, "Async.VM.migrate_send", e.srcSess, ref, e.dest(t), true, vdiMap, vifMap, map[string]any{}).(string))
	}
	require.Eventually(t, func() bool {
		ext := s.ext()
		ext.mu.Lock()
		defer ext.mu.Unlock()
		return ext.active[src] == MaxStorageMigrates
	}, 10*time.Second, 10*time.Millisecond)
	ops := ok(t, e.srcURL, "VM.get_current_operations", e.srcSess, firstVM).(map[string]any)
	assert.Equal(t, map[string]any{tasks[0]: "migrate_send"}, ops, "the migration shows in current_operations")
	vdiMap, vifMap := e.maps()
	_, f := call(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, []string{"3"}, f.Params)
	assert.Equal(t, "TOO_MANY_STORAGE_MIGRATES", f.Code)
	require.NoError(t, os.WriteFile(release, nil, 0o644))
	for _, task := range tasks {
		rec := waitTask(t, e.srcURL, e.srcSess, task)
		assert.Equal(t, "success", rec["status"], "%v", rec["error_info"])
	}
	assert.Len(t, ok(t, e.dstURL, "VM.get_by_name_label", e.dstSess, "vm1").([]any), 1)
}

func TestMigrateHooksAndCancel(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{Rate: 1 << 20}))
	srcHost := s.Pools()[0].Coordinator().Ref
	vdiMap, vifMap := e.maps()

	// A failing vm-pre-migrate hook aborts before memory is sent.
	log := filepath.Join(t.TempDir(), "args")
	path := writeHook(t, s, srcHost, HookVMPreMigrate, `echo "$@" > `+log+`; echo no; exit 3`)
	_, f := call(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, ErrHookFailed, f.Code)
	args, err := os.ReadFile(log)
	require.NoError(t, err)
	assert.Regexp(t, `^-vmuuid `+e.vmUUID+` -reason source -vmdomid \d+`, string(args))
	mr, _ := s.LastMigration(e.vmUUID)
	assert.Zero(t, mr.MemoryBytes, "no memory sent")
	assert.Equal(t, Running, ok(t, e.srcURL, "VM.get_power_state", e.srcSess, e.vm))
	assert.Empty(t, ok(t, e.dstURL, "VM.get_by_name_label", e.dstSess, DemoVMName))

	// Cancel while the (slow) hook runs: TASK_CANCELLED, VM intact at the source.
	require.NoError(t, os.WriteFile(path, []byte("#!/bin/sh\nsleep 0.5\n"), 0o755))
	task := ok(t, e.srcURL, "Async.VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{}).(string)
	time.Sleep(100 * time.Millisecond)
	ok(t, e.srcURL, "task.cancel", e.srcSess, task)
	rec := waitTask(t, e.srcURL, e.srcSess, task)
	assert.Equal(t, "cancelled", rec["status"])
	assert.Equal(t, []any{ErrTaskCancelled, task}, rec["error_info"])
	assert.Equal(t, Running, ok(t, e.srcURL, "VM.get_power_state", e.srcSess, e.vm))
	assert.Empty(t, ok(t, e.dstURL, "VM.get_by_name_label", e.dstSess, DemoVMName))
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK)

	// The destination's vm-post-migrate hook runs after the VM runs there.
	require.NoError(t, os.Remove(path))
	post := filepath.Join(t.TempDir(), "post")
	writeHook(t, s, e.dstHost, HookVMPostMigrate, `echo "$@" > `+post)
	ok(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{})
	args, err = os.ReadFile(post)
	require.NoError(t, err)
	assert.Regexp(t, `^-vmuuid `+e.vmUUID+` -reason destination -vmdomid \d+`, string(args))
}

func TestMigrateThroughProxy(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{Rate: 4 << 20, Pattern: PatternHotSet}))
	d := e.dest(t)
	u, err := url.Parse(d["SM"].(string))
	require.NoError(t, err)
	px := newTCPProxy(t, u.Host)
	for _, k := range []string{"SM", "xenops"} {
		d[k] = strings.Replace(d[k].(string), u.Host, px.addr(), 1)
	}
	smBefore, _ := s.EndpointBytes()
	vdiMap, vifMap := e.maps()
	ok(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, d, true, vdiMap, vifMap, map[string]any{})
	mr, found := s.LastMigration(e.vmUUID)
	require.True(t, found)
	smAfter, _ := s.EndpointBytes()
	assert.Greater(t, px.up.Load(), mr.DiskBytes+mr.MemoryBytes, "all the data crossed the proxy")
	assert.Equal(t, smAfter-smBefore, mr.SMBytes)
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK)
}

func TestMirrorCarriesWritesDuringCopy(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{Rate: 2 << 20, BlockSize: 16 << 10, Pattern: PatternSequential}))
	d := e.dest(t)
	u, err := url.Parse(d["SM"].(string))
	require.NoError(t, err)
	px := newTCPProxy(t, u.Host)
	px.delay = time.Millisecond // a slower link keeps the copy open longer
	d["SM"] = strings.Replace(d["SM"].(string), u.Host, px.addr(), 1)
	vdiMap, vifMap := e.maps()
	ok(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, d, true, vdiMap, vifMap, map[string]any{})
	mr, _ := s.LastMigration(e.vmUUID)
	assert.Positive(t, mr.MirrorBytes, "guest writes during the copy went to the destination synchronously")
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK, "mismatch at %d", v.MismatchOffset)
}

func TestPoolMigrateAndSuspendResume(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{Rate: 1 << 20, DirtyRate: 4 << 20}))
	member := s.Pools()[0].Hosts()[1].Ref
	_, f := call(t, e.srcURL, "VM.pool_migrate", e.srcSess, e.vm, "OpaqueRef:x", map[string]any{})
	require.NotNil(t, f)
	assert.Equal(t, []string{"host", "OpaqueRef:x"}, f.Params)
	task := ok(t, e.srcURL, "Async.VM.pool_migrate", e.srcSess, e.vm, member, map[string]any{"live": "true"}).(string)
	rec := waitTask(t, e.srcURL, e.srcSess, task)
	require.Equal(t, "success", rec["status"], "%v", rec["error_info"])
	assert.Equal(t, member, ok(t, e.srcURL, "VM.get_resident_on", e.srcSess, e.vm))
	mr, _ := s.LastMigration(e.vmUUID)
	assert.Equal(t, "pool_migrate", mr.Kind)
	assert.True(t, mr.MemoryVerified)
	assert.GreaterOrEqual(t, mr.XenopsBytes, int64(16<<20))
	oc := ok(t, e.srcURL, "VM.get_other_config", e.srcSess, e.vm).(map[string]any)
	assert.Equal(t, itoa(mr.PauseMS), oc["sim:migration_pause_ms"])

	ok(t, e.srcURL, "VM.suspend", e.srcSess, e.vm)
	assert.Equal(t, Suspended, ok(t, e.srcURL, "VM.get_power_state", e.srcSess, e.vm))
	svdi := ok(t, e.srcURL, "VM.get_suspend_VDI", e.srcSess, e.vm).(string)
	assert.Equal(t, "suspend", ok(t, e.srcURL, "VDI.get_type", e.srcSess, svdi))
	mr, _ = s.LastMigration(e.vmUUID)
	assert.Equal(t, "suspend", mr.Kind)
	assert.Positive(t, mr.MemoryBytes)
	st1, _ := s.GuestStats(e.vmUUID)
	time.Sleep(100 * time.Millisecond)
	st2, _ := s.GuestStats(e.vmUUID)
	assert.Equal(t, st1.Writes, st2.Writes, "no writes while suspended")
	_, f = call(t, e.srcURL, "VM.suspend", e.srcSess, e.vm)
	require.NotNil(t, f)
	assert.Equal(t, ErrVMBadPowerState, f.Code)
	ok(t, e.srcURL, "VM.resume", e.srcSess, e.vm, false, false)
	assert.Equal(t, Running, ok(t, e.srcURL, "VM.get_power_state", e.srcSess, e.vm))
	mr, _ = s.LastMigration(e.vmUUID)
	assert.Equal(t, "resume", mr.Kind)
	assert.True(t, mr.MemoryVerified, "the memory image read back is the guest's")
	_, f = call(t, e.srcURL, "VDI.get_record", e.srcSess, svdi)
	require.NotNil(t, f, "suspend VDI destroyed")
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK)
}

func TestGuestOptions(t *testing.T) {
	for _, tc := range []struct {
		in   map[string]string
		want GuestConfig
		err  bool
	}{
		{map[string]string{"rate": "2MiB/s", "pattern": "random", "dirty_rate": "512KiB"}, GuestConfig{Rate: 2 << 20, Pattern: "random", DirtyRate: 512 << 10}, false},
		{map[string]string{"block_size": "4096", "seed": "7", "hot_set": "1M"}, GuestConfig{BlockSize: 4096, Seed: 7, HotSet: 1 << 20}, false},
		{map[string]string{"rate": "fast"}, GuestConfig{}, true},
		{map[string]string{"colour": "red"}, GuestConfig{}, true},
		{map[string]string{"pattern": "zigzag"}, GuestConfig{}, true},
		{map[string]string{"pattern": "HotSet"}, GuestConfig{Pattern: PatternHotSet}, false},
	} {
		got, err := GuestConfigFromMap(tc.in)
		if tc.err {
			assert.Error(t, err, "%v", tc.in)
			continue
		}
		require.NoError(t, err)
		assert.Equal(t, tc.want, got)
	}
	for v, want := range map[string]bool{"true": true, "ON": true, "1": true, "False": false, "off": false, "0": false} {
		got, valid := parseBoolOption(v)
		assert.True(t, valid, v)
		assert.Equal(t, want, got, v)
	}
	_, valid := parseBoolOption("yes")
	assert.False(t, valid)
}

func TestMigrateHaltedVMAndCopy(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	ref, uuid := addVM(t, s.Pools()[0], "cold", 2<<20)
	require.NoError(t, s.WriteVDI(func() string {
		_, _, _, disks, err := s.locateVM(uuid)
		require.NoError(t, err)
		return disks[0].vdi
	}(), 4096, []byte("cold data")))
	ok(t, e.srcURL, "VM.hard_shutdown", e.srcSess, ref)
	vdiMap, vifMap := vmMaps(t, e.srcURL, e.srcSess, ref, e.dstSR, e.dstNet)

	// copy=true: the source stays, the destination gets a halted copy.
	cp := ok(t, e.srcURL, "VM.migrate_send", e.srcSess, ref, e.dest(t), false, vdiMap, vifMap, map[string]any{"copy": "true"}).(string)
	assert.Equal(t, Halted, ok(t, e.dstURL, "VM.get_power_state", e.dstSess, cp))
	assert.NotEqual(t, uuid, ok(t, e.dstURL, "VM.get_uuid", e.dstSess, cp), "a copy has its own uuid")
	assert.Equal(t, Halted, ok(t, e.srcURL, "VM.get_power_state", e.srcSess, ref), "source kept")

	dst := ok(t, e.srcURL, "VM.migrate_send", e.srcSess, ref, e.dest(t), false, vdiMap, vifMap, map[string]any{}).(string)
	assert.Equal(t, Halted, ok(t, e.dstURL, "VM.get_power_state", e.dstSess, dst))
	mr, _ := s.LastMigration(uuid)
	assert.Zero(t, mr.MemoryBytes, "a halted VM has no memory to send")
	assert.Zero(t, mr.PauseMS)
	_, f := call(t, e.srcURL, "VM.get_record", e.srcSess, ref)
	require.NotNil(t, f)
	vbd := ok(t, e.dstURL, "VM.get_VBDs", e.dstSess, dst).([]any)[0]
	vdi := ok(t, e.dstURL, "VBD.get_VDI", e.dstSess, vbd).(string)
	path, err := s.VDIPath(ok(t, e.dstURL, "VDI.get_uuid", e.dstSess, vdi).(string))
	require.NoError(t, err)
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "cold data", string(b[4096:4096+9]))
}

func TestMigrateFaultsRollBack(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	require.NoError(t, s.StartGuest(e.vmUUID, GuestConfig{Rate: 2 << 20, DirtyRate: 1 << 20}))
	require.Error(t, s.InjectFault("nowhere"))
	vdiMap, vifMap := e.maps()
	for _, point := range FaultPoints {
		t.Run(point, func(t *testing.T) {
			dstVDIs := len(ok(t, e.dstURL, "VDI.get_all", e.dstSess).([]any))
			require.NoError(t, s.InjectFault(point))
			if point == "mirror" {
				// The mirror fails on the next guest write during the copy: a
				// slow link keeps the copy open long enough.
				d := e.dest(t)
				u, err := url.Parse(d["SM"].(string))
				require.NoError(t, err)
				px := newTCPProxy(t, u.Host)
				px.delay = 5 * time.Millisecond
				d["SM"] = strings.Replace(d["SM"].(string), u.Host, px.addr(), 1)
				_, f := call(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, d, true, vdiMap, vifMap, map[string]any{})
				require.NotNil(t, f)
				assert.Equal(t, "VM_MIGRATE_FAILED", f.Code)
			} else {
				task := ok(t, e.srcURL, "Async.VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{}).(string)
				rec := waitTask(t, e.srcURL, e.srcSess, task)
				assert.Equal(t, "failure", rec["status"])
				info := rec["error_info"].([]any)
				require.Len(t, info, 5)
				assert.Equal(t, []any{"VM_MIGRATE_FAILED", e.vm}, info[:2])
				assert.Contains(t, info[4], "injected")
			}
			assert.Equal(t, Running, ok(t, e.srcURL, "VM.get_power_state", e.srcSess, e.vm))
			assert.Empty(t, ok(t, e.srcURL, "VM.get_current_operations", e.srcSess, e.vm))
			assert.Empty(t, ok(t, e.dstURL, "VM.get_by_name_label", e.dstSess, DemoVMName), "no leftover destination VM")
			assert.Len(t, ok(t, e.dstURL, "VDI.get_all", e.dstSess).([]any), dstVDIs, "no leftover destination VDI")
			// The guest goes on at the source, nothing lost.
			st0, _ := s.GuestStats(e.vmUUID)
			require.Eventually(t, func() bool {
				st, _ := s.GuestStats(e.vmUUID)
				return st.Writes > st0.Writes
			}, 10*time.Second, 10*time.Millisecond)
			v, err := s.VerifyGuest(e.vmUUID)
			require.NoError(t, err)
			assert.True(t, v.OK, "mismatch at %d", v.MismatchOffset)
			mr, _ := s.LastMigration(e.vmUUID)
			assert.Equal(t, "failure", mr.Result)
		})
	}
	// The answer to "the VM runs at the destination" is lost: the source
	// asks, learns it does, and goes forward (the VM is in one place).
	require.NoError(t, s.InjectFault(FaultFinishAnswer))
	dst := ok(t, e.srcURL, "VM.migrate_send", e.srcSess, e.vm, e.dest(t), true, vdiMap, vifMap, map[string]any{}).(string)
	assert.Equal(t, Running, ok(t, e.dstURL, "VM.get_power_state", e.dstSess, dst))
	_, f := call(t, e.srcURL, "VM.get_record", e.srcSess, e.vm)
	require.NotNil(t, f, "the VM left the source")
	v, err := s.VerifyGuest(e.vmUUID)
	require.NoError(t, err)
	assert.True(t, v.OK)
}

// A VM busy with another operation refuses migrate_send with xapi's
// OTHER_OPERATION_IN_PROGRESS [class, object, operation, operation ref].
func TestBusyVMNamesTheOtherOperation(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	p := s.Pools()[0]
	p.mu.Lock()
	o, err := p.db.get("VM", vm)
	require.NoError(t, err)
	o.strMap("current_operations")["OpaqueRef:other"] = "clean_shutdown"
	p.mu.Unlock()
	pl := &migPlan{c: &Call{Pool: p}, vmRef: vm}
	_, err = pl.beginOperation()
	var f *Fault
	require.ErrorAs(t, err, &f)
	assert.Equal(t, "OTHER_OPERATION_IN_PROGRESS", f.Code)
	assert.Equal(t, []string{"VM", vm, "clean_shutdown", "OpaqueRef:other"}, f.Params)
}
