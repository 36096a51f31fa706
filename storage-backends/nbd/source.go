package nbdstore

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"

	"github.com/wanmotion/wanmotion/nbd"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// source is a read-only view of snapshot Sk.
type source interface {
	Size() int64
	ReadAt(ctx context.Context, p []byte, off int64) error
	// Extents describes allocation from off (at least one extent).
	Extents(ctx context.Context, off, n int64) ([]nbd.Extent, error)
	Close() error
	Kind() string
}

// nbdSource reads xapi's NBD export of the snapshot.
type nbdSource struct{ p *nbd.Pool }

func (s nbdSource) Size() int64  { return s.p.Size() }
func (s nbdSource) Kind() string { return "xapi-nbd" }
func (s nbdSource) Close() error { return s.p.Close() }
func (s nbdSource) ReadAt(ctx context.Context, p []byte, off int64) error {
	return s.p.ReadAt(ctx, p, off)
}
func (s nbdSource) Extents(ctx context.Context, off, n int64) ([]nbd.Extent, error) {
	if !s.p.Clients()[0].CanBlockStatus() {
		return []nbd.Extent{{Offset: off, Length: n}}, nil
	}
	return s.p.BlockStatus(ctx, off, n)
}

// fileSource reads a dom0-attached device (read-only VBD).
type fileSource struct {
	f       *nbd.FileBackend
	size    int64
	release func()
}

func (s *fileSource) Size() int64  { return s.size }
func (s *fileSource) Kind() string { return "dom0" }
func (s *fileSource) Close() error {
	err := s.f.Close()
	if s.release != nil {
		s.release()
	}
	return err
}
func (s *fileSource) ReadAt(_ context.Context, p []byte, off int64) error {
	_, err := s.f.ReadAt(p, off)
	return err
}
func (s *fileSource) Extents(_ context.Context, off, n int64) ([]nbd.Extent, error) {
	return s.f.Extents(off, n)
}

// snapshotRecord resolves a snapshot and checks it still holds data.
func snapshotRecord(ctx context.Context, x *xapi.Client, snap contract.SnapshotRef) (xapi.VDIRef, xapi.VDIRecord, error) {
	ref := xapi.VDIRef(snap.Ref)
	var err error
	if ref == "" {
		if snap.UUID == "" {
			return "", xapi.VDIRecord{}, fmt.Errorf("snapshot has neither ref nor uuid: %w", contract.ErrInvalidArgument)
		}
		if ref, err = x.VDIGetByUUID(ctx, snap.UUID); err != nil {
			if isGone(err) {
				return "", xapi.VDIRecord{}, fmt.Errorf("snapshot %s no longer exists: %w", snap.UUID, contract.ErrFailedPrecondition)
			}
			return "", xapi.VDIRecord{}, xapiErr("snapshot", err)
		}
	}
	rec, err := x.VDIGetRecord(ctx, ref)
	if err != nil {
		if isGone(err) {
			return "", xapi.VDIRecord{}, fmt.Errorf("snapshot %s no longer exists: %w", snap.UUID, contract.ErrFailedPrecondition)
		}
		return "", xapi.VDIRecord{}, xapiErr("snapshot record", err)
	}
	if rec.Type == "cbt_metadata" {
		return "", xapi.VDIRecord{}, fmt.Errorf("snapshot %s has no data (data_destroy): %w", rec.UUID, contract.ErrFailedPrecondition)
	}
	return ref, rec, nil
}

