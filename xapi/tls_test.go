package xapi

import (
	"context"
	"encoding/pem"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTLSVerification(t *testing.T) {
	f := newFakeOn(t, "127.0.0.1:0", true, loginOK("OpaqueRef:s", func(string, []any) string {
		return successXML(xv([]any{}))
	}))
	cert := f.srv.Certificate()
	thumb := Thumbprint(cert.Raw)
	caPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	other := strings.Repeat("AB:", 31) + "AB"

	tests := []struct {
		name    string
		opts    TLSOptions
		wantErr string
	}{
		{"default verifies and rejects an unknown CA", TLSOptions{}, "certificate"},
		{"pinned thumbprint accepted", TLSOptions{Thumbprints: []string{thumb}}, ""},
		{"pin in lower case hex without colons and with prefix", TLSOptions{Thumbprints: []string{
			"sha-256:" + strings.ToLower(strings.ReplaceAll(thumb, ":", ""))}}, ""},
		{"one of several pins", TLSOptions{Thumbprints: []string{other, thumb}}, ""},
		{"wrong pin rejected", TLSOptions{Thumbprints: []string{other}}, "does not match any pinned thumbprint"},
		{"CA PEM accepted", TLSOptions{CAPEM: caPEM}, ""},
		{"CA PEM with wrong server name rejected", TLSOptions{CAPEM: caPEM, ServerName: "xcp.invalid"}, "certificate"},
		{"explicit insecure", TLSOptions{Insecure: true}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newTestClient(t, f.URL(), func(c *Config) { c.TLS = tt.opts })
			err := c.Login(context.Background())
			if tt.wantErr == "" {
				require.NoError(t, err)
				_, err = c.VMGetAll(context.Background())
				require.NoError(t, err)
				// whatever the trust mode, the verified server certificate
				// is what a backend reusing the session is told to pin
				assert.Equal(t, string(caPEM), c.PeerCertificatePEM())
				return
			}
			require.Error(t, err)
			assert.Empty(t, c.PeerCertificatePEM(), "a rejected certificate is not remembered")
			assert.Contains(t, err.Error(), tt.wantErr)
			if strings.Contains(tt.wantErr, "pinned") {
				assert.ErrorIs(t, err, ErrCertificateNotPinned)
			}
		})
	}
}

func TestTLSOptionErrors(t *testing.T) {
	_, err := New(Config{URL: "https://x", TLS: TLSOptions{Thumbprints: []string{"abc"}}})
	assert.Error(t, err)
	_, err = New(Config{URL: "https://x", TLS: TLSOptions{CAFile: "/nonexistent/ca.pem"}})
	assert.Error(t, err)
	_, err = New(Config{URL: "https://x", TLS: TLSOptions{CAPEM: []byte("not pem")}})
	assert.Error(t, err)
}

func TestThumbprintFormat(t *testing.T) {
	tp := Thumbprint([]byte("x"))
	assert.Len(t, tp, 32*3-1)
	assert.Equal(t, strings.ToUpper(tp), tp)
	b, err := parseThumbprint(tp)
	require.NoError(t, err)
	assert.Len(t, b, 32)
}
