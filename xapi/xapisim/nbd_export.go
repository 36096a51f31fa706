package xapisim

// NBD exports, as xapi-nbd serves them: VDI.get_nbd_info, a per-host
// read-only NBD listener (TLS when a network of the host has purpose
// "nbd", plain with "insecure_nbd"), export names "/<vdi-uuid>?session_id=<ref>"
// checked against the pool's sessions, and each host's self-signed server
// certificate (host.get_server_certificate).

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/wanmotion/wanmotion/nbd"
)

// NBDPort is the port real xapi-nbd listens on. The simulator listens on a
// free per-host loopback port instead and reports that one.
const NBDPort = 10809

// Network purposes (network_purpose enum).
const (
	PurposeNBD         = "nbd"
	PurposeInsecureNBD = "insecure_nbd"
)

// nbdService is one host's NBD listener and server certificate.
type nbdService struct {
	port    int
	certPEM []byte
	subject string
}

// hostServices holds the per-host services started by the start hooks,
// keyed by *Host.
var hostServices sync.Map

func nbdServiceOf(h *Host) *nbdService {
	v, ok := hostServices.Load(h)
	if !ok {
		return nil
	}
	return v.(*nbdService)
}

var _ = addRegistrar(registerNBD)

func registerNBD() {
	Register(&Method{Name: "VDI.get_nbd_info", NoAsync: true, Params: []Param{p("self", KRef)}, Handler: vdiGetNBDInfo})
	Register(&Method{Name: "host.get_server_certificate", Params: []Param{p("host", KRef)}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("host", c.Str(0))
		if err != nil {
			return nil, err
		}
		for _, h := range c.Pool.hosts {
			if h.Ref == o.Ref {
				if svc := nbdServiceOf(h); svc != nil {
					return string(svc.certPEM), nil
				}
			}
		}
		return "", nil
	}})
}

// vdiGetNBDInfo implements VDI.get_nbd_info as xapi_vdi.ml _get_nbd_info:
// one record per IP of the attached PIFs on networks with an NBD purpose,
// on the hosts with an attached PBD for the VDI's SR.
func vdiGetNBDInfo(c *Call) (any, error) {
	d := c.db()
	o, err := d.get("VDI", c.Str(0))
	if err != nil {
		return nil, err
	}
	if o.str("type") == "cbt_metadata" {
		return nil, Errorf(ErrVDIIncompatibleType, o.Ref, "cbt_metadata")
	}
	out := []any{}
	exportName := fmt.Sprintf("/%s?session_id=%s", o.str("uuid"), c.Session)
	for _, h := range c.Pool.hosts {
		attached := false
		for _, pbd := range d.find("PBD", "host", h.Ref) {
			if pbd.str("SR") == o.str("SR") && pbd.bool("currently_attached") {
				attached = true
			}
		}
		svc := nbdServiceOf(h)
		if !attached || svc == nil {
			continue
		}
		for _, pif := range d.find("PIF", "host", h.Ref) {
			nw, err := d.get("network", pif.str("network"))
			if err != nil || !pif.bool("currently_attached") {
				continue
			}
			purposes, _ := nw.Fields["purpose"].([]string)
			if !slices.Contains(purposes, PurposeNBD) && !slices.Contains(purposes, PurposeInsecureNBD) {
				continue
			}
			addrs := []string{}
			if ip := pif.str("IP"); ip != "" {
				addrs = append(addrs, ip)
			}
			ip6s, _ := pif.Fields["IPv6"].([]string)
			for _, ip6 := range ip6s {
				if a, _, _ := strings.Cut(ip6, "/"); a != "" {
					addrs = append(addrs, a)
				}
			}
			for _, a := range addrs {
				out = append(out, map[string]any{
					"address":    a,
					"port":       int64(svc.port),
					"exportname": exportName,
					"cert":       string(svc.certPEM),
					"subject":    svc.subject,
				})
			}
		}
	}
	return out, nil
}

