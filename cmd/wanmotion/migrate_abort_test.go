package main

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
)

// A migration whose VM.migrate_send fails (the simulator's injected fault)
// stops in failed with the VM at the source; `migrate cancel` then rolls it
// back (engine.Abort): exit code 3, the VM still at the source, no
// replica left at the destination.
func TestMigrateCancelAfterFailedHandoff(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the nbd backend")
	}
	e := newCLIEnv(t)
	plugins := withTestAgents(t)
	require.NoError(t, e.sim.InjectFault("memory"))
	const id = "wm-abort-cli"
	_, _, err := run(t, runMigrate, "--id", id, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", plugins,
		"--state-dir", e.stateDir)
	require.ErrorIs(t, err, engine.ErrHandoffFailed)
	assert.Contains(t, err.Error(), "wanmotion migrate cancel "+id)

	store, err := engine.NewFileStore(e.stateDir)
	require.NoError(t, err)
	cp, err := store.Load(context.Background(), id)
	require.NoError(t, err)
	require.Equal(t, engine.PhaseFailed, cp.Phase)
	require.NotEmpty(t, cp.Disks)
	replica := cp.Disks[0].ReplicaUUID
	require.NotEmpty(t, replica)
	_, err = e.sim.VDIPath(replica)
	require.NoError(t, err, "the replica is kept after the failed handoff")

	_, _, err = run(t, runMigrate, "cancel", id, "--state-dir", e.stateDir)
	var ec interface{ ExitCode() int }
	require.ErrorAs(t, err, &ec)
	assert.Equal(t, exitCancelled, ec.ExitCode())
	cp, err = store.Load(context.Background(), id)
	require.NoError(t, err)
	assert.Equal(t, engine.PhaseRolledBack, cp.Phase)
	_, err = e.sim.VDIPath(replica)
	assert.Error(t, err, "the replica is destroyed by the rollback")
	last, ok := e.sim.LastMigration(cp.Request.VMUUID)
	require.True(t, ok)
	assert.NotEqual(t, "success", last.Result)
	out, _, err := run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", plugins, "--dry-run")
	require.NoError(t, err, "demo-vm still runs at the source")
	assert.Contains(t, out, "plan for VM demo-vm")
}

// withTestAgents builds the nbd backend and makes the CLI start its site
// agents from this test binary; it returns the plugin directory.
func withTestAgents(t *testing.T) string {
	t.Helper()
	plugins := nbdBackend(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	// a loaded machine starts race binaries slowly
	agentExec.binary, agentExec.args, agentExec.startTimeout = exe, []string{argRunAsCLI}, 2*time.Minute
	t.Cleanup(func() {
		agentExec.binary, agentExec.args, agentExec.startTimeout = "/nonexistent/wanmotion-test-agent", nil, 0
	})
	return plugins
}
