package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/agent/agentclient"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// buildWanmotion builds this command into a fresh directory (the host
// plugin, hooks and controllers run the real binary) and writes a
// wanmotion.conf next to it.
func buildWanmotion(t *testing.T, conf string) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "wanmotion")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, gobin, "build", "-buildvcs=false", "-ldflags", "-X main.version=9.9.9-test", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	if conf != "" {
		require.NoError(t, os.WriteFile(filepath.Join(dir, hostplugin.ConfigFileName), []byte(conf), 0o644))
	}
	return bin
}

// pluginEnv is the simulator with the built binary installed as the
// wanmotion host plugin on every host.
type pluginEnv struct {
	sim       *xapisim.Sim
	info      xapisim.Info
	bin       string
	stateDir  string
	pluginDir string
	conf      string // the plugin's wanmotion.conf
	src       *xapi.Client
	coord     xapi.HostRef
}

// setConf rewrites the plugin's wanmotion.conf with extra appended (read
// by the next plugin call and the controllers it starts).
func (e pluginEnv) setConf(t *testing.T, extra string) {
	t.Helper()
	require.NoError(t, os.WriteFile(filepath.Join(filepath.Dir(e.bin), hostplugin.ConfigFileName), []byte(e.conf+extra), 0o644))
}

func newPluginEnv(t *testing.T) pluginEnv {
	t.Helper()
	return newPluginEnvWith(t, fakeBackends(t, "storage-nbd", "network-l2tunnel"), "")
}

// newPluginEnvWith: backends from pluginDir; extraConf is appended to the
// plugin's wanmotion.conf.
func newPluginEnvWith(t *testing.T, pluginDir, extraConf string) pluginEnv {
	t.Helper()
	e := pluginEnv{stateDir: t.TempDir(), pluginDir: pluginDir}
	// task_linger never: tests read the finished task, then see the
	// controller exit (TestHostPluginMigrateStatusCancel sets a linger)
	e.conf = fmt.Sprintf("state_dir = %s\nplugin_dir = %s\nlog_level = debug\nagent_listen = 127.0.0.1:0\ntask_linger = never\n%s", e.stateDir, e.pluginDir, extraConf)
	e.bin = buildWanmotion(t, e.conf)
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 2, DiskSize: 16 << 20, FillSize: 4 << 20,
		MemorySize: 8 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.InstallPlugin(hostplugin.PluginName, e.bin))
	e.sim, e.info = s, s.Info()
	pi := e.info.Pools[0]
	c, err := xapi.New(xapi.Config{URL: pi.URL, Username: pi.Username, Password: pi.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	ctx := context.Background()
	require.NoError(t, c.Login(ctx))
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	pools, err := c.PoolGetAll(ctx)
	require.NoError(t, err)
	e.coord, err = c.PoolGetMaster(ctx, pools[0])
	require.NoError(t, err)
	e.src = c
	t.Cleanup(func() { stopLeftoverAgents(t, e.stateDir) })
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(e.stateDir, "plugin", "*.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
		}
	})
	return e
}

// stopLeftoverAgents ends site agents the test's controllers started and
// left running (a controller killed by a test leaves its agents to their
// idle timeout).
func stopLeftoverAgents(t *testing.T, stateDir string) {
	pids, _ := filepath.Glob(filepath.Join(stateDir, "*", "agents-run", "*", "agent.pid"))
	more, _ := filepath.Glob(filepath.Join(stateDir, "agents", "*", "agent.pid"))
	for _, f := range append(pids, more...) {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		var pid int
		if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 0 {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(cmdline), stateDir) {
			continue // gone, or not ours
		}
		if p, err := os.FindProcess(pid); err == nil {
			_ = p.Kill()
			t.Logf("stopped leftover agent %d (%s)", pid, filepath.Base(filepath.Dir(f)))
		}
	}
}

func (e pluginEnv) call(t *testing.T, fn string, args map[string]string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return e.src.HostCallPlugin(ctx, e.coord, hostplugin.PluginName, fn, args)
}

func requireAPIError(t *testing.T, err error, code string) *xapi.APIError {
	t.Helper()
	require.Error(t, err)
	ae, ok := xapi.AsAPIError(err)
	require.True(t, ok, "not an API error: %v", err)
	require.Equal(t, code, ae.Code, "error: %v", err)
	return ae
}

