package xapi

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// TestNewLocalUnixSocket: a client made by NewLocal sends its calls over
// the unix socket, with XenAPI.py's Host header, and logs in there.
func TestNewLocalUnixSocket(t *testing.T) {
	dir, err := os.MkdirTemp("", "xapisock")
	require.NoError(t, err)
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	sock := filepath.Join(dir, "xapi")
	ln, err := net.Listen("unix", sock)
	require.NoError(t, err)

	f := &fakeXapi{t: t, handle: func(method string, params []any) string {
		switch method {
		case "session.login_with_password":
			return successXML(xv("OpaqueRef:local"))
		case "VM.get_all":
			if params[0] != "OpaqueRef:local" && params[0] != "OpaqueRef:borrowed" {
				return failureXML("SESSION_INVALID", params[0].(string))
			}
			return successXML(xv([]any{"OpaqueRef:vm1"}))
		case "host.get_all_records":
			t.Errorf("member discovery over the local socket")
		}
		return failureXML("MESSAGE_METHOD_UNKNOWN", method)
	}}
	hosts := make(chan string, 8)
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hosts <- r.Host
		f.serve(w, r)
	}))
	_ = f.srv.Listener.Close()
	f.srv.Listener = ln
	f.srv.Start()
	t.Cleanup(f.srv.Close)

	ctx := context.Background()
	c, err := NewLocal(sock, Config{Username: "root", URL: "https://ignored.example", Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	assert.Equal(t, SessionRef("OpaqueRef:local"), c.Session())
	vms, err := c.VMGetAll(ctx)
	require.NoError(t, err)
	assert.Equal(t, []VMRef{"OpaqueRef:vm1"}, vms)
	assert.Equal(t, "_var_lib_xcp_xapi", <-hosts)

	b, err := NewLocal(sock, Config{Logger: testutil.Logger(t)})
	require.NoError(t, err)
	b.UseSession("OpaqueRef:borrowed")
	_, err = b.VMGetAll(ctx)
	require.NoError(t, err)
	b.Forget()
	require.NoError(t, b.Close(ctx))

	_, err = NewLocal("", Config{})
	require.Error(t, err)
	missing, err := NewLocal(filepath.Join(dir, "nope"), Config{})
	require.NoError(t, err)
	missing.UseSession("OpaqueRef:x")
	_, err = missing.VMGetAll(ctx)
	var te *TransportError
	require.ErrorAs(t, err, &te, "a missing socket is a transport error")
}

// TestSocketPathForms: the addresses NewFromURL opens as a local socket.
func TestSocketPathForms(t *testing.T) {
	for _, tc := range []struct {
		addr   string
		path   string
		socket bool
		bad    bool
	}{
		{addr: "unix:///var/lib/xcp/xapi", path: LocalSocket, socket: true},
		{addr: SocketURL("/tmp/sim/h1/var/lib/xcp/xapi"), path: "/tmp/sim/h1/var/lib/xcp/xapi", socket: true},
		{addr: "http://_var_lib_xcp_xapi/", path: LocalSocket, socket: true},
		{addr: "http://_var_lib_xcp_xapi", path: LocalSocket, socket: true},
		{addr: "https://pool.example/", socket: false},
		{addr: "http://127.0.0.1:4430/", socket: false},
		{addr: "unix://", socket: true, bad: true},
		{addr: "unix://var/lib/xcp/xapi", socket: true, bad: true},
		{addr: "unix:///var/lib/../xapi", socket: true, bad: true},
	} {
		t.Run(tc.addr, func(t *testing.T) {
			p, ok, err := SocketPath(tc.addr)
			assert.Equal(t, tc.socket, ok)
			if tc.bad {
				require.Error(t, err)
				_, err = NewFromURL(Config{URL: tc.addr})
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.path, p)
			c, err := NewFromURL(Config{URL: tc.addr})
			require.NoError(t, err)
			if tc.socket {
				assert.Equal(t, tc.path, c.Socket())
				assert.Equal(t, localURL, c.URL())
			} else {
				assert.Empty(t, c.Socket())
			}
		})
	}
}
