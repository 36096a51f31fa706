package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// argRunAsCLI, as the first argument, makes the test binary behave as the
// wanmotion binary (the local agents the migrate command launches run
// from it). An argument, not an environment variable: the launcher passes
// agents a filtered environment.
const argRunAsCLI = "--wanmotion-test-run-as-cli"

func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == argRunAsCLI {
		os.Exit(realMain(os.Args[2:], os.Stdout, os.Stderr))
	}
	// Agents launched by accident must not re-run the tests.
	agentExec.binary = "/nonexistent/wanmotion-test-agent"
	os.Exit(m.Run())
}

// nbdBackend builds the nbd storage backend into a plugin directory.
func nbdBackend(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(dir, "wanmotion-storage-nbd"),
		"../../storage-backends/nbd/cmd/wanmotion-storage-nbd").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return dir
}

// TestMigrateEndToEnd runs the real CLI migration on the simulator: local
// site agents (this test binary as `wanmotion agent`), the nbd backend, the
// WAN gateway on loopback, a guest writing during the move.
func TestMigrateEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the nbd backend")
	}
	e := newCLIEnv(t)
	plugins := withTestAgents(t)

	out, _, err := run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", plugins, "--dry-run", "--json")
	require.NoError(t, err)
	vmUUID := oneJSONObject(t, out)["vm_uuid"].(string)
	require.NoError(t, e.sim.StartGuest(vmUUID, xapisim.GuestConfig{Rate: 1 << 20, DirtyRate: 1 << 20}))
	t.Cleanup(func() { _ = e.sim.StopGuest(vmUUID) })

	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		logs, _ := filepath.Glob(filepath.Join(e.stateDir, "agents-run", "*", "agent.log"))
		for _, l := range logs {
			b, _ := os.ReadFile(l)
			t.Logf("%s:\n%s", l, b)
		}
	})
	// First a migration cancelled during Seed with `migrate cancel` (the
	// xapi task.cancel path): rolled back, exit code 3, VM still at the source.
	cancelDuringSeed(t, e, plugins, vmUUID)

	out, stderr, err := run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", plugins,
		"--state-dir", e.stateDir, "--bandwidth", "400Mbit", "--json")
	require.NoError(t, err, "stderr: %s", stderr)
	v := oneJSONObject(t, out)
	assert.Equal(t, "success", v["result"], "stderr: %s", stderr)
	assert.Equal(t, vmUUID, v["vm_uuid"])
	assert.Equal(t, "ok", v["integrity"], "the destination disk holds what the guest wrote")
	assert.Equal(t, true, v["guest_pause_measured"])
	assert.GreaterOrEqual(t, v["seed_rounds"], float64(2))
	assert.Positive(t, v["bytes_on_wire"])
	assert.Positive(t, v["bytes_to_move"])
	assert.NotContains(t, out+stderr, "xenroot")
	assert.True(t, strings.Contains(stderr, "seed round 0"), "plain progress lines on stderr: %s", stderr)

	last, ok := e.sim.LastMigration(vmUUID)
	require.True(t, ok)
	assert.Equal(t, "success", last.Result)

	// status reads the checkpoint.
	id := v["migration_id"].(string)
	out, _, err = run(t, runMigrate, "status", id, "--state-dir", e.stateDir, "--json")
	require.NoError(t, err)
	assert.Equal(t, "success", oneJSONObject(t, out)["result"])
	// The CLI's controller destroyed its finished task when it ended
	// (--task-linger 0): XenCenter sees the migration complete.
	assertTaskGone(t, e, id)
}

// assertTaskGone: the xapi task of migration id (from its checkpoint) was
// marked as the controller's and is gone from the source pool.
func assertTaskGone(t *testing.T, e cliEnv, id string) {
	t.Helper()
	store, err := engine.NewFileStore(e.stateDir)
	require.NoError(t, err)
	cp, err := store.Load(context.Background(), id)
	require.NoError(t, err)
	require.NotEmpty(t, cp.Task)
	assert.True(t, cp.TaskCreated && cp.TaskFinished)
	c, err := xapi.New(xapi.Config{URL: e.a, Username: "root", Password: "xenroot"})
	require.NoError(t, err)
	require.NoError(t, c.Login(context.Background()))
	defer c.Close(context.Background())
	_, err = c.TaskGetRecord(context.Background(), xapi.TaskRef(cp.Task))
	require.ErrorIs(t, err, xapi.ErrHandleInvalid, "the finished task %s was destroyed", cp.Task)
}

func cancelDuringSeed(t *testing.T, e cliEnv, plugins, vmUUID string) {
	t.Helper()
	const id = "wm-cancel-e2e"
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		var out, errb strings.Builder
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		err := runMigrate(ctx, []string{"--id", id, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", plugins,
			"--state-dir", e.stateDir, "--bandwidth", "4Mbit", "--json"}, &out, &errb)
		done <- result{out.String(), err}
	}()
	store, err := engine.NewFileStore(e.stateDir)
	require.NoError(t, err)
	deadline := time.Now().Add(3 * time.Minute)
	for {
		cp, err := store.Load(context.Background(), id)
		if err == nil && cp.Phase == engine.PhaseSeed && cp.Task != "" {
			break
		}
		if err == nil && cp.Phase.Stopped() || time.Now().After(deadline) {
			r := <-done
			t.Fatalf("the migration did not reach seed: %v %s", r.err, r.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
	out, _, err := run(t, runMigrate, "cancel", id, "--state-dir", e.stateDir)
	require.NoError(t, err)
	assert.Contains(t, out, "cancel requested")
	var r result
	select {
	case r = <-done:
	case <-time.After(3 * time.Minute):
		t.Fatal("the cancelled migration did not end")
	}
	require.Error(t, r.err)
	var ec interface{ ExitCode() int }
	require.ErrorAs(t, r.err, &ec)
	assert.Equal(t, exitCancelled, ec.ExitCode())
	v := oneJSONObject(t, r.out)
	assert.Equal(t, "cancelled", v["result"])
	assert.Equal(t, "rolled_back", v["phase"])
	assertTaskGone(t, e, id) // a cancelled task goes too

	c, err := xapi.New(xapi.Config{URL: e.a, Username: "root", Password: "xenroot"})
	require.NoError(t, err)
	require.NoError(t, c.Login(context.Background()))
	defer c.Close(context.Background())
	ref, err := c.VMGetByUUID(context.Background(), vmUUID)
	require.NoError(t, err, "the VM is still in the source pool")
	ps, err := c.VMGetPowerState(context.Background(), ref)
	require.NoError(t, err)
	assert.Equal(t, xapi.VMPowerStateRunning, ps)
}