func TestHostPluginVersionAndConfig(t *testing.T) {
	e := newPluginEnv(t)

	out, err := e.call(t, fnVersion, map[string]string{})
	require.NoError(t, err)
	var v pluginVersion
	require.NoError(t, json.Unmarshal([]byte(out), &v))
	assert.Equal(t, "9.9.9-test", v.Version)
	assert.True(t, v.Simulator, "the plugin found the simulator's inventory through argv[0]")
	assert.Equal(t, e.stateDir, v.StateDir, "config read from next to the binary")
	assert.NotEmpty(t, v.HostUUID)
	require.NotNil(t, v.Backends, "backends_error: %s", v.BackendsError)
	assert.Equal(t, []string{"nbd"}, v.Backends.Storage)
	assert.Equal(t, []string{"l2tunnel"}, v.Backends.Network)

	// pool configure checks the names on the pool's hosts too: a backend
	// the CLI machine lacks but the hosts have is a warning, one installed
	// nowhere an error.
	pi := e.info.Pools[0]
	t.Setenv(EnvPassword, pi.Password)
	empty := t.TempDir()
	_, stderr, err := run(t, runPool, "configure", "--url", pi.URL, "--user", pi.Username, "--plugin-dir", empty, "--storage", "nbd", "--network", "l2tunnel")
	require.NoError(t, err)
	assert.Contains(t, stderr, `warning: on this machine: unknown backend: storage backend "nbd" is not installed`)
	assert.Contains(t, stderr, "migrations started with this CLI from here need it in --plugin-dir")
	assert.NotContains(t, stderr, "missing on host")
	_, _, err = run(t, runPool, "configure", "--url", pi.URL, "--user", pi.Username, "--plugin-dir", empty, "--storage", "drbd")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "not installed on the pool's hosts either")
	_, stderr, err = run(t, runPool, "configure", "--url", pi.URL, "--user", pi.Username, "--plugin-dir", e.pluginDir, "--storage=", "--network=")
	require.NoError(t, err)
	assert.Empty(t, stderr, "removing the keys checks nothing")

	out, err = e.call(t, fnConfigGet, map[string]string{})
	require.NoError(t, err)
	var before poolView
	require.NoError(t, json.Unmarshal([]byte(out), &before))
	assert.Equal(t, "", before.Storage)

	out, err = e.call(t, fnConfigSet, map[string]string{"storage": "nbd", "network": "none", "config": `{"streams":4,"bandwidth":"100Mbit"}`})
	require.NoError(t, err)
	var after poolView
	require.NoError(t, json.Unmarshal([]byte(out), &after))
	assert.Equal(t, "nbd", after.Storage)
	assert.Equal(t, "none", after.Network)
	o, err := engine.ParseConfigJSON(string(after.Config))
	require.NoError(t, err, "stored config parses: %s", after.Config)
	require.NotNil(t, o.Streams)
	require.NotNil(t, o.BandwidthBytesPerSec)
	assert.Equal(t, 4, *o.Streams)
	assert.Equal(t, int64(12_500_000), *o.BandwidthBytesPerSec)

	ctx := context.Background()
	pools, err := e.src.PoolGetAll(ctx)
	require.NoError(t, err)
	oc, err := e.src.PoolGetOtherConfig(ctx, pools[0])
	require.NoError(t, err)
	assert.Equal(t, "nbd", oc["wanmotion:storage"], "written to pool.other_config")

	out, err = e.call(t, fnConfigSet, map[string]string{"network": "", "config": `{"streams":8}`})
	require.NoError(t, err, "second write replaces (remove-then-add)")
	require.NoError(t, json.Unmarshal([]byte(out), &after))
	assert.Equal(t, "nbd", after.Storage)
	assert.Equal(t, "", after.Network, "empty removes")
	assert.JSONEq(t, `{"streams":8}`, string(after.Config))

	for _, tc := range []struct {
		name string
		fn   string
		args map[string]string
		code string
	}{
		{"unknown backend", fnConfigSet, map[string]string{"storage": "drbd"}, hostplugin.CodeBackendNotFound},
		{"bad config json", fnConfigSet, map[string]string{"config": `{"streams":`}, hostplugin.CodeInvalidArgument},
		{"bad config field", fnConfigSet, map[string]string{"config": `{"colour":"blue"}`}, hostplugin.CodeInvalidArgument},
		{"nothing to set", fnConfigSet, map[string]string{}, hostplugin.CodeInvalidArgument},
		{"unknown arg", fnVersion, map[string]string{"x": "1"}, hostplugin.CodeInvalidArgument},
		{"unknown function", "reboot-everything", map[string]string{}, hostplugin.CodeUnknownFunction},
		{"status of nothing", fnStatus, map[string]string{}, hostplugin.CodeInvalidArgument},
		{"status unknown id", fnStatus, map[string]string{"id": "nope"}, hostplugin.CodeNotFound},
		{"status bad task", fnStatus, map[string]string{"task": "OpaqueRef:00000000-0000-0000-0000-000000000000"}, hostplugin.CodeNotFound},
		{"agent-start no tls", hostplugin.FnAgentStart, map[string]string{"migration_id": "m1", "role": "source"}, hostplugin.CodeInvalidArgument},
		{"agent-stop bad role", hostplugin.FnAgentStop, map[string]string{"migration_id": "m1", "role": "both"}, hostplugin.CodeInvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.call(t, tc.fn, tc.args)
			ae := requireAPIError(t, err, tc.code)
			require.NotEmpty(t, ae.Params, "the message is the first param")
		})
	}

	out, err = e.call(t, hostplugin.FnAgentStop, map[string]string{"migration_id": "m1", "role": "source"})
	require.NoError(t, err, "stopping an agent that does not run is fine")
	assert.Contains(t, out, `"stopped":true`)
}

func (e pluginEnv) migrateArgs() map[string]string {
	pb := e.info.Pools[1]
	return map[string]string{"vm": "demo-vm", "dest_url": pb.URL, "dest_user": pb.Username, "dest_password": pb.Password,
		"storage": "nbd", "network": "none", "bandwidth": "200Mbit"}
}

