package nbd

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

// testServer runs a Server on 127.0.0.1:0 until the test ends.
type testServer struct {
	srv  *Server
	addr string
}

func startServer(t testing.TB, opts ServerOptions) *testServer {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testutil.Logger(t)
	}
	srv, err := NewServer(opts)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		require.NoError(t, <-done)
	})
	return &testServer{srv: srv, addr: ln.Addr().String()}
}

func startStatic(t testing.TB, tlsCfg *tls.Config, requireTLS bool, exports ...*Export) *testServer {
	t.Helper()
	look, list := StaticExports(exports...)
	return startServer(t, ServerOptions{Exports: look, List: list, TLS: tlsCfg, RequireTLS: requireTLS})
}

// checkNoLeak fails the test if goroutines started during it outlive it.
func checkNoLeak(t *testing.T) {
	t.Helper()
	before := runtime.NumGoroutine()
	t.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for {
			n := runtime.NumGoroutine()
			if n <= before {
				return
			}
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				buf = buf[:runtime.Stack(buf, true)]
				t.Errorf("goroutine leak: %d before, %d after\n%s", before, n, buf)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
}

// pki is a throwaway CA with a server and a client certificate, written in
// the layout libnbd, nbdkit and qemu expect (ca-cert.pem, server-cert.pem,
// server-key.pem, client-cert.pem, client-key.pem).
type pki struct {
	dir        string
	caPool     *x509.CertPool
	serverCert tls.Certificate
	serverPEM  []byte // leaf certificate only
	clientCert tls.Certificate
}

func newPKI(t testing.TB) *pki {
	t.Helper()
	dir := t.TempDir()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	require.NoError(t, err)
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "wanmotion test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	require.NoError(t, err)
	caCert, err := x509.ParseCertificate(caDER)
	require.NoError(t, err)
	p := &pki{dir: dir, caPool: x509.NewCertPool()}
	p.caPool.AddCert(caCert)
	writePEM(t, filepath.Join(dir, "ca-cert.pem"), "CERTIFICATE", caDER)

	leaf := func(serial int64, cn string, usage x509.ExtKeyUsage, prefix string) (tls.Certificate, []byte) {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		require.NoError(t, err)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: now.Add(-time.Hour), NotAfter: now.Add(24 * time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{usage},
			DNSNames:    []string{"localhost"},
			IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		require.NoError(t, err)
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		require.NoError(t, err)
		writePEM(t, filepath.Join(dir, prefix+"-cert.pem"), "CERTIFICATE", der)
		writePEM(t, filepath.Join(dir, prefix+"-key.pem"), "PRIVATE KEY", keyDER)
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	}
	p.serverCert, p.serverPEM = leaf(2, "localhost", x509.ExtKeyUsageServerAuth, "server")
	p.clientCert, _ = leaf(3, "client", x509.ExtKeyUsageClientAuth, "client")
	return p
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	require.NoError(t, os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600))
}

func (p *pki) serverTLS() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.serverCert}, MinVersion: tls.VersionTLS10} // NewServer raises it to 1.2
}

func (p *pki) clientTLS() *tls.Config {
	return &tls.Config{RootCAs: p.caPool, ServerName: "localhost"}
}

// randomData returns n bytes of deterministic pseudo-random data.
func randomData(n int, seed byte) []byte {
	b := make([]byte, n)
	x := uint32(seed)*2654435761 + 1
	for i := range b {
		x ^= x << 13
		x ^= x >> 17
		x ^= x << 5
		b[i] = byte(x)
	}
	return b
}

// sparseFile writes a file of size bytes with data blocks at the given
// offsets (each blockLen long) and holes elsewhere.
func sparseFile(t testing.TB, dir string, size int64, blockLen int, offsets ...int64) string {
	t.Helper()
	f, err := os.CreateTemp(dir, "sparse-*.img")
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, f.Truncate(size))
	for i, off := range offsets {
		_, err := f.WriteAt(randomData(blockLen, byte(i+1)), off)
		require.NoError(t, err)
	}
	return f.Name()
}

func emptyFile(t testing.TB, dir string, size int64) string {
	t.Helper()
	f, err := os.CreateTemp(dir, "empty-*.img")
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	require.NoError(t, f.Close())
	return f.Name()
}

func fileBackend(t testing.TB, path string, readOnly bool) *FileBackend {
	t.Helper()
	b, err := OpenFile(path, readOnly)
	require.NoError(t, err)
	t.Cleanup(func() { _ = b.Close() })
	return b
}

func requireSameFile(t testing.TB, a, b string) {
	t.Helper()
	x, err := os.ReadFile(a)
	require.NoError(t, err)
	y, err := os.ReadFile(b)
	require.NoError(t, err)
	require.Equal(t, len(x), len(y), "sizes differ")
	if !bytesEqual(x, y) {
		for i := range x {
			if x[i] != y[i] {
				t.Fatalf("files differ first at byte %d", i)
			}
		}
	}
}

func bytesEqual(a, b []byte) bool { return string(a) == string(b) }

// port returns the port part of host:port.
func port(addr string) string { return addr[strings.LastIndexByte(addr, ':')+1:] }

func nullLogger() hclog.Logger { return hclog.NewNullLogger() }
