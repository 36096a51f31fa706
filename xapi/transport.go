package xapi

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/kolo/xmlrpc"

	"github.com/wanmotion/wanmotion/xapi/wire"
)

// TLSOptions selects how the server certificate is verified. The default (all
// fields empty) verifies against the system roots and the host name.
type TLSOptions struct {
	// CAFile is a PEM file of CA (or self-signed host) certificates to trust
	// instead of the system roots. The host name is still verified.
	CAFile string
	// CAPEM is the same as CAFile, inline.
	CAPEM []byte
	// Thumbprints pins server certificates by the SHA-256 of their DER form
	// (hex, case-insensitive, colons and a "sha256:"/"sha-256:" prefix
	// allowed). When set, a server is accepted if and only if its leaf
	// certificate matches one of them; chain and host name are not checked.
	// Pin every pool member you may be redirected to.
	Thumbprints []string
	// ServerName overrides the name verified in the certificate.
	ServerName string
	// Insecure disables all verification. Only for tests and labs.
	Insecure bool
}

// Thumbprint returns the SHA-256 thumbprint of a DER certificate in the form
// xapi and openssl print: upper-case hex pairs separated by colons.
func Thumbprint(der []byte) string {
	sum := sha256.Sum256(der)
	h := strings.ToUpper(hex.EncodeToString(sum[:]))
	var b strings.Builder
	for i := 0; i < len(h); i += 2 {
		if i > 0 {
			b.WriteByte(':')
		}
		b.WriteString(h[i : i+2])
	}
	return b.String()
}

// ErrCertificateNotPinned is returned (wrapped) when a pinned server presents
// a certificate whose thumbprint is not in TLSOptions.Thumbprints.
var ErrCertificateNotPinned = errors.New("xapi: server certificate does not match any pinned thumbprint")

func parseThumbprint(s string) ([]byte, error) {
	s = strings.ToLower(strings.TrimSpace(s))
	for _, p := range []string{"sha-256:", "sha256:"} {
		s = strings.TrimPrefix(s, p)
	}
	s = strings.NewReplacer(":", "", " ", "").Replace(s)
	b, err := hex.DecodeString(s)
	if err != nil || len(b) != sha256.Size {
		return nil, fmt.Errorf("xapi: bad SHA-256 thumbprint %q", s)
	}
	return b, nil
}

func (o TLSOptions) config() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: o.ServerName}
	switch {
	case o.Insecure:
		cfg.InsecureSkipVerify = true
	case len(o.Thumbprints) > 0:
		pins := make([][]byte, 0, len(o.Thumbprints))
		for _, t := range o.Thumbprints {
			p, err := parseThumbprint(t)
			if err != nil {
				return nil, err
			}
			pins = append(pins, p)
		}
		// Chain verification is replaced by the pin check below. It runs in
		// VerifyConnection, which (unlike VerifyPeerCertificate) also runs on
		// resumed TLS sessions.
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return ErrCertificateNotPinned
			}
			raw := cs.PeerCertificates[0].Raw
			sum := sha256.Sum256(raw)
			for _, p := range pins {
				if subtle.ConstantTimeCompare(p, sum[:]) == 1 {
					return nil
				}
			}
			return fmt.Errorf("%w (got %s)", ErrCertificateNotPinned, Thumbprint(raw))
		}
	case o.CAFile != "" || len(o.CAPEM) > 0:
		pem := o.CAPEM
		if o.CAFile != "" {
			b, err := os.ReadFile(o.CAFile)
			if err != nil {
				return nil, fmt.Errorf("xapi: read CA file: %w", err)
			}
			pem = append(append([]byte{}, pem...), b...)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, errors.New("xapi: no PEM certificates in the CA file")
		}
		cfg.RootCAs = pool
	}
	return cfg, nil
}

// peerCert remembers the leaf certificate of the last TLS handshake that
// passed verification, so that a backend given the client's session can be
// told to trust exactly the server the client trusted (PeerCertificatePEM).
type peerCert struct {
	mu  sync.Mutex
	raw []byte
}

// wrap makes cfg record the verified peer certificate (after any check
// cfg already makes).
func (p *peerCert) wrap(cfg *tls.Config) {
	next := cfg.VerifyConnection
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if next != nil {
			if err := next(cs); err != nil {
				return err
			}
		}
		if len(cs.PeerCertificates) > 0 {
			p.mu.Lock()
			p.raw = append(p.raw[:0:0], cs.PeerCertificates[0].Raw...)
			p.mu.Unlock()
		}
		return nil
	}
}