// TestHostPluginMigrateStatusCancel: migrate returns the task at once (the
// controller is detached), the task is what XenCenter shows, status and
// cancel work on it, and the task ends (success if this build moves VMs,
// else a clear failure, or cancelled).
func TestHostPluginMigrateStatusCancel(t *testing.T) {
	e := newPluginEnv(t)
	ctx := context.Background()

	task, err := e.call(t, fnMigrate, e.migrateArgs())
	require.NoError(t, err)
	require.True(t, strings.HasPrefix(task, "OpaqueRef:"), "a task ref: %q", task)

	rec, err := e.src.TaskGetRecord(ctx, xapi.TaskRef(task))
	require.NoError(t, err)
	assert.Equal(t, "VM.migrate_send", rec.NameLabel, "XenCenter shows VM.migrate_send tasks")
	vms, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	require.Len(t, vms, 1)
	assert.Contains(t, rec.OtherConfig["applies_to"], string(vms[0]))
	assert.Equal(t, engine.TaskOwnerController, rec.OtherConfig[engine.TaskOwnerKey], "marked as the controller's task")
	id, ok := strings.CutPrefix(rec.NameDescription, "wanmotion WAN migration ")
	require.True(t, ok, "description names the migration: %q", rec.NameDescription)

	out, err := e.call(t, fnStatus, map[string]string{"task": task})
	require.NoError(t, err)
	var st pluginStatus
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, task, st.Task)
	assert.Equal(t, id, st.MigrationID)
	assert.NotEmpty(t, st.VMUUID)
	assert.Equal(t, e.info.Pools[1].URL, st.DestURL)
	assert.FileExists(t, st.Log)

	out, err = e.call(t, fnStatus, map[string]string{"id": id})
	require.NoError(t, err, "status by migration id")
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, task, st.Task)

	out, err = e.call(t, fnCancel, map[string]string{"task": task})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.True(t, st.CancelRequested || st.Status != "pending", "cancel requested or already finished: %s", out)

	deadline := time.Now().Add(90 * time.Second)
	for {
		rec, err = e.src.TaskGetRecord(ctx, xapi.TaskRef(task))
		require.NoError(t, err)
		if rec.Status != xapi.TaskStatusPending || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	switch rec.Status {
	case xapi.TaskStatusCancelled:
		assert.NotEmpty(t, rec.ErrorInfo)
	case xapi.TaskStatusFailure:
		require.NotEmpty(t, rec.ErrorInfo)
		assert.NotEmpty(t, rec.ErrorInfo[len(rec.ErrorInfo)-1], "a message says why")
	case xapi.TaskStatusSuccess:
	default:
		t.Fatalf("task still %s after 90s", rec.Status)
	}
	t.Logf("task ended %s, error_info %q", rec.Status, rec.ErrorInfo)
	// xapi's task.set_status leaves finished at the epoch (Xapi_task), so
	// XenCenter (finished.Year > 1970) sees the task complete only once it
	// is destroyed; the simulator behaves the same.
	assert.Equal(t, 1970, rec.Finished.Year(), "a client-finished task keeps finished at the epoch")
	out, err = e.call(t, fnCancel, map[string]string{"id": id})
	require.NoError(t, err, "cancel of a finished migration reports it")
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, string(rec.Status), st.Status)

	// Left alone, the controller finishes the task itself, keeps it for
	// task_linger (clients read the outcome), then destroys it: XenCenter
	// sees a task complete only once finished is set or it is gone.
	e.setConf(t, "task_linger = 6s\n")
	args := e.migrateArgs()
	args["id"] = "plugin-alone"
	task, err = e.call(t, fnMigrate, args)
	require.NoError(t, err)
	rec = waitTaskEnd(t, e.src, task)
	out, err = e.call(t, fnStatus, map[string]string{"id": "plugin-alone"})
	require.NoError(t, err)
	var lingering pluginStatus
	require.NoError(t, json.Unmarshal([]byte(out), &lingering))
	assert.False(t, lingering.TaskGone, "the task lingers: %s", out)
	assert.Equal(t, string(rec.Status), lingering.Status)
	assert.Equal(t, rec.ErrorInfo, lingering.ErrorInfo)
	t.Logf("uncancelled task ended %s, error_info %q", rec.Status, rec.ErrorInfo)
	switch rec.Status {
	case xapi.TaskStatusFailure:
		require.GreaterOrEqual(t, len(rec.ErrorInfo), 2, "code and message")
		assert.NotEmpty(t, rec.ErrorInfo[1])
	case xapi.TaskStatusSuccess:
		assert.NotEmpty(t, rec.Result)
	default:
		t.Fatalf("task %s", rec.Status)
	}
	_, err = e.call(t, fnMigrate, args)
	requireAPIError(t, err, hostplugin.CodeInvalidArgument) // the id is taken

	// After the linger the controller destroys the task and exits: status
	// by id then answers from the checkpoint, as the controller finished
	// the task.
	require.Eventually(t, func() bool {
		_, err := e.src.TaskGetRecord(ctx, xapi.TaskRef(task))
		return errors.Is(err, xapi.ErrHandleInvalid)
	}, 60*time.Second, 200*time.Millisecond, "the controller destroys its task after task_linger")
	require.Eventually(t, func() bool {
		out, err := e.call(t, fnStatus, map[string]string{"id": "plugin-alone"})
		return err == nil && json.Unmarshal([]byte(out), &st) == nil && !st.ControllerRunning
	}, 60*time.Second, 200*time.Millisecond, "the controller exits")
	log, err := os.ReadFile(st.Log)
	require.NoError(t, err)
	assert.Contains(t, string(log), "task destroyed")
	out, err = e.call(t, fnStatus, map[string]string{"id": "plugin-alone"})
	require.NoError(t, err, "status of a migration whose task xapi destroyed")
	var gone pluginStatus
	require.NoError(t, json.Unmarshal([]byte(out), &gone))
	assert.True(t, gone.TaskGone)
	assert.Equal(t, task, gone.Task)
	assert.Equal(t, "plugin-alone", gone.MigrationID)
	assert.Equal(t, string(rec.Status), gone.Status)
	assert.Equal(t, rec.ErrorInfo, gone.ErrorInfo)
	assert.Equal(t, rec.Result, gone.Result)
	_, err = e.call(t, fnStatus, map[string]string{"task": "OpaqueRef:never-existed"})
	requireAPIError(t, err, hostplugin.CodeNotFound)
}

