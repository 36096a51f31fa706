package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// TestXAPIAccessAddress: backends get an address they can open
// (xapi.NewFromURL): the controller's pool URL, unix://<socket> when the
// controller talks to a local socket (never XenAPI.py's
// http://_var_lib_xcp_xapi/ form, which no http client resolves), and the
// host's own local socket for agents started on pool hosts.
func TestXAPIAccessAddress(t *testing.T) {
	ctx := context.Background()
	store := engine.NewMemStore()
	require.NoError(t, store.Save(ctx, &engine.Checkpoint{Version: engine.CheckpointVersion, MigrationID: "wm-acc", Phase: engine.PhasePrepare}))
	remote, err := xapi.New(xapi.Config{URL: "https://pool-b.example"})
	require.NoError(t, err)
	local, err := xapi.NewLocal("/run/sim/h1/var/lib/xcp/xapi", xapi.Config{})
	require.NoError(t, err)
	local.UseSession("OpaqueRef:s")
	for _, tc := range []struct {
		name     string
		c        *xapi.Client
		hostXAPI bool
		want     string
	}{
		{"pool URL", remote, false, "https://pool-b.example/"},
		{"local socket", local, false, "unix:///run/sim/h1/var/lib/xcp/xapi"},
		{"host socket", remote, true, "unix:///var/lib/xcp/xapi"},
		{"host socket from a local client", local, true, "unix:///var/lib/xcp/xapi"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			acc, err := xapiAccess(tc.c, store, contract.RoleSource, tc.hostXAPI)(ctx, "wm-acc")
			require.NoError(t, err)
			assert.Equal(t, tc.want, acc.URL)
			_, err = xapi.NewFromURL(xapi.Config{URL: acc.URL})
			assert.NoError(t, err, "a backend can open %s", acc.URL)
		})
	}
}