// nbdMode returns the purpose deciding how host h serves NBD now: "nbd"
// (TLS required), "insecure_nbd" (plain) or "" (refuse: no purpose, or
// both, which makes xapi-nbd refuse too).
func (h *Host) nbdMode() string {
	p := h.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	var tlsOn, plainOn bool
	for _, pif := range p.db.find("PIF", "host", h.Ref) {
		nw, err := p.db.get("network", pif.str("network"))
		if err != nil {
			continue
		}
		purposes, _ := nw.Fields["purpose"].([]string)
		tlsOn = tlsOn || slices.Contains(purposes, PurposeNBD)
		plainOn = plainOn || slices.Contains(purposes, PurposeInsecureNBD)
	}
	switch {
	case tlsOn && plainOn:
		return ""
	case tlsOn:
		return PurposeNBD
	case plainOn:
		return PurposeInsecureNBD
	}
	return ""
}

// nbdExports resolves export names for host h: "/<vdi-uuid>?session_id=<ref>",
// parsed as a URI as xapi-nbd does. The session must be valid in h's pool
// and the VDI's SR attached to h.
func (s *Sim) nbdExports(h *Host) nbd.ExportFunc {
	return func(_ context.Context, name string) (*nbd.Export, error) {
		u, err := url.Parse(name)
		if err != nil {
			return nil, fmt.Errorf("%w: export name is not a URI", nbd.ErrUnknownExport)
		}
		uuid := strings.TrimPrefix(u.Path, "/")
		sess := u.Query().Get("session_id")
		p := h.pool
		p.mu.Lock()
		if _, err := p.db.get("session", sess); err != nil || sess == "" {
			p.mu.Unlock()
			s.log.Info("nbd export refused: invalid session", "host", h.Name, "vdi", uuid)
			return nil, fmt.Errorf("%w: invalid session", nbd.ErrPolicy)
		}
		o, err := p.db.byUUID("VDI", uuid)
		if err != nil || o.str("type") == "cbt_metadata" {
			p.mu.Unlock()
			return nil, fmt.Errorf("%w: no VDI %q", nbd.ErrUnknownExport, uuid)
		}
		attached := false
		for _, pbd := range p.db.find("PBD", "host", h.Ref) {
			attached = attached || (pbd.str("SR") == o.str("SR") && pbd.bool("currently_attached"))
		}
		path := p.vdiPath(o)
		desc := o.str("name_label")
		p.mu.Unlock()
		if !attached {
			return nil, fmt.Errorf("%w: SR of VDI %q not attached to %s", nbd.ErrPolicy, uuid, h.Name)
		}
		be, err := nbd.OpenFile(path, true)
		if err != nil {
			return nil, fmt.Errorf("open VDI %s: %w", uuid, err)
		}
		return &nbd.Export{Name: name, Description: desc, Backend: be, ReadOnly: true, MultiConn: true,
			Release: func() { _ = be.Close() }}, nil
	}
}

func init() { RegisterStartHook(startNBD) }

// startNBD starts every host's NBD listener on its own IP and a free port.
func startNBD(ctx context.Context, s *Sim) (func(), error) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var wg sync.WaitGroup
	var lns []net.Listener
	var hosts []*Host
	stop := func() {
		cancel()
		for _, ln := range lns {
			_ = ln.Close()
		}
		wg.Wait()
		for _, h := range hosts {
			hostServices.Delete(h)
		}
	}
	for _, p := range s.pools {
		for _, h := range p.hosts {
			certPEM, keyPEM, err := s.hostCert(h)
			if err != nil {
				stop()
				return nil, err
			}
			cert, err := tls.X509KeyPair(certPEM, keyPEM)
			if err != nil {
				stop()
				return nil, fmt.Errorf("host %s certificate: %w", h.Name, err)
			}
			log := s.log.Named("nbd").With("host", h.Name)
			tlsSrv, err := nbd.NewServer(nbd.ServerOptions{Exports: s.nbdExports(h), Logger: log,
				TLS: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, RequireTLS: true})
			if err != nil {
				stop()
				return nil, err
			}
			plainSrv, err := nbd.NewServer(nbd.ServerOptions{Exports: s.nbdExports(h), Logger: log})
			if err != nil {
				stop()
				return nil, err
			}
			var lc net.ListenConfig
			ln, err := lc.Listen(ctx, "tcp", net.JoinHostPort(h.IP(), "0"))
			if err != nil {
				stop()
				return nil, fmt.Errorf("nbd listener for %s: %w", h.Name, err)
			}
			lns = append(lns, ln)
			hosts = append(hosts, h)
			hostServices.Store(h, &nbdService{port: ln.Addr().(*net.TCPAddr).Port, certPEM: certPEM, subject: h.Name})
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.acceptNBD(ctx, h, ln, tlsSrv, plainSrv, &wg)
			}()
			log.Debug("nbd listening", "address", ln.Addr().String())
		}
	}
	return stop, nil
}