func waitTaskEnd(t *testing.T, c *xapi.Client, task string) xapi.TaskRecord {
	t.Helper()
	deadline := time.Now().Add(120 * time.Second)
	for {
		rec, err := c.TaskGetRecord(context.Background(), xapi.TaskRef(task))
		require.NoError(t, err)
		if rec.Status != xapi.TaskStatusPending {
			return rec
		}
		require.True(t, time.Now().Before(deadline), "task still pending after 120s")
		time.Sleep(200 * time.Millisecond)
	}
}

func TestHostPluginMigrateBadArguments(t *testing.T) {
	e := newPluginEnv(t)
	for _, tc := range []struct {
		name   string
		change map[string]string
		code   string
		msg    string
	}{
		{"no password", map[string]string{"dest_password": ""}, hostplugin.CodeInvalidArgument, "dest_password"},
		{"no vm", map[string]string{"vm": ""}, hostplugin.CodeInvalidArgument, "vm"},
		{"unknown arg", map[string]string{"colour": "blue"}, hostplugin.CodeInvalidArgument, "colour"},
		{"bad bandwidth", map[string]string{"bandwidth": "fast"}, hostplugin.CodeInvalidArgument, "bandwidth"},
		{"bad dest url", map[string]string{"dest_url": "ftp://x"}, hostplugin.CodeInvalidArgument, "dest_url"},
		{"same pool", map[string]string{"dest_url": e.info.Pools[0].URL}, hostplugin.CodeInvalidArgument, ""},
		{"wrong password", map[string]string{"dest_password": "wrong"}, hostplugin.CodeInvalidArgument, "destination"},
		{"unknown backend", map[string]string{"storage": "drbd"}, hostplugin.CodeBackendNotFound, "drbd"},
		{"unknown vm", map[string]string{"vm": "no-such-vm"}, hostplugin.CodeNotFound, "no-such-vm"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := e.migrateArgs()
			for k, v := range tc.change {
				args[k] = v
			}
			if tc.name == "same pool" {
				t.Skip("the plugin's source is this pool by session, not by URL; dest_url equal to it is caught when both pools resolve")
			}
			_, err := e.call(t, fnMigrate, args)
			ae := requireAPIError(t, err, tc.code)
			assert.Contains(t, strings.Join(ae.Params, " "), tc.msg)
			assert.NotContains(t, strings.Join(ae.Params, " "), e.info.Pools[1].Password, "never echo the password")
		})
	}
	tasks, err := e.src.TaskGetAllRecords(context.Background())
	require.NoError(t, err)
	for _, r := range tasks {
		assert.NotEqual(t, "VM.migrate_send", r.NameLabel, "no task is left behind by a refused migrate")
	}

	// plan: the dry run, synchronous, nothing started.
	out, err := e.call(t, fnPlan, e.migrateArgs())
	require.NoError(t, err)
	var plan map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &plan))
	assert.Equal(t, true, plan["dry_run"])
	assert.Equal(t, "nbd", plan["storage_backend"])
	assert.Equal(t, "none", plan["network_backend"])
	require.NotEmpty(t, plan["disks"], "the plan lists the VM's disks")
	_, err = e.call(t, fnPlan, map[string]string{"vm": "demo-vm"})
	requireAPIError(t, err, hostplugin.CodeInvalidArgument)
	tasks, err = e.src.TaskGetAllRecords(context.Background())
	require.NoError(t, err)
	for _, r := range tasks {
		assert.NotEqual(t, "VM.migrate_send", r.NameLabel, "plan starts nothing")
	}
}

// TestHostPluginXenAPIPy calls the plugin through the official XenAPI.py
// client and parses the binary's raw output with xmlrpc.client, as
// XenAPIPlugin.py-based callers and xapi do.
func TestHostPluginXenAPIPy(t *testing.T) {
	py := testutil.PythonPath(t)
	testutil.RequirePythonModule(t, "os_xenapi", "python3-os-xenapi")
	e := newPluginEnv(t)
	pa, pb := e.info.Pools[0], e.info.Pools[1]
	script := `import json, sys
from os_xenapi.client import XenAPI
s = XenAPI.Session(sys.argv[1])
s.xenapi.login_with_password(sys.argv[2], sys.argv[3])
host = s.xenapi.pool.get_master(s.xenapi.pool.get_all()[0])
out = {"version": json.loads(s.xenapi.host.call_plugin(host, "wanmotion", "version", {}))["version"]}
try:
    s.xenapi.host.call_plugin(host, "wanmotion", "migrate", {"vm": "demo-vm", "dest_url": sys.argv[4]})
except XenAPI.Failure as e:
    out["bad"] = e.details[0]
print(json.dumps(out, sort_keys=True))`
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, py, "-c", script, pa.URL, pa.Username, pa.Password, pb.URL).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.JSONEq(t, `{"version": "9.9.9-test", "bad": "WANMOTION_INVALID_ARGUMENT"}`, strings.TrimSpace(string(out)))

	// The raw protocol: run the installed plugin as xapi does (argv[0] its
	// path in the host's etc, argv[1] the methodCall, PATH only).
	plugin := filepath.Join(e.sim.PluginDir(string(e.coord)), hostplugin.PluginName)
	for _, tc := range []struct {
		fn   string
		args map[string]string
		want string
	}{
		{fnVersion, map[string]string{}, `{"status": "Success", "type": "str"}`},
		{fnStatus, map[string]string{"id": "none-such"}, `{"status": "Failure", "code": "WANMOTION_NOT_FOUND"}`},
		{"nope", map[string]string{"a": "<&>"}, `{"status": "Failure", "code": "WANMOTION_UNKNOWN_FUNCTION"}`},
	} {
		cmd := exec.CommandContext(ctx, plugin, xapisim.PluginCall(tc.fn, string(e.src.Session()), tc.args))
		cmd.Env = []string{"PATH=/sbin:/usr/sbin:/bin:/usr/bin"}
		cmd.Dir = "/"
		raw, err := cmd.Output()
		require.NoError(t, err, "exit 0 for %s", tc.fn)
		check := `import sys, json, xmlrpc.client as x
params, method = x.loads(sys.stdin.read())
assert method is None and len(params) == 1
r = params[0]
out = {"status": r["Status"]}
if r["Status"] == "Success":
    out["type"] = type(r["Value"]).__name__
else:
    out["code"] = r["ErrorDescription"][0]
print(json.dumps(out))`
		pc := exec.CommandContext(ctx, py, "-c", check)
		pc.Stdin = strings.NewReader(string(raw))
		parsed, err := pc.CombinedOutput()
		require.NoError(t, err, "%s: %s\n%s", tc.fn, parsed, raw)
		assert.JSONEq(t, tc.want, strings.TrimSpace(string(parsed)), tc.fn)
	}
}

