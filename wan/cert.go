package wan

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"
)

// DefaultServerName is the DNS name put into gateway server certificates and
// verified by dialling sides. The dialled address (often a NAT or port
// forward) is not used for name checks; the pinned per-migration CA is what
// authenticates the peer.
const DefaultServerName = "wanmotion-gateway"

// ErrBadCertificate is returned when PEM material cannot be used.
var ErrBadCertificate = errors.New("wan: bad certificate material")

// CA is a per-migration certificate authority held in memory. Both gateways
// pin it: a peer is accepted only with a certificate it issued.
type CA struct {
	cert    *x509.Certificate
	key     *ecdsa.PrivateKey
	CertPEM []byte // the CA certificate, handed to both sides for pinning
	KeyPEM  []byte // the CA private key; keep it in the controller only
}

// Cert is an issued certificate and its key, PEM encoded.
type Cert struct {
	CertPEM []byte
	KeyPEM  []byte
}

// NewCA mints a fresh ECDSA P-256 CA valid from a minute ago for validity.
func NewCA(name string, validity time.Duration) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("wan: generate ca key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"wanmotion"}},
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("wan: create ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("wan: parse ca certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, err
	}
	return &CA{
		cert:    cert,
		key:     key,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  keyPEM,
	}, nil
}

// LoadCA parses a CA previously minted by NewCA (for a controller that
// resumes from a checkpoint).
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCertificate, err)
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%w: ca key is not ecdsa", ErrBadCertificate)
	}
	cert, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCertificate, err)
	}
	if !cert.IsCA {
		return nil, fmt.Errorf("%w: not a ca certificate", ErrBadCertificate)
	}
	return &CA{cert: cert, key: key, CertPEM: certPEM, KeyPEM: keyPEM}, nil
}

// IssueServer issues a gateway server certificate for the given DNS names
// (DefaultServerName when none) valid for validity.
func (ca *CA) IssueServer(validity time.Duration, names ...string) (*Cert, error) {
	if len(names) == 0 {
		names = []string{DefaultServerName}
	}
	return ca.issue(names[0], names, x509.ExtKeyUsageServerAuth, time.Now().Add(-time.Minute), time.Now().Add(validity))
}

// IssueClient issues a gateway client certificate valid for validity.
func (ca *CA) IssueClient(name string, validity time.Duration) (*Cert, error) {
	return ca.issue(name, nil, x509.ExtKeyUsageClientAuth, time.Now().Add(-time.Minute), time.Now().Add(validity))
}

// IssueWindow issues a certificate with an explicit validity window and usage
// (server when server is true). It exists for tests of expiry handling.
func (ca *CA) IssueWindow(name string, server bool, notBefore, notAfter time.Time) (*Cert, error) {
	usage := x509.ExtKeyUsageClientAuth
	var names []string
	if server {
		usage = x509.ExtKeyUsageServerAuth
		names = []string{name}
	}
	return ca.issue(name, names, usage, notBefore, notAfter)
}

func (ca *CA) issue(cn string, dns []string, usage x509.ExtKeyUsage, notBefore, notAfter time.Time) (*Cert, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("wan: generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"wanmotion"}},
		DNSNames:     dns,
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{usage},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, fmt.Errorf("wan: create certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, err
	}
	return &Cert{CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), KeyPEM: keyPEM}, nil
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("wan: marshal key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		return big.NewInt(time.Now().UnixNano())
	}
	return n
}

// tlsConfig builds the TLS 1.3 configuration for one side. Verification is
// always on and uses only the pinned CA (never the system roots).
func tlsConfig(cfg *Config, server bool) (*tls.Config, error) {
	if len(cfg.CertPEM) == 0 || len(cfg.KeyPEM) == 0 || len(cfg.CAPEM) == 0 {
		return nil, fmt.Errorf("%w: CertPEM, KeyPEM and CAPEM are required", ErrBadCertificate)
	}
	pair, err := tls.X509KeyPair(cfg.CertPEM, cfg.KeyPEM)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadCertificate, err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(cfg.CAPEM) {
		return nil, fmt.Errorf("%w: no ca certificate in CAPEM", ErrBadCertificate)
	}
	tc := &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
	}
	if server {
		tc.ClientAuth = tls.RequireAndVerifyClientCert
		tc.ClientCAs = pool
	} else {
		tc.RootCAs = pool
		tc.ServerName = cfg.ServerName
		if tc.ServerName == "" {
			tc.ServerName = DefaultServerName
		}
	}
	return tc, nil
}
