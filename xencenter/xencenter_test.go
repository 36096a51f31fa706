package xencenter

import (
	"bufio"
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// A stand-in host plugin: records its argv[1] and answers a task-like ref.
const fakePlugin = `#!/bin/sh
printf '%s' "$1" > "$(dirname "$0")/../../../call.xml"
cat <<'EOF'
<?xml version='1.0'?>
<methodResponse><params><param><value><struct>
<member><name>Status</name><value><string>Success</string></value></member>
<member><name>Value</name><value><string>OpaqueRef:fake-task</string></value></member>
</struct></value></param></params></methodResponse>
EOF
`

func TestCommandCallsThePlugin(t *testing.T) {
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 1, HostsPerPool: 1, DiskSize: 8 << 20,
		MemorySize: 8 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	script := filepath.Join(t.TempDir(), "plugin")
	require.NoError(t, os.WriteFile(script, []byte(fakePlugin), 0o755))
	require.NoError(t, s.InstallPlugin(PluginName, script))
	pi := s.Info().Pools[0]
	ctx := context.Background()
	c, err := xapi.New(xapi.Config{URL: pi.URL, Username: pi.Username, Password: pi.Password})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	vms, err := c.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	vm, err := c.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)

	oldIn, oldPW := Stdin, ReadPassword
	t.Cleanup(func() { Stdin, ReadPassword = oldIn, oldPW })
	ReadPassword = func(string, io.Writer) (string, error) { return "dest-secret", nil }
	Stdin = strings.NewReader("http://dest.example\nadmin\nSR one\nnet-a=net-b\n")
	var out, errb bytes.Buffer
	require.NoError(t, Command(ctx, []string{"xencenter", "--no-wait", pi.URL, string(c.Session()), "VM", vm.UUID}, &out, &errb), errb.String())
	assert.Equal(t, "OpaqueRef:fake-task\n", out.String())
	assert.NotContains(t, errb.String(), string(c.Session()))

	etc := s.HostEtcDir(string(s.Pools()[0].Coordinator().Ref))
	raw, err := os.ReadFile(filepath.Join(filepath.Dir(etc), "call.xml"))
	require.NoError(t, err)
	call := string(raw)
	for _, want := range []string{"<methodName>migrate</methodName>", "<value>" + string(c.Session()) + "</value>",
		"<name>vm</name><value>" + vm.UUID + "</value>", "<name>dest_url</name><value>http://dest.example</value>",
		"<name>dest_user</name><value>admin</value>", "<name>dest_password</name><value>dest-secret</value>",
		"<name>dest_sr</name><value>SR one</value>", "<name>network_map</name><value>net-a=net-b</value>"} {
		assert.Contains(t, call, want)
	}
	_, err = c.VMGetAll(ctx)
	require.NoError(t, err, "the session is not logged out")
}

func TestCommandUsage(t *testing.T) {
	for _, args := range [][]string{
		{"u", "OpaqueRef:s", "VM"},
		{"u", "OpaqueRef:s", "host", "x"},
		{"u", "OpaqueRef:s", "VM", "null"},
		{"u", "not-a-session", "VM", "x"},
		{"--insecure", "--thumbprint", "ab", "u", "OpaqueRef:s", "VM", "x"},
		{"--colour", "u", "OpaqueRef:s", "VM", "x"},
	} {
		err := Command(context.Background(), args, io.Discard, io.Discard)
		require.ErrorIs(t, err, ErrUsage, "%v", args)
	}
}

func newReader(s string) *bufio.Reader { return bufio.NewReader(strings.NewReader(s)) }

func TestTrustShowsThumbprint(t *testing.T) {
	srv := httptest.NewTLSServer(http.NotFoundHandler())
	t.Cleanup(srv.Close)
	want := xapi.Thumbprint(srv.Certificate().Raw)
	for _, tc := range []struct {
		answer string
		ok     bool
	}{{"yes\n", true}, {"no\n", false}, {"\n", false}} {
		var errb bytes.Buffer
		r := run{in: newReader(tc.answer), stderr: &errb, stdout: io.Discard, log: hclog.NewNullLogger()}
		tp, err := r.trust(context.Background(), srv.URL, "destination pool")
		if tc.ok {
			require.NoError(t, err)
			assert.Equal(t, want, tp)
		} else {
			require.Error(t, err)
		}
		assert.Contains(t, errb.String(), want, "the user sees the thumbprint")
	}
	r := run{in: newReader(""), stderr: io.Discard, stdout: io.Discard, log: hclog.NewNullLogger()}
	tp, err := r.trust(context.Background(), "http://x.example", "pool")
	require.NoError(t, err)
	assert.Empty(t, tp, "no TLS, nothing to trust")
}

// TestBuildsForWindows: XenCenter runs on Windows.
func TestBuildsForWindows(t *testing.T) {
	if testing.Short() {
		t.Skip("cross-compiles")
	}
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, gobin, "build", "-buildvcs=false", "-o", filepath.Join(t.TempDir(), "wanmotion-xencenter.exe"), "../cmd/wanmotion-xencenter")
	cmd.Env = append(os.Environ(), "GOOS=windows", "GOARCH=amd64")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
}