// acceptNBD accepts connections until ln closes, serving each with TLS or
// plain NBD as the host's network purposes say at accept time.
func (s *Sim) acceptNBD(ctx context.Context, h *Host, ln net.Listener, tlsSrv, plainSrv *nbd.Server, wg *sync.WaitGroup) {
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		var srv *nbd.Server
		switch h.nbdMode() {
		case PurposeNBD:
			srv = tlsSrv
		case PurposeInsecureNBD:
			srv = plainSrv
		default:
			s.log.Info("nbd connection refused: no network with an nbd purpose", "host", h.Name)
			_ = conn.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.ServeConn(ctx, conn); err != nil && ctx.Err() == nil {
				s.log.Debug("nbd connection ended", "host", h.Name, "error", err)
			}
		}()
	}
}

// HostCertPath returns where host h's server certificate and key (PEM) are
// kept: <state-dir>/<host>/etc/xensource/xapi-ssl.pem, as on a real host.
func (s *Sim) HostCertPath(h *Host) string {
	return filepath.Join(s.cfg.StateDir, h.Name, "etc", "xensource", "xapi-ssl.pem")
}

// hostCert loads host h's certificate, or makes a new self-signed one
// (subject CN and DNS name = host name, IP SAN = the host's IP) when none
// is saved or the saved one does not name the host's current IP.
func (s *Sim) hostCert(h *Host) (certPEM, keyPEM []byte, err error) {
	path := s.HostCertPath(h)
	if b, err := os.ReadFile(path); err == nil {
		certPEM, keyPEM = splitPEM(b)
		if blk, _ := pem.Decode(certPEM); blk != nil && keyPEM != nil {
			if c, err := x509.ParseCertificate(blk.Bytes); err == nil && c.VerifyHostname(h.IP()) == nil &&
				time.Now().Before(c.NotAfter) {
				return certPEM, keyPEM, nil
			}
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("host %s key: %w", h.Name, err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		return nil, nil, err
	}
	now := time.Now().UTC()
	tmpl := &x509.Certificate{
		SerialNumber: serial, Subject: pkix.Name{CommonName: h.Name},
		NotBefore: now.Add(-time.Hour), NotAfter: now.AddDate(10, 0, 0),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:    []string{h.Name}, BasicConstraintsValid: true, IsCA: true,
	}
	if ip := net.ParseIP(h.IP()); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, fmt.Errorf("host %s certificate: %w", h.Name, err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, nil, fmt.Errorf("host %s certificate dir: %w", h.Name, err)
	}
	if err := os.WriteFile(path, append(slices.Clone(keyPEM), certPEM...), 0o600); err != nil {
		return nil, nil, fmt.Errorf("save host %s certificate: %w", h.Name, err)
	}
	s.log.Info("host certificate created", "host", h.Name, "path", path)
	return certPEM, keyPEM, nil
}

// splitPEM separates a key+certificate PEM file into its parts.
func splitPEM(b []byte) (certPEM, keyPEM []byte) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return certPEM, keyPEM
		}
		if blk.Type == "CERTIFICATE" {
			certPEM = append(certPEM, pem.EncodeToMemory(blk)...)
		} else if strings.Contains(blk.Type, "PRIVATE KEY") {
			keyPEM = pem.EncodeToMemory(blk)
		}
	}
}
