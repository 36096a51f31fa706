package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
	plugins := nbdBackend(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	// a loaded machine starts race binaries slowly
	agentExec.binary, agentExec.args, agentExec.startTimeout = exe, []string{argRunAsCLI}, 2*time.Minute
	t.Cleanup(func() {
		agentExec.binary, agentExec.args, agentExec.startTimeout = "/nonexistent/wanmotion-test-agent", nil, 0
	})

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
}
