package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
)

// Files in an agent's --tls-dir (PEM, mode 0600, directory 0700).
const (
	FileCA            = "ca.pem"            // the per-migration CA certificate (pinned)
	FileCert          = "agent.pem"         // control server certificate (DNS ServerName(role))
	FileKey           = "agent-key.pem"     // its key
	FileGatewayCert   = "gateway.pem"       // gateway certificate: server (destination) or client (source)
	FileGatewayKey    = "gateway-key.pem"   // its key
	FileControllerCA  = "controller-ca.pem" // optional: CA of the controller's client certificate (default ca.pem)
	ControllerName    = "wanmotion-controller"
	certValidity      = 30 * 24 * time.Hour
	serverNamePrefix  = "wanmotion-agent-"
	gatewayClientName = "wanmotion-gateway-source"
)

// ErrBadTLS: the TLS material is missing, unusable or too widely readable.
var ErrBadTLS = errors.New("agent: bad tls material")

// ServerName is the DNS name in the control certificate of the agent of a
// role; the controller verifies it, so it cannot mix up the two agents.
func ServerName(role contract.Role) string { return serverNamePrefix + string(role) }

// Material is what one agent needs (PEM).
type Material struct {
	CACert           []byte `json:"ca_cert"`
	Cert             []byte `json:"cert"`
	Key              []byte `json:"key"`
	GatewayCert      []byte `json:"gateway_cert"`
	GatewayKey       []byte `json:"gateway_key"`
	ControllerCACert []byte `json:"controller_ca_cert,omitempty"` // empty: CACert
}

// ControllerMaterial is the controller's client identity (PEM).
type ControllerMaterial struct {
	CACert []byte `json:"ca_cert"`
	Cert   []byte `json:"cert"`
	Key    []byte `json:"key"`
}

// Bundle is the whole per-migration PKI: the CA (with its key, which stays
// with the controller), the controller's client certificate and one
// Material per role.
type Bundle struct {
	CACert      []byte             `json:"ca_cert"`
	CAKey       []byte             `json:"ca_key"`
	Controller  ControllerMaterial `json:"controller"`
	Source      Material           `json:"source"`
	Destination Material           `json:"destination"`
}

// NewBundle mints a per-migration CA and every certificate of a migration:
// control server certificates for both agents (ServerName(role)), the
// destination's gateway server certificate, the source's gateway client
// certificate and the controller's client certificate (CN ControllerName).
func NewBundle(migrationID string) (*Bundle, error) {
	ca, err := wan.NewCA("wanmotion migration "+migrationID, certValidity)
	if err != nil {
		return nil, err
	}
	b := &Bundle{CACert: ca.CertPEM, CAKey: ca.KeyPEM}
	ctl, err := ca.IssueClient(ControllerName, certValidity)
	if err != nil {
		return nil, err
	}
	b.Controller = ControllerMaterial{CACert: ca.CertPEM, Cert: ctl.CertPEM, Key: ctl.KeyPEM}
	for _, role := range []contract.Role{contract.RoleSource, contract.RoleDestination} {
		srv, err := ca.IssueServer(certValidity, ServerName(role))
		if err != nil {
			return nil, err
		}
		var gw *wan.Cert
		if role == contract.RoleDestination {
			gw, err = ca.IssueServer(certValidity) // wan.DefaultServerName
		} else {
			gw, err = ca.IssueClient(gatewayClientName, certValidity)
		}
		if err != nil {
			return nil, err
		}
		m := Material{CACert: ca.CertPEM, Cert: srv.CertPEM, Key: srv.KeyPEM, GatewayCert: gw.CertPEM, GatewayKey: gw.KeyPEM}
		if role == contract.RoleSource {
			b.Source = m
		} else {
			b.Destination = m
		}
	}
	return b, nil
}

// For returns the material of an agent role.
func (b *Bundle) For(role contract.Role) Material {
	if role == contract.RoleSource {
		return b.Source
	}
	return b.Destination
}

// WriteDir writes m into dir (created 0700; files 0600).
func (m Material) WriteDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("tls dir: %w", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("tls dir: %w", err)
	}
	files := map[string][]byte{FileCA: m.CACert, FileCert: m.Cert, FileKey: m.Key, FileGatewayCert: m.GatewayCert, FileGatewayKey: m.GatewayKey}
	if len(m.ControllerCACert) > 0 {
		files[FileControllerCA] = m.ControllerCACert
	}
	for name, data := range files {
		if err := writeFile0600(filepath.Join(dir, name), data); err != nil {
			return err
		}
	}
	return nil
}

func writeFile0600(path string, data []byte) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// ReadDir loads an agent's material from dir. Key files readable by group
// or others are refused.
func ReadDir(dir string) (Material, error) {
	var m Material
	read := func(name string, key, optional bool) ([]byte, error) {
		p := filepath.Join(dir, name)
		fi, err := os.Stat(p)
		if optional && errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadTLS, err)
		}
		if key && fi.Mode().Perm()&0o077 != 0 {
			return nil, fmt.Errorf("%w: %s is accessible by group or others (mode %v); want 0600", ErrBadTLS, p, fi.Mode().Perm())
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrBadTLS, err)
		}
		return b, nil
	}
	var err error
	if m.CACert, err = read(FileCA, false, false); err != nil {
		return m, err
	}
	if m.Cert, err = read(FileCert, false, false); err != nil {
		return m, err
	}
	if m.Key, err = read(FileKey, true, false); err != nil {
		return m, err
	}
	if m.GatewayCert, err = read(FileGatewayCert, false, false); err != nil {
		return m, err
	}
	if m.GatewayKey, err = read(FileGatewayKey, true, false); err != nil {
		return m, err
	}
	if m.ControllerCACert, err = read(FileControllerCA, false, true); err != nil {
		return m, err
	}
	return m, nil
}

func certPool(pemData []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("%w: no CA certificate", ErrBadTLS)
	}
	return pool, nil
}

// serverTLS is the agent's control listener configuration: TLS 1.3, this
// agent's certificate, and a client certificate required, chained to the
// controller CA (with client-auth usage) and named ControllerName.
func (m Material) serverTLS() (*tls.Config, error) {
	pair, err := tls.X509KeyPair(m.Cert, m.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: agent certificate: %w", ErrBadTLS, err)
	}
	caPEM := m.ControllerCACert
	if len(caPEM) == 0 {
		caPEM = m.CACert
	}
	pool, err := certPool(caPEM)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
		ClientAuth:   tls.RequireAndVerifyClientCert,
		ClientCAs:    pool,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 || cs.PeerCertificates[0].Subject.CommonName != ControllerName {
				return fmt.Errorf("%w: client certificate is not the controller's", ErrBadTLS)
			}
			return nil
		},
	}, nil
}

// ClientTLS is the controller's configuration for dialling the agent of
// role: its client certificate, the pinned CA, and the agent's name.
func (c ControllerMaterial) ClientTLS(role contract.Role) (*tls.Config, error) {
	pair, err := tls.X509KeyPair(c.Cert, c.Key)
	if err != nil {
		return nil, fmt.Errorf("%w: controller certificate: %w", ErrBadTLS, err)
	}
	pool, err := certPool(c.CACert)
	if err != nil {
		return nil, err
	}
	return &tls.Config{
		MinVersion:   tls.VersionTLS13,
		Certificates: []tls.Certificate{pair},
		RootCAs:      pool,
		ServerName:   ServerName(role),
	}, nil
}
