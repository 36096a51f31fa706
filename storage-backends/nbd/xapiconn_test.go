package nbdstore

import (
	"context"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// TestOpenXAPIOverLocalSocket: a backend handed the local socket of the
// host it runs on (unix://<socket>, what an agent started on a pool host
// gets) reaches xapi with the controller's session and plugs a VDI into
// that host's control domain, as with the pool's URL.
func TestOpenXAPIOverLocalSocket(t *testing.T) {
	// A short state dir: the host's socket path must fit a unix address.
	dir, err := os.MkdirTemp("", "nbdsock")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	s, err := xapisim.New(xapisim.Config{StateDir: dir, Pools: 1, HostsPerPool: 2, NoDemoVM: true,
		Logger: testutil.Logger(t).Named("sim")})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	site := newPoolSite(t, s.Info().Pools[0])
	ctx := context.Background()

	member := s.Pools()[0].Hosts()[1]
	sock := s.XapiSocketPath(member)
	require.FileExists(t, sock, "the simulator serves the member's socket")
	hrec, err := site.x.HostGetRecord(ctx, xapi.HostRef(member.Ref))
	require.NoError(t, err)
	vdi, err := site.x.VDICreate(ctx, xapi.VDICreateSpec{NameLabel: "sock", SR: site.srRef, VirtualSize: 1 << 20})
	require.NoError(t, err)

	for _, url := range []string{xapi.SocketURL(sock), site.access.URL} {
		t.Run(url, func(t *testing.T) {
			c, err := openXAPI(url, string(site.access.Session), "", testutil.Logger(t))
			require.NoError(t, err)
			defer closeXAPI(c)
			dom0, err := controlDomain(ctx, c, hrec.UUID)
			require.NoError(t, err)
			assert.Equal(t, hrec.ControlDomain, dom0, "the member's control domain")
			vbd, path, err := attachToDom0(ctx, c, hrec.UUID, vdi, xapi.VBDModeRO, "test")
			require.NoError(t, err)
			assert.FileExists(t, path)
			detachFromDom0(ctx, c, vbd)
			_, err = site.x.VBDGetRecord(ctx, vbd)
			assert.True(t, xapi.IsCode(err, xapi.CodeHandleInvalid), "the dom0 VBD is gone: %v", err)
		})
	}
	// Still logged in: the borrowed session was never logged out.
	_, err = site.x.HostGetAll(ctx)
	require.NoError(t, err)

	for _, bad := range []string{"unix://", "unix://relative/xapi", "unix:///a/../xapi"} {
		_, err := openXAPI(bad, string(site.access.Session), "", testutil.Logger(t))
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, bad)
	}
}
