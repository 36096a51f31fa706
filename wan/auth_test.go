package wan

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestMutualAuthFailures(t *testing.T) {
	noLeaks(t)
	good := newPKI(t)
	other := newPKI(t) // a different migration's CA
	expiredClient, err := good.ca.IssueWindow("old-agent", false, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	require.NoError(t, err)
	expiredServer, err := good.ca.IssueWindow(DefaultServerName, true, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	require.NoError(t, err)
	// A server certificate presented as a client certificate has the wrong usage.
	wrongUsage := good.server

	for _, tc := range []struct {
		name       string
		server     *Cert
		client     *Cert
		clientCA   []byte
		serverSide bool // the listener is the one that must reject
	}{
		{"client cert from another CA", good.server, other.client, good.ca.CertPEM, true},
		{"expired client cert", good.server, expiredClient, good.ca.CertPEM, true},
		{"client presents a server-only cert", good.server, wrongUsage, good.ca.CertPEM, true},
		{"server cert from another CA", other.server, good.client, good.ca.CertPEM, false},
		{"expired server cert", expiredServer, good.client, good.ca.CertPEM, false},
		{"client pins another CA", good.server, good.client, other.ca.CertPEM, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			l, err := Listen(ctx, "127.0.0.1:0", Config{CertPEM: tc.server.CertPEM, KeyPEM: tc.server.KeyPEM, CAPEM: good.ca.CertPEM})
			require.NoError(t, err)
			defer l.Close()
			_, err = Dial(ctx, l.Addr().String(), Config{CertPEM: tc.client.CertPEM, KeyPEM: tc.client.KeyPEM, CAPEM: tc.clientCA, DialTimeout: 3 * time.Second})
			require.Error(t, err)
			if tc.serverSide {
				// The listener rejects the handshake and never yields a session.
				require.Eventually(t, func() bool { return l.HandshakeFailures() > 0 }, 5*time.Second, 10*time.Millisecond)
			} else {
				var uerr x509.UnknownAuthorityError
				var cerr x509.CertificateInvalidError
				assert.True(t, errors.As(err, &uerr) || errors.As(err, &cerr), "client-side verification error, got %v", err)
			}
			actx, acancel := context.WithTimeout(ctx, 100*time.Millisecond)
			defer acancel()
			_, err = l.Accept(actx)
			assert.ErrorIs(t, err, context.DeadlineExceeded, "no session may be accepted")
		})
	}

	t.Run("no client certificate", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		l, err := Listen(ctx, "127.0.0.1:0", good.serverConfig(t))
		require.NoError(t, err)
		defer l.Close()
		pool := x509.NewCertPool()
		require.True(t, pool.AppendCertsFromPEM(good.ca.CertPEM))
		c, err := tls.Dial("tcp", l.Addr().String(), &tls.Config{RootCAs: pool, ServerName: DefaultServerName, MinVersion: tls.VersionTLS13})
		if err == nil {
			// TLS 1.3: the client learns of the rejection on its first read.
			_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = c.Read(make([]byte, 1))
			_ = c.Close()
		}
		require.Error(t, err)
		assert.Contains(t, err.Error(), "certificate required")
		require.Eventually(t, func() bool { return l.HandshakeFailures() > 0 }, 5*time.Second, 10*time.Millisecond)
	})

	t.Run("missing material is refused before dialling", func(t *testing.T) {
		_, err := Dial(context.Background(), "127.0.0.1:1", Config{CAPEM: good.ca.CertPEM})
		assert.ErrorIs(t, err, ErrBadCertificate)
		_, err = Listen(context.Background(), "127.0.0.1:0", Config{CertPEM: good.server.CertPEM, KeyPEM: good.server.KeyPEM})
		assert.ErrorIs(t, err, ErrBadCertificate)
	})
}

func TestCARoundTrip(t *testing.T) {
	p := newPKI(t)
	ca2, err := LoadCA(p.ca.CertPEM, p.ca.KeyPEM)
	require.NoError(t, err)
	c, err := ca2.IssueClient("again", time.Hour)
	require.NoError(t, err)
	pair, err := tls.X509KeyPair(c.CertPEM, c.KeyPEM)
	require.NoError(t, err)
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	require.NoError(t, err)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(p.ca.CertPEM)
	_, err = leaf.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	assert.NoError(t, err, "a reloaded CA issues certificates the original pins")
	_, err = LoadCA(c.CertPEM, c.KeyPEM)
	assert.ErrorIs(t, err, ErrBadCertificate, "a leaf is not a CA")
}
