package main

import (
	"context"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
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

// TestXAPIAccessPinsTheVerifiedCertificate: a backend given the controller's
// session over https is told to trust exactly the certificate the
// controller verified, so a self-signed pool works in the backend too.
func TestXAPIAccessPinsTheVerifiedCertificate(t *testing.T) {
	ctx := context.Background()
	srv := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		v := "<array><data></data></array>"
		if strings.Contains(string(body), "session.login_with_password") {
			v = "<string>OpaqueRef:s</string>"
		}
		_, _ = io.WriteString(w, `<?xml version="1.0"?><methodResponse><params><param><value><struct>`+
			`<member><name>Status</name><value>Success</value></member>`+
			`<member><name>Value</name><value>`+v+`</value></member></struct></value></param></params></methodResponse>`)
	}))
	defer srv.Close()
	store := engine.NewMemStore()
	require.NoError(t, store.Save(ctx, &engine.Checkpoint{Version: engine.CheckpointVersion, MigrationID: "wm-pin", Phase: engine.PhasePrepare}))
	c, err := xapi.New(xapi.Config{URL: srv.URL, Username: "root", Password: "x", TLS: xapi.TLSOptions{Insecure: true}, DisableMemberDiscovery: true})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	acc, err := xapiAccess(c, store, contract.RoleSource, false)(ctx, "wm-pin")
	require.NoError(t, err)
	want := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw}))
	require.Equal(t, want, acc.TLSPin)
	// the backend side: pin it, reuse the session, call
	blk, _ := pem.Decode([]byte(acc.TLSPin))
	require.NotNil(t, blk)
	b, err := xapi.NewFromURL(xapi.Config{URL: acc.URL, TLS: xapi.TLSOptions{Thumbprints: []string{xapi.Thumbprint(blk.Bytes)}}, DisableMemberDiscovery: true})
	require.NoError(t, err)
	b.UseSession(xapi.SessionRef(string(acc.Session)))
	_, err = b.VMGetAll(ctx)
	require.NoError(t, err)
	b.Forget()
	// without the pin the backend would refuse the self-signed certificate
	u, err := xapi.NewFromURL(xapi.Config{URL: acc.URL, DisableMemberDiscovery: true})
	require.NoError(t, err)
	u.UseSession(xapi.SessionRef(string(acc.Session)))
	_, err = u.VMGetAll(ctx)
	require.Error(t, err)
	u.Forget()
}