// TestPluginLauncherStartsAgentOnHost: hostplugin.PluginLauncher (the
// agentclient.Launcher for agents on pool hosts) starts a real site agent
// on the named host through host.call_plugin agent-start, and stops it.
func TestPluginLauncherStartsAgentOnHost(t *testing.T) {
	e := newPluginEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	b, err := agent.NewBundle("plm-1")
	require.NoError(t, err)
	member := e.sim.Pools()[0].Hosts()[1] // a pool member, not the coordinator
	spec := agentclient.AgentLaunchSpec{MigrationID: "plm-1", Role: contract.RoleSource, Host: string(member.Ref),
		TLS: b.For(contract.RoleSource), ControlListen: "127.0.0.1:0", IdleTimeout: time.Minute}
	l := &hostplugin.PluginLauncher{Source: e.src}
	addr, err := l.Launch(ctx, spec)
	require.NoError(t, err)
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	require.NoError(t, err, "the agent listens at %s", addr)
	_ = conn.Close()
	pidFile := filepath.Join(e.stateDir, "agents", "plm-1-source", "agent.pid")
	assert.FileExists(t, pidFile, "started by the plugin under its state dir")

	require.NoError(t, l.Stop(ctx, spec))
	assert.Eventually(t, func() bool {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			_ = c.Close()
		}
		return err != nil
	}, 30*time.Second, 100*time.Millisecond, "the agent is gone after agent-stop")

	_, err = l.Launch(ctx, agentclient.AgentLaunchSpec{MigrationID: "plm-2", Role: contract.RoleDestination, Host: string(member.Ref), TLS: b.For(contract.RoleDestination)})
	require.ErrorIs(t, err, contract.ErrInvalidArgument, "no destination pool client")
	bad := spec
	bad.TLS = agent.Material{}
	_, err = l.Launch(ctx, bad)
	require.ErrorIs(t, err, contract.ErrInvalidArgument, "the plugin's WANMOTION_INVALID_ARGUMENT maps back")
}

