package agentclient

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

func agentPID(t *testing.T, dir, id string, role contract.Role) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, id+"-"+string(role), "agent.pid"))
	require.NoError(t, err)
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	require.NoError(t, err)
	return pid
}

// TestAgentKilled runs real `wanmotion agent` processes (this test binary
// re-executed as the agent command) through LocalLauncher, kills one agent
// with SIGKILL mid-migration, and checks that the controller gets a clear
// error, that Start launches a new agent (and re-attaches to the living
// one), and that the migration's rounds continue.
func TestAgentKilled(t *testing.T) {
	for _, victim := range roles {
		t.Run(string(victim), func(t *testing.T) { testAgentKilled(t, victim) })
	}
}

func testAgentKilled(t *testing.T, victim contract.Role) {
	const size = 2 << 20
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	fx := newFixture(t, size)
	dir, agentState := t.TempDir(), t.TempDir()
	l := &LocalLauncher{Binary: os.Args[0], Dir: dir, Env: append(os.Environ(), reexecEnv+"=1")}
	c, err := New(Config{Launcher: l, StateDir: t.TempDir(), PluginDir: pluginDir, AgentStateDir: agentState,
		StorageConfig: fx.config(t), UUIDOf: uuidOf, IdleTimeout: 30 * time.Second, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	defer c.Close()
	const id = "mig-sub"
	spec := engine.AgentSpec{MigrationID: id, StorageBackend: "filecopy"}
	t.Cleanup(func() {
		for _, r := range roles {
			_ = l.Stop(context.Background(), AgentLaunchSpec{MigrationID: id, Role: r})
		}
	})
	require.NoError(t, c.Start(ctx, spec))
	srcPID, dstPID := agentPID(t, dir, id, contract.RoleSource), agentPID(t, dir, id, contract.RoleDestination)
	require.NotEqual(t, os.Getpid(), srcPID)
	gs := engine.GatewaySpec{MigrationID: id, Streams: 2}
	require.NoError(t, c.Gateway().Start(ctx, gs))

	key := engine.DiskKey{MigrationID: id, DiskID: "vdi-1"}
	st := c.Storage()
	info, err := st.PrepareReceiver(ctx, engine.ReceiverSpec{Key: key, Backend: "filecopy", Disk: testDisk(size), ReplicaUUID: "replica-1"})
	require.NoError(t, err)
	local, err := c.Gateway().Forward(ctx, id, info.Address)
	require.NoError(t, err)
	sstate, err := st.PrepareSender(ctx, engine.SenderSpec{Key: key, Backend: "filecopy", Disk: testDisk(size), Peer: engine.Peer{Address: local, Endpoint: info.Endpoint}})
	require.NoError(t, err)
	fx.writeSnapshot(t, 0, nil)
	res, err := st.SyncRound(ctx, engine.SyncSpec{Key: key, Round: 0, Snapshot: "OpaqueRef:snap-0", Full: true})
	require.NoError(t, err)
	sstate = res.State

	// Kill one agent.
	victimPID, survivor, survivorPID := srcPID, contract.RoleDestination, dstPID
	if victim == contract.RoleDestination {
		victimPID, survivor, survivorPID = dstPID, contract.RoleSource, srcPID
	}
	proc, err := os.FindProcess(victimPID)
	require.NoError(t, err)
	require.NoError(t, proc.Kill())
	require.Eventually(t, func() bool { return !alive(victimPID) }, 10*time.Second, 20*time.Millisecond)

	if victim == contract.RoleSource {
		_, err = st.SyncStatus(ctx, key)
	} else {
		_, err = st.Finalize(ctx, key)
	}
	require.Error(t, err)
	assert.ErrorIs(t, err, contract.ErrUnavailable)
	assert.Contains(t, err.Error(), string(victim)+" agent")

	// Re-attach as the engine does after a failed round.
	require.NoError(t, c.Start(ctx, spec))
	newPID := agentPID(t, dir, id, victim)
	assert.NotEqual(t, victimPID, newPID, "a new agent was launched")
	assert.Equal(t, survivorPID, agentPID(t, dir, id, survivor), "the living agent was re-attached, not relaunched")
	require.NoError(t, c.Gateway().Start(ctx, gs))
	rinfo, err := st.RecoverReceiver(ctx, key, info.State)
	require.NoError(t, err)
	local, err = c.Gateway().Forward(ctx, id, rinfo.Address)
	require.NoError(t, err)
	require.NoError(t, st.RecoverSender(ctx, key, sstate, engine.Peer{Address: local, Endpoint: rinfo.Endpoint}))

	img1, bitmap := fx.writeSnapshot(t, 1, []int{0, 5, 31})
	res, err = st.SyncRound(ctx, engine.SyncSpec{Key: key, Round: 1, Snapshot: "OpaqueRef:snap-1", Bitmap: bitmap})
	require.NoError(t, err)
	assert.Equal(t, int64(3*contract.DefaultBlockSize), res.BytesToCopy)
	_, err = st.Finalize(ctx, key)
	require.NoError(t, err)
	got, err := os.ReadFile(replicaPath(t, filepath.Join(agentState, id, "destination"), "replica-1"))
	require.NoError(t, err)
	assert.Equal(t, sum(img1), sum(got))

	require.NoError(t, c.Stop(ctx, id))
	for _, pid := range []int{newPID, survivorPID} {
		require.Eventually(t, func() bool { return !alive(pid) }, 15*time.Second, 50*time.Millisecond, "agent %d still runs after Stop", pid)
	}
	for _, r := range roles {
		_, err := os.Stat(filepath.Join(dir, id+"-"+string(r), "tls"))
		assert.ErrorIs(t, err, os.ErrNotExist, "the %s agent's keys were removed", r)
	}
}