// openSource opens snapshot Sk: xapi's NBD export when VDI.get_nbd_info
// offers one (TLS with the returned certificate pinned), else (auto) a
// read-only attach to the host's dom0.
func (b *Backend) openSource(ctx context.Context, h *handle, snap contract.SnapshotRef, cfg Config) (source, string, error) {
	x, err := h.xapiClient(b)
	if err != nil {
		return nil, "", err
	}
	ref, rec, err := snapshotRecord(ctx, x, snap)
	if err != nil {
		return nil, "", err
	}
	if cfg.SourceAccess != "dom0" {
		infos, err := x.VDIGetNBDInfo(ctx, ref)
		if err != nil {
			return nil, "", xapiErr("VDI.get_nbd_info", err)
		}
		var errs []error
		for _, in := range infos {
			src, err := dialXapiNBD(ctx, in, cfg)
			if err == nil {
				return src, rec.UUID, nil
			}
			errs = append(errs, err)
		}
		if len(errs) > 0 {
			err := errors.Join(errs...)
			if contract.ToWire(err).Code != contract.CodeInternal {
				return nil, "", fmt.Errorf("xapi NBD export of snapshot %s: %w", rec.UUID, err)
			}
			return nil, "", fmt.Errorf("xapi NBD export of snapshot %s: %v: %w", rec.UUID, err, classifyNBD(err))
		}
		if cfg.SourceAccess == "nbd" {
			return nil, "", fmt.Errorf("VDI.get_nbd_info offers no NBD server (no network with purpose nbd): %w", contract.ErrFailedPrecondition)
		}
	}
	vbd, path, err := attachToDom0(ctx, x, h.st.HostUUID, ref, xapi.VBDModeRO, "snapshot:"+h.migration)
	if err != nil {
		return nil, "", fmt.Errorf("attach snapshot to dom0: %w", err)
	}
	h.mu.Lock()
	h.st.VBDRef = string(vbd)
	h.mu.Unlock()
	f, err := nbd.OpenFile(path, true)
	if err != nil {
		detachFromDom0(context.WithoutCancel(ctx), x, vbd)
		return nil, "", fmt.Errorf("open snapshot device %s: %v: %w", path, err, contract.ErrFailedPrecondition)
	}
	size, _ := f.Size()
	return &fileSource{f: f, size: min(size, rec.VirtualSize), release: func() {
		detachFromDom0(context.Background(), x, vbd)
		h.mu.Lock()
		h.st.VBDRef = ""
		h.mu.Unlock()
	}}, rec.UUID, nil
}

func dialXapiNBD(ctx context.Context, in xapi.VDINBDServerInfo, cfg Config) (source, error) {
	addr := net.JoinHostPort(in.Address, strconv.FormatInt(in.Port, 10))
	opts := nbd.DialOptions{Export: in.Exportname, MaxInFlight: 16}
	if in.Cert != "" {
		opts.PinnedCertPEM = []byte(in.Cert)
	} else if !cfg.AllowInsecureNBD {
		// The export name carries the xapi session: never send it in
		// clear unless the administrator allowed it.
		return nil, fmt.Errorf("%s: VDI.get_nbd_info returned no certificate to pin and allow_insecure_nbd is off: %w",
			addr, contract.ErrFailedPrecondition)
	}
	p, err := nbd.DialPool(ctx, "tcp", addr, opts, min(cfg.Connections, 4))
	var oe *nbd.OptionError
	if err != nil && in.Cert != "" && errors.As(err, &oe) && oe.Option == optStartTLS {
		if !cfg.AllowInsecureNBD {
			return nil, fmt.Errorf("%s refuses TLS (network purpose insecure_nbd?) and allow_insecure_nbd is off: %v: %w",
				addr, err, contract.ErrFailedPrecondition)
		}
		opts.PinnedCertPEM = nil // the host serves insecure_nbd
		p, err = nbd.DialPool(ctx, "tcp", addr, opts, min(cfg.Connections, 4))
	}
	if err != nil {
		// The export name carries the xapi session: never print it.
		err = redact(err, in.Exportname)
		if u, perr := url.Parse(in.Exportname); perr == nil {
			err = redact(err, u.Query().Get("session_id"))
		}
		return nil, fmt.Errorf("%s: %w", addr, err)
	}
	return nbdSource{p: p}, nil
}

// optStartTLS is NBD_OPT_STARTTLS.
const optStartTLS = 5

// classifyNBD maps NBD dial/handshake failures to contract errors.
func classifyNBD(err error) error {
	var ne *nbd.Error
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return contract.ErrCancelled
	case errors.Is(err, nbd.ErrPolicy), errors.Is(err, nbd.ErrUnknownExport), errors.Is(err, nbd.ErrPerm):
		return contract.ErrPermissionDenied
	case errors.Is(err, nbd.ErrProtocol), errors.Is(err, nbd.ErrUnsupported), errors.Is(err, nbd.ErrTLSRequired):
		return contract.ErrFailedPrecondition
	case errors.Is(err, nbd.ErrNoSpace):
		return contract.ErrFailedPrecondition
	case errors.As(err, &ne):
		return contract.ErrInternal
	}
	return contract.ErrUnavailable
}

// xapiClient returns the handle's xapi client, opening it from the state.
func (h *handle) xapiClient(b *Backend) (*xapi.Client, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.x != nil {
		return h.x, nil
	}
	x, err := openXAPI(h.st.XAPIURL, h.st.Session, h.st.XAPIPin, b.log)
	if err != nil {
		return nil, err
	}
	h.x = x
	return x, nil
}