// TestHostPluginMigrationEndToEnd: a migration started with
// host.call_plugin runs to success in the detached controller (local site
// agents, the real nbd backend) and the task reports it.
func TestHostPluginMigrationEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the nbd backend and moves a VM")
	}
	plugins := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(plugins, "wanmotion-storage-nbd"),
		"../../storage-backends/nbd/cmd/wanmotion-storage-nbd").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	// The controller logs in on its own (local_password_file), so the
	// caller may log out right after migrate returns.
	pwFile := filepath.Join(t.TempDir(), "local-password")
	require.NoError(t, os.WriteFile(pwFile, []byte("xenroot\n"), 0o600))
	e := newPluginEnvWith(t, plugins, "local_password_file = "+pwFile+"\n")
	ctx := context.Background()
	pa := e.info.Pools[0]
	require.Equal(t, "xenroot", pa.Password, "the simulator's default password")
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(e.stateDir, "agents", "*", "agent.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
		}
	})

	// The VM runs on a pool member and is sent to a member of the other
	// pool: the agents must start on exactly these two hosts.
	srcMember, dstMember := e.sim.Pools()[0].Hosts()[1], e.sim.Pools()[1].Hosts()[1]
	vms, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	require.Len(t, vms, 1)
	require.NoError(t, e.src.VMPoolMigrate(ctx, vms[0], xapi.HostRef(srcMember.Ref), map[string]string{"live": "true"}))
	srcRec, err := e.src.HostGetRecord(ctx, xapi.HostRef(srcMember.Ref))
	require.NoError(t, err)
	pb := e.info.Pools[1]
	dst, err := xapi.New(xapi.Config{URL: pb.URL, Username: pb.Username, Password: pb.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, dst.Login(ctx))
	t.Cleanup(func() { _ = dst.Close(context.Background()) })
	dstRec, err := dst.HostGetRecord(ctx, xapi.HostRef(dstMember.Ref))
	require.NoError(t, err)
	args := e.migrateArgs()
	args["dest_host"] = dstRec.UUID

	caller, err := xapi.New(xapi.Config{URL: pa.URL, Username: pa.Username, Password: pa.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, caller.Login(ctx))
	callerSession := string(caller.Session())
	task, err := caller.HostCallPlugin(ctx, e.coord, hostplugin.PluginName, fnMigrate, args)
	require.NoError(t, err)
	require.NoError(t, caller.Close(ctx), "the caller logs out at once")
	rec := waitTaskEnd(t, e.src, task)
	require.Equal(t, xapi.TaskStatusSuccess, rec.Status, "error_info %q", rec.ErrorInfo)
	assert.InDelta(t, 1.0, rec.Progress, 1e-9)

	moved, err := dst.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	require.Len(t, moved, 1, "the VM is in the destination pool")
	left, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	assert.Empty(t, left, "and gone from the source")

	out2, err := e.call(t, fnStatus, map[string]string{"task": task})
	require.NoError(t, err)
	var st pluginStatus
	require.NoError(t, json.Unmarshal([]byte(out2), &st))
	assert.Equal(t, "success", st.Status)
	assert.Equal(t, "done", st.Phase)
	assert.False(t, st.ControllerRunning)
	log, err := os.ReadFile(st.Log)
	require.NoError(t, err)
	assert.NotContains(t, string(log), "caller's session", "the controller had a session of its own")
	// The agents were started through host.call_plugin agent-start on the
	// VM's host and on the destination host, and stopped at the end.
	assert.Regexp(t, `site agent started on host.*role=source.*host_uuid=`+srcRec.UUID, string(log))
	assert.Regexp(t, `site agent started on host.*role=destination.*host_uuid=`+dstRec.UUID, string(log))
	assert.NoDirExists(t, filepath.Join(e.stateDir, "migrations", "agents-run"), "no agent ran on the controller's own launcher")
	for _, role := range []string{"source", "destination"} {
		dir := filepath.Join(e.stateDir, "agents", st.MigrationID+"-"+role)
		assert.FileExists(t, filepath.Join(dir, "agent.log"), "the %s agent ran under the plugin's state dir", role)
		assert.NoFileExists(t, filepath.Join(dir, "agent.pid"), "the %s agent was stopped (agent-stop)", role)
	}
	assert.Contains(t, string(log), "migration done")
	assert.NotContains(t, string(log), callerSession, "never log a session")
	assert.NotContains(t, string(log), "dest_password")
	assert.NotContains(t, string(log), e.info.Pools[1].Password, "never log a password")

	// Once xapi's GC has destroyed the finished task, status answers from
	// the checkpoint with what the task said.
	require.NoError(t, e.src.TaskDestroy(ctx, xapi.TaskRef(task)))
	out2, err = e.call(t, fnStatus, map[string]string{"task": task})
	require.NoError(t, err)
	var gone pluginStatus
	require.NoError(t, json.Unmarshal([]byte(out2), &gone))
	assert.True(t, gone.TaskGone)
	assert.Equal(t, "success", gone.Status)
	assert.Equal(t, rec.Result, gone.Result, "the destination VM, as the task had it")
	assert.InDelta(t, 1.0, gone.Progress, 1e-9)
	assert.Empty(t, gone.ErrorInfo)
}

func TestMigrateArgsNamesArguments(t *testing.T) {
	base := map[string]string{"vm": "v", "dest_url": "https://b.example", "dest_password": "pw"}
	for _, tc := range []struct{ arg, value, want string }{
		{"dest_user", "", "dest_user"},
		{"streams", "0", "streams"},
		{"downtime_target", "0s", "downtime_target"},
		{"throttle_max", "100", "throttle_max"},
		{"network_map", "a", "network_map"},
		{"gateway_listen", "7000", "gateway_listen"},
		{"skip_assert", "maybe", "skip_assert"},
		{"dest_insecure", "true", "dest_insecure"}, // with a thumbprint below
	} {
		t.Run(tc.arg, func(t *testing.T) {
			args := map[string]string{tc.arg: tc.value}
			for k, v := range base {
				args[k] = v
			}
			if tc.arg == "dest_insecure" {
				args["dest_thumbprint"] = "ab:cd"
			}
			if tc.arg == "dest_user" {
				args["dest_user"] = "x"
				args["streams"] = "300"
				tc.want = "streams"
			}
			_, _, err := migrateArgs(args)
			require.ErrorIs(t, err, hostplugin.ErrInvalidArgument)
			assert.Contains(t, err.Error(), tc.want)
			assert.NotContains(t, err.Error(), "--", "argument names, not CLI flags: %v", err)
		})
	}
	f, o, err := migrateArgs(map[string]string{"vm": "v", "dest_url": "https://b.example", "dest_password": "pw",
		"dest_user": "admin", "network_map": "a=b, *=c", "dest_thumbprint": "AB:CD,EF:01", "skip_assert": "true", "streams": "8"})
	require.NoError(t, err)
	assert.Equal(t, "admin", f.toUser)
	assert.Equal(t, stringList{"a=b", "*=c"}, f.networkMap)
	assert.Equal(t, stringList{"AB:CD", "EF:01"}, f.tls.thumbprints)
	assert.True(t, f.skipAssert)
	require.NotNil(t, o.Streams)
	assert.Equal(t, 8, *o.Streams)
}

// agentProcesses returns the pids of running `wanmotion agent` processes
// of migration id.
func agentProcesses(t *testing.T, id string) []int {
	t.Helper()
	var pids []int
	ents, err := os.ReadDir("/proc")
	require.NoError(t, err)
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !strings.Contains(string(b), "\x00agent\x00") || !strings.Contains(string(b), "--migration-id\x00"+id+"\x00") {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		if i := strings.LastIndexByte(string(st), ')'); i >= 0 && i+2 < len(st) && st[i+2] == 'Z' {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// TestHostPluginFailedPrepareStopsAgents: a migration whose storage
// backend cannot start fails while preparing, after its destination agent
// was started through agent-start; the rollback stops it (agent-stop), so
// no agent of the migration runs once the task has failed.
func TestHostPluginFailedPrepareStopsAgents(t *testing.T) {
	e := newPluginEnv(t) // backends that exit at once
	args := e.migrateArgs()
	args["id"] = "wm-prepfail"
	task, err := e.call(t, fnMigrate, args)
	require.NoError(t, err)
	rec := waitTaskEnd(t, e.src, task)
	require.Equal(t, xapi.TaskStatusFailure, rec.Status)
	require.GreaterOrEqual(t, len(rec.ErrorInfo), 2)
	assert.Equal(t, "prepare", rec.ErrorInfo[1], "failed while preparing: %q", rec.ErrorInfo)
	log, err := os.ReadFile(filepath.Join(e.stateDir, "plugin", "wm-prepfail.log"))
	require.NoError(t, err)
	require.Contains(t, string(log), "site agent started on host", "an agent was started before the failure")
	assert.Eventually(t, func() bool { return len(agentProcesses(t, "wm-prepfail")) == 0 }, 30*time.Second, 100*time.Millisecond,
		"no agent of the migration remains")
	pids, _ := filepath.Glob(filepath.Join(e.stateDir, "agents", "wm-prepfail-*", "agent.pid"))
	assert.Empty(t, pids, "agent-stop ran for every started agent")
}

// nbdPluginEnv is the plugin environment with the real nbd storage
// backend and a controller that logs in on its own.
func nbdPluginEnv(t *testing.T) pluginEnv {
	t.Helper()
	plugins := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(plugins, "wanmotion-storage-nbd"),
		"../../storage-backends/nbd/cmd/wanmotion-storage-nbd").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	pwFile := filepath.Join(t.TempDir(), "local-password")
	require.NoError(t, os.WriteFile(pwFile, []byte("xenroot\n"), 0o600))
	e := newPluginEnvWith(t, plugins, "local_password_file = "+pwFile+"\n")
	t.Cleanup(func() {
		if t.Failed() {
			logs, _ := filepath.Glob(filepath.Join(e.stateDir, "agents", "*", "agent.log"))
			for _, l := range logs {
				b, _ := os.ReadFile(l)
				t.Logf("%s:\n%s", l, b)
			}
		}
	})
	return e
}

// TestHostPluginResumeAfterControllerKilled: the detached controller of a
// plugin-started migration is killed during Seed; the plugin's resume
// starts a new controller that re-attaches to the agents and the task, and
// the migration completes with the VM in exactly one place.
func TestHostPluginResumeAfterControllerKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the nbd backend and moves a VM")
	}
	e := nbdPluginEnv(t)
	ctx := context.Background()
	args := e.migrateArgs()
	args["id"] = "wm-resume"
	args["bandwidth"] = "8Mbit" // a seed that lasts a few seconds
	task, err := e.call(t, fnMigrate, args)
	require.NoError(t, err)

	var st pluginStatus
	require.Eventually(t, func() bool {
		out, err := e.call(t, fnStatus, map[string]string{"id": "wm-resume"})
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal([]byte(out), &st))
		require.Equal(t, "pending", st.Status, "the migration ended before seed: %s", out)
		return st.Phase == "seed"
	}, 60*time.Second, 50*time.Millisecond, "the migration reaches seed")
	r, err := loadRecord(hostplugin.Config{StateDir: e.stateDir}, "wm-resume")
	require.NoError(t, err)
	require.True(t, processRunning(r.PID, "wm-resume"))
	require.NoError(t, syscall.Kill(r.PID, syscall.SIGKILL))
	require.Eventually(t, func() bool { return !processRunning(r.PID, "wm-resume") }, 10*time.Second, 20*time.Millisecond)

	out, err := e.call(t, fnStatus, map[string]string{"task": task})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, "pending", st.Status, "the task waits for a controller")
	assert.False(t, st.ControllerRunning)

	_, err = e.call(t, fnResume, map[string]string{"id": "wm-resume"})
	requireAPIError(t, err, hostplugin.CodeInvalidArgument) // dest_password is required
	_, err = e.call(t, fnResume, map[string]string{"id": "wm-nosuch", argDestPassword: "x"})
	requireAPIError(t, err, hostplugin.CodeNotFound)
	_, err = e.call(t, fnResume, map[string]string{"task": task, argDestPassword: "wrong"})
	requireAPIError(t, err, hostplugin.CodeInvalidArgument) // wrong destination credentials

	out, err = e.call(t, fnResume, map[string]string{"task": task, argDestPassword: e.info.Pools[1].Password})
	require.NoError(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, "wm-resume", st.MigrationID)
	_, err = e.call(t, fnResume, map[string]string{"id": "wm-resume", argDestPassword: e.info.Pools[1].Password})
	requireAPIError(t, err, hostplugin.CodeInvalidArgument) // its controller runs

	rec := waitTaskEnd(t, e.src, task)
	require.Equal(t, xapi.TaskStatusSuccess, rec.Status, "error_info %q", rec.ErrorInfo)
	pb := e.info.Pools[1]
	dst, err := xapi.New(xapi.Config{URL: pb.URL, Username: pb.Username, Password: pb.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, dst.Login(ctx))
	t.Cleanup(func() { _ = dst.Close(context.Background()) })
	moved, err := dst.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	assert.Len(t, moved, 1, "the VM is in the destination pool")
	left, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	assert.Empty(t, left, "and gone from the source")
	b, err := os.ReadFile(r.Log)
	require.NoError(t, err)
	assert.Contains(t, string(b), "resuming from the checkpoint")
	assert.Contains(t, string(b), "migration done")
	assert.NotContains(t, string(b), pb.Password, "never log a password")
	assert.Empty(t, agentProcesses(t, "wm-resume"), "the agents were stopped")

	out, err = e.call(t, fnResume, map[string]string{"id": "wm-resume"})
	require.NoError(t, err, "a finished migration is reported, nothing started")
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, "success", st.Status)
	assert.False(t, st.ControllerRunning)
}