// PeerCertificatePEM returns the PEM of the server certificate of the
// client's last verified TLS handshake of an API call, i.e. of the pool
// coordinator it talks to ("" before one, and for http or a local socket). Give it to a process that reuses the client's session as
// its pin (e.g. contract.XAPIAccess.TLSPin): it then trusts exactly the
// server this client verified, self-signed pool certificates included.
func (c *Client) PeerCertificatePEM() string {
	if c.peer == nil {
		return ""
	}
	c.peer.mu.Lock()
	defer c.peer.mu.Unlock()
	if len(c.peer.raw) == 0 {
		return ""
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.peer.raw}))
}

func newHTTPClient(tlsCfg *tls.Config, maxIdle int) *http.Client {
	tr := &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: 15 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsCfg.Clone(),
		TLSHandshakeTimeout:   15 * time.Second,
		MaxIdleConnsPerHost:   maxIdle,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: 5 * time.Second,
		ForceAttemptHTTP2:     false,
	}
	return &http.Client{Transport: tr}
}

// maxResponse bounds an XML-RPC response body (get_all_records on a big pool
// is tens of MiB).
const maxResponse = 512 << 20

// envelope is xapi's result struct.
type envelope struct {
	Status           string   `xmlrpc:"Status"`
	Value            any      `xmlrpc:"Value"`
	ErrorDescription []string `xmlrpc:"ErrorDescription"`
}

// roundTrip performs one XML-RPC call against endpoint (a URL ending in "/")
// and returns the decoded Value, an *APIError for a Failure, or a transport
// or protocol error.
func roundTrip(ctx context.Context, hc *http.Client, endpoint, method string, args []any) (any, error) {
	if !validMethod(method) {
		return nil, fmt.Errorf("xapi: invalid method name %q", method)
	}
	wargs := make([]any, 0, len(args))
	for i, a := range args {
		w, err := toWire(a)
		if err != nil {
			return nil, fmt.Errorf("xapi: %s: param %d: %w", method, i, err)
		}
		wargs = append(wargs, w)
	}
	req, err := xmlrpc.NewRequest(endpoint, method, wargs)
	if err != nil {
		return nil, fmt.Errorf("xapi: %s: build request: %w", method, err)
	}
	req = req.WithContext(ctx)
	req.Header.Set("User-Agent", "wanmotion-xapi")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, &TransportError{Method: method, Err: unwrapURLError(err)}
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse+1))
	if err != nil {
		return nil, &TransportError{Method: method, Err: fmt.Errorf("read response: %w", err)}
	}
	if resp.StatusCode != http.StatusOK {
		return nil, protocolErrorf("%s: HTTP %s", method, resp.Status)
	}
	if len(body) > maxResponse {
		return nil, protocolErrorf("%s: response larger than %d bytes", method, maxResponse)
	}
	return decodeResponse(method, body)
}

// validMethod accepts XenAPI wire names ("VM.get_record", "Async.VM.snapshot",
// "system.listMethods"); kolo writes the name into the XML unescaped.
func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for _, r := range m {
		if !(r == '.' || r == '_' || r == '-' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

// decodeResponse normalises and decodes a methodResponse body.
func decodeResponse(method string, body []byte) (any, error) {
	norm, err := wire.Normalise(body)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrProtocol, method, err)
	}
	r := xmlrpc.Response(norm)
	if err := r.Err(); err != nil {
		// xapi never sends <fault>; a proxy or a foreign server might.
		return nil, fmt.Errorf("%w: %s: %w", ErrProtocol, method, err)
	}
	if !bytes.Contains(norm, []byte("<value>")) {
		return nil, protocolErrorf("%s: response has no value", method)
	}
	var env envelope
	if err := r.Unmarshal(&env); err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrProtocol, method, err)
	}
	switch env.Status {
	case "Success":
		return env.Value, nil
	case "Failure":
		if len(env.ErrorDescription) == 0 {
			return nil, protocolErrorf("%s: Failure without ErrorDescription", method)
		}
		return nil, &APIError{Method: method, Code: env.ErrorDescription[0], Params: env.ErrorDescription[1:]}
	default:
		return nil, protocolErrorf("%s: unexpected Status %q", method, env.Status)
	}
}

// TransportError is a failure to reach the server or read its reply. The
// request may or may not have reached xapi.
type TransportError struct {
	Method string
	Err    error
}

func (e *TransportError) Error() string { return "xapi: " + e.Method + ": " + e.Err.Error() }
func (e *TransportError) Unwrap() error { return e.Err }

// unwrapURLError drops *url.Error's URL (it may carry a session_id query).
func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return fmt.Errorf("%s: %w", ue.Op, ue.Err)
	}
	return err
}

// isDialError reports whether err happened before the request could be sent.
func isDialError(err error) bool {
	var op *net.OpError
	if errors.As(err, &op) && op.Op == "dial" {
		return true
	}
	var dns *net.DNSError
	return errors.As(err, &dns)
}
