package agentclient

import (
	"context"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// A relaunched backend whose Recover failed (here: the replica was
// briefly missing) must not serve calls without its handles: the next
// call relaunches and recovers again.
func TestFailedRecoverIsRetried(t *testing.T) {
	p := newPair(t, 1<<20, 0)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	p.prepare(t, ctx)
	m, err := p.c.lookup(p.id, false)
	require.NoError(t, err)
	h, _, err := m.handleOf(p.key(), contract.RoleDestination)
	require.NoError(t, err)
	status := func() error {
		_, err := callRole[contract.StatusRequest, contract.StorageStatus](ctx, p.c, p.id, contract.RoleDestination,
			agent.MethodStorageStatus, contract.StatusRequest{Handle: h.ID})
		return err
	}
	require.NoError(t, status())

	lr, err := callRole[agent.LaunchRequest, agent.LaunchResponse](ctx, p.c, p.id, contract.RoleDestination, agent.MethodLaunchStorage,
		agent.LaunchRequest{Name: "filecopy", Config: p.fx.config(t)["filecopy"]})
	require.NoError(t, err)
	replica := replicaPath(t, p.agentDir+"/"+p.id+"/destination", "replica-1")
	require.NoError(t, os.Rename(replica, replica+".away"))
	proc, err := os.FindProcess(lr.PID)
	require.NoError(t, err)
	require.NoError(t, proc.Kill())
	require.Eventually(t, func() bool {
		err := status()
		return err != nil && strings.Contains(err.Error(), "recover handle")
	}, 30*time.Second, 20*time.Millisecond, "the relaunched backend cannot recover the receiver")

	require.NoError(t, os.Rename(replica+".away", replica))
	assert.NoError(t, status(), "the next call relaunches and recovers the handle")
}