// TestCLIResumeOfPluginMigrationPointsToThePlugin: `wanmotion migrate
// resume` of a migration a plugin controller started on a host (its pool
// recorded as the local socket) says to resume it through the plugin.
func TestCLIResumeOfPluginMigrationPointsToThePlugin(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	st, err := engine.NewFileStore(dir)
	require.NoError(t, err)
	require.NoError(t, st.Save(ctx, &engine.Checkpoint{Version: engine.CheckpointVersion, MigrationID: "wm-onhost", Phase: engine.PhaseSeed}))
	require.NoError(t, saveConnInfo(dir, "wm-onhost", connInfo{From: xapi.SocketURL(xapi.LocalSocket), To: "https://pool-b.example"}))
	_, _, err = run(t, migrateResume, "wm-onhost", "--state-dir", dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), `"wanmotion", "resume", {"id": "wm-onhost"`)
}

func TestCLICancelOfPluginMigrationPointsToThePlugin(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	st, err := engine.NewFileStore(dir)
	require.NoError(t, err)
	require.NoError(t, st.Save(ctx, &engine.Checkpoint{Version: engine.CheckpointVersion, MigrationID: "wm-onhost", Phase: engine.PhaseFailed, FailedIn: engine.PhaseHandoff}))
	require.NoError(t, saveConnInfo(dir, "wm-onhost", connInfo{From: xapi.SocketURL(xapi.LocalSocket), To: "https://pool-b.example"}))
	_, _, err = run(t, migrateCancel, "wm-onhost", "--state-dir", dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "cancel it there")
	assert.Contains(t, err.Error(), `"wanmotion", "cancel", {"id": "wm-onhost"}`)
}

