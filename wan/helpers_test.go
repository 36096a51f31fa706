package wan

import (
	"context"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

type pki struct {
	ca             *CA
	server, client *Cert
}

func newPKI(t testing.TB) pki {
	t.Helper()
	ca, err := NewCA("test-migration", time.Hour)
	require.NoError(t, err)
	srv, err := ca.IssueServer(time.Hour)
	require.NoError(t, err)
	cli, err := ca.IssueClient("source-agent", time.Hour)
	require.NoError(t, err)
	return pki{ca: ca, server: srv, client: cli}
}

func (p pki) serverConfig(t testing.TB) Config {
	return Config{CertPEM: p.server.CertPEM, KeyPEM: p.server.KeyPEM, CAPEM: p.ca.CertPEM, Logger: testutil.Logger(t)}
}

func (p pki) clientConfig(t testing.TB) Config {
	return Config{CertPEM: p.client.CertPEM, KeyPEM: p.client.KeyPEM, CAPEM: p.ca.CertPEM, Logger: testutil.Logger(t)}
}

// pair is a connected session pair.
type pair struct {
	l      *Listener
	src    *Session // dialler (source site)
	dst    *Session // listener side (destination site)
	cancel context.CancelFunc
}

// newPair listens, optionally lets wrap turn the listen address into the
// address to dial (an emulated link), and dials.
func newPair(t *testing.T, srvCfg, cliCfg Config, wrap func(addr string) string) *pair {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	l, err := Listen(ctx, "127.0.0.1:0", srvCfg)
	require.NoError(t, err)
	addr := l.Addr().String()
	if wrap != nil {
		addr = wrap(addr)
	}
	src, err := Dial(ctx, addr, cliCfg)
	require.NoError(t, err)
	dst, err := l.Accept(ctx)
	require.NoError(t, err)
	p := &pair{l: l, src: src, dst: dst, cancel: cancel}
	t.Cleanup(p.close)
	return p
}

func (p *pair) close() {
	_ = p.src.Close()
	_ = p.dst.Close()
	_ = p.l.Close()
	p.cancel()
}

// noLeaks fails the test if goroutines started during it are still running
// after its cleanups. Register it first so it runs last.
func noLeaks(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(10 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, n, leakFilter(string(buf)))
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
	})
}

func leakFilter(stacks string) string {
	var out []string
	for _, g := range strings.Split(stacks, "\n\n") {
		if strings.Contains(g, "wanmotion") && !strings.Contains(g, "testing.tRunner") {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}