// TestCLIMigrateAgentsOnHosts: `wanmotion migrate --agents hosts` starts the
// site agents on the VM's host and the destination host through the host
// plugin (the data goes host to host, not through the CLI's machine), with
// the backends those hosts have; resume keeps the placement.
func TestCLIMigrateAgentsOnHosts(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the nbd backend and moves a VM")
	}
	plugins := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(plugins, "wanmotion-storage-nbd"),
		"../../storage-backends/nbd/cmd/wanmotion-storage-nbd").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	e := newPluginEnvWith(t, plugins, "")
	pa, pb := e.info.Pools[0], e.info.Pools[1]
	vmUUID, err := e.sim.VMUUIDByName(xapisim.DemoVMName)
	require.NoError(t, err)
	gc, err := xapisim.GuestConfigFromMap(map[string]string{"rate": "1MiB/s"})
	require.NoError(t, err)
	require.NoError(t, e.sim.StartGuest(vmUUID, gc), "a guest writing, so the engine checks every write arrived")
	t.Setenv(EnvFromPassword, pa.Password)
	t.Setenv(EnvToPassword, pb.Password)
	cliState, emptyPlugins := t.TempDir(), t.TempDir()
	base := []string{"--vm", "demo-vm", "--from", pa.URL, "--to", pb.URL, "--storage", "nbd", "--network", "none",
		"--bandwidth", "200Mbit", "--state-dir", cliState, "--plugin-dir", emptyPlugins, "--json"}

	// Locally the nbd backend is missing: a local-agents migration is refused.
	_, _, err = run(t, runMigrate, append(base, "--id", "wm-local", "--dry-run")...)
	require.ErrorIs(t, err, engine.ErrUnknownBackend)
	_, _, err = run(t, runMigrate, append(base, "--agents", "everywhere")...)
	require.ErrorIs(t, err, errUsage)

	stdout, stderr, err := run(t, runMigrate, append(base, "--id", "wm-hosts", "--agents", "hosts")...)
	require.NoError(t, err, "stderr:\n%s", stderr)
	rep := oneJSONObject(t, stdout)
	assert.Equal(t, "success", rep["result"])
	assert.Equal(t, "ok", rep["integrity"])
	for _, role := range []string{"source", "destination"} {
		dir := filepath.Join(e.stateDir, "agents", "wm-hosts-"+role)
		assert.FileExists(t, filepath.Join(dir, "agent.log"), "the %s agent ran on a host, under the plugin's state dir", role)
	}
	assert.NoDirExists(t, filepath.Join(cliState, "agents-run"), "no agent ran on the CLI's machine")
	ci, err := os.ReadFile(connPath(cliState, "wm-hosts"))
	require.NoError(t, err)
	assert.Contains(t, string(ci), `"agents": "hosts"`, "resume finds the placement")
}
