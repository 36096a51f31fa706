package nbd

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/hashicorp/go-hclog"
)

// DialOptions configure a client connection.
type DialOptions struct {
	// Export is the export name ("" is the server's default export).
	Export string
	// TLS enables NBD_OPT_STARTTLS with this configuration (RootCAs,
	// client certificates, ServerName...). TLS 1.2 is the minimum.
	TLS *tls.Config
	// PinnedCertPEM enables STARTTLS and accepts exactly the server
	// certificate(s) in this PEM bundle (e.g. the "cert" field that
	// VDI.get_nbd_info returns), instead of CA and host name checks.
	PinnedCertPEM []byte
	// ServerName overrides the name the server certificate is checked
	// against (default: the host part of the address; "localhost" for unix
	// sockets).
	ServerName string
	// DisableStructuredReplies keeps to simple replies; block status then
	// is unavailable.
	DisableStructuredReplies bool
	// MaxInFlight bounds requests in flight on the connection (default 16).
	MaxInFlight int
	// RequestSize caps each READ/WRITE request; larger ReadAt/WriteAt calls
	// are split and pipelined (default and maximum: the server's maximum
	// block size, at most MaxPayload).
	RequestSize int
	Logger      hclog.Logger
}

// ExportInfo describes an export as the server reports it.
type ExportInfo struct {
	Name        string
	Description string
	Size        int64
	Flags       uint16
	// Block size constraints (0 when the server sent none).
	MinBlock, PreferredBlock, MaxBlock uint32
}

// clientHandshake runs the option phase on conn.
type clientHandshake struct {
	conn       net.Conn
	noZeroes   bool
	structured bool
	metaID     uint32
	hasMeta    bool
	tls        bool
	info       ExportInfo
}

func tlsConfigFor(opts DialOptions, addr string) (*tls.Config, error) {
	if opts.TLS == nil && len(opts.PinnedCertPEM) == 0 {
		return nil, nil
	}
	cfg := &tls.Config{}
	if opts.TLS != nil {
		cfg = opts.TLS.Clone()
	}
	if cfg.MinVersion < tls.VersionTLS12 {
		cfg.MinVersion = tls.VersionTLS12
	}
	if opts.ServerName != "" {
		cfg.ServerName = opts.ServerName
	}
	if cfg.ServerName == "" && addr != "" {
		host, _, err := net.SplitHostPort(addr)
		if err != nil {
			host = addr
		}
		cfg.ServerName = host
	}
	if len(opts.PinnedCertPEM) > 0 {
		var pins [][]byte
		rest := opts.PinnedCertPEM
		for {
			var blk *pem.Block
			blk, rest = pem.Decode(rest)
			if blk == nil {
				break
			}
			if blk.Type == "CERTIFICATE" {
				if _, err := x509.ParseCertificate(blk.Bytes); err != nil {
					return nil, fmt.Errorf("nbd: pinned certificate: %w", err)
				}
				pins = append(pins, blk.Bytes)
			}
		}
		if len(pins) == 0 {
			return nil, errors.New("nbd: PinnedCertPEM holds no CERTIFICATE block")
		}
		// The exact-match check below replaces chain and name verification.
		// It is a VerifyConnection (not VerifyPeerCertificate) so that it
		// also runs on resumed sessions.
		cfg.InsecureSkipVerify = true
		cfg.VerifyPeerCertificate = nil
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("nbd: server sent no certificate")
			}
			for _, p := range pins {
				if bytes.Equal(cs.PeerCertificates[0].Raw, p) {
					return nil
				}
			}
			return errors.New("nbd: server certificate does not match the pinned certificate")
		}
	}
	return cfg, nil
}

func (h *clientHandshake) start() error {
	var b [18]byte
	if _, err := io.ReadFull(h.conn, b[:]); err != nil {
		return fmt.Errorf("nbd: read server greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[:]) != nbdMagic {
		return fmt.Errorf("%w: not an NBD server", ErrProtocol)
	}
	if m := binary.BigEndian.Uint64(b[8:]); m != optMagic {
		if m == oldstyleMagic {
			return fmt.Errorf("%w: oldstyle negotiation", ErrUnsupported)
		}
		return fmt.Errorf("%w: bad handshake magic %#x", ErrProtocol, m)
	}
	flags := binary.BigEndian.Uint16(b[16:])
	if flags&flagFixedNewstyle == 0 {
		return fmt.Errorf("%w: server lacks fixed newstyle negotiation", ErrUnsupported)
	}
	cf := clientFlagFixedNewstyle
	if flags&flagNoZeroes != 0 {
		cf |= clientFlagNoZeroes
		h.noZeroes = true
	}
	var out [4]byte
	binary.BigEndian.PutUint32(out[:], cf)
	_, err := h.conn.Write(out[:])
	return err
}

func (h *clientHandshake) sendOpt(opt uint32, data []byte) error {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	_, err := h.conn.Write(b)
	return err
}

// readOptReply reads one option reply; error replies become *OptionError.
func (h *clientHandshake) readOptReply(opt uint32) (uint32, []byte, error) {
	var b [optReplyHdrLen]byte
	if _, err := io.ReadFull(h.conn, b[:]); err != nil {
		return 0, nil, fmt.Errorf("nbd: read option reply: %w", err)
	}
	if m := binary.BigEndian.Uint64(b[:]); m != optReplyMagic {
		return 0, nil, fmt.Errorf("%w: bad option reply magic %#x", ErrProtocol, m)
	}
	if o := binary.BigEndian.Uint32(b[8:]); o != opt {
		return 0, nil, fmt.Errorf("%w: reply to option %d while waiting for %d", ErrProtocol, o, opt)
	}
	typ := binary.BigEndian.Uint32(b[12:])
	n := binary.BigEndian.Uint32(b[16:])
	if n > maxOptionLen {
		return 0, nil, fmt.Errorf("%w: option reply of %d bytes", ErrProtocol, n)
	}
	data := make([]byte, n)
	if _, err := io.ReadFull(h.conn, data); err != nil {
		return 0, nil, fmt.Errorf("nbd: read option reply data: %w", err)
	}
	if typ&repFlagError != 0 {
		return typ, data, &OptionError{Option: opt, Reply: typ, Message: string(data)}
	}
	return typ, data, nil
}

func (h *clientHandshake) startTLS(ctx context.Context, cfg *tls.Config) error {
	if err := h.sendOpt(optStartTLS, nil); err != nil {
		return err
	}
	typ, _, err := h.readOptReply(optStartTLS)
	if err != nil {
		return fmt.Errorf("nbd: STARTTLS: %w", err)
	}
	if typ != repAck {
		return fmt.Errorf("%w: STARTTLS reply %d", ErrProtocol, typ)
	}
	tc := tls.Client(h.conn, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	h.conn = tc
	h.tls = true
	return nil
}

func (h *clientHandshake) negotiateStructured(export string) error {
	if err := h.sendOpt(optStructuredReply, nil); err != nil {
		return err
	}
	typ, _, err := h.readOptReply(optStructuredReply)
	var oe *OptionError
	if errors.As(err, &oe) {
		if oe.Reply == repErrTLSReqd {
			return fmt.Errorf("nbd: structured replies: %w", err)
		}
		return nil // server without structured replies
	}
	if err != nil {
		return err
	}
	if typ != repAck {
		return fmt.Errorf("%w: STRUCTURED_REPLY reply %d", ErrProtocol, typ)
	}
	h.structured = true

	var d []byte
	d = binary.BigEndian.AppendUint32(d, uint32(len(export)))
	d = append(d, export...)
	d = binary.BigEndian.AppendUint32(d, 1)
	d = binary.BigEndian.AppendUint32(d, uint32(len(MetaContextBaseAllocation)))
	d = append(d, MetaContextBaseAllocation...)
	if err := h.sendOpt(optSetMetaContext, d); err != nil {
		return err
	}
	for {
		typ, data, err := h.readOptReply(optSetMetaContext)
		if errors.As(err, &oe) {
			return nil // no block status
		}
		if err != nil {
			return err
		}
		switch typ {
		case repAck:
			return nil
		case repMetaContext:
			if len(data) >= 4 && string(data[4:]) == MetaContextBaseAllocation {
				h.metaID = binary.BigEndian.Uint32(data)
				h.hasMeta = true
			}
		default:
			return fmt.Errorf("%w: SET_META_CONTEXT reply %d", ErrProtocol, typ)
		}
	}
}

// infoGo sends NBD_OPT_INFO or NBD_OPT_GO and collects the export's info.
func (h *clientHandshake) infoGo(opt uint32, export string) error {
	var d []byte
	d = binary.BigEndian.AppendUint32(d, uint32(len(export)))
	d = append(d, export...)
	d = binary.BigEndian.AppendUint16(d, 2)
	d = binary.BigEndian.AppendUint16(d, infoBlockSize)
	d = binary.BigEndian.AppendUint16(d, infoDescription)
	if err := h.sendOpt(opt, d); err != nil {
		return err
	}
	h.info.Name = export
	gotExport := false
	for {
		typ, data, err := h.readOptReply(opt)
		if err != nil {
			return err
		}
		switch typ {
		case repAck:
			if !gotExport {
				return fmt.Errorf("%w: no NBD_INFO_EXPORT before ACK", ErrProtocol)
			}
			return nil
		case repInfo:
			if len(data) < 2 {
				return fmt.Errorf("%w: short NBD_REP_INFO", ErrProtocol)
			}
			switch binary.BigEndian.Uint16(data) {
			case infoExport:
				if len(data) != 12 {
					return fmt.Errorf("%w: NBD_INFO_EXPORT of %d bytes", ErrProtocol, len(data))
				}
				size := binary.BigEndian.Uint64(data[2:])
				if size > 1<<62 {
					return fmt.Errorf("%w: export size %d", ErrProtocol, size)
				}
				h.info.Size = int64(size)
				h.info.Flags = binary.BigEndian.Uint16(data[10:])
				gotExport = true
			case infoBlockSize:
				if len(data) != 14 {
					return fmt.Errorf("%w: NBD_INFO_BLOCK_SIZE of %d bytes", ErrProtocol, len(data))
				}
				h.info.MinBlock = binary.BigEndian.Uint32(data[2:])
				h.info.PreferredBlock = binary.BigEndian.Uint32(data[6:])
				h.info.MaxBlock = binary.BigEndian.Uint32(data[10:])
			case infoDescription:
				h.info.Description = string(data[2:])
			}
		default:
			// Unknown non-error replies are ignored, as the spec asks.
		}
	}
}

// exportName is the fallback for servers without NBD_OPT_GO.
func (h *clientHandshake) exportName(export string) error {
	if err := h.sendOpt(optExportName, []byte(export)); err != nil {
		return err
	}
	n := 10
	if !h.noZeroes {
		n += 124
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(h.conn, b); err != nil {
		return fmt.Errorf("nbd: EXPORT_NAME refused or failed: %w", err)
	}
	h.info.Name = export
	h.info.Size = int64(binary.BigEndian.Uint64(b) & (1<<62 - 1))
	h.info.Flags = binary.BigEndian.Uint16(b[8:])
	return nil
}

func (h *clientHandshake) list() ([]ExportInfo, error) {
	if err := h.sendOpt(optList, nil); err != nil {
		return nil, err
	}
	var out []ExportInfo
	size := 0
	for {
		typ, data, err := h.readOptReply(optList)
		if err != nil {
			return nil, err
		}
		switch typ {
		case repAck:
			return out, nil
		case repServer:
			name, rest, ok := parseString(data)
			if !ok {
				return nil, fmt.Errorf("%w: malformed NBD_REP_SERVER", ErrProtocol)
			}
			// The server decides how many replies come: bound what is kept.
			size += len(data)
			if len(out) >= maxListExports || size > maxListBytes {
				return nil, fmt.Errorf("%w: export list longer than %d exports or %d bytes", ErrProtocol, maxListExports, maxListBytes)
			}
			out = append(out, ExportInfo{Name: name, Description: string(rest)})
		}
	}
}

// Bounds of the export list ListExports accepts.
const (
	maxListExports = 1 << 14
	maxListBytes   = 16 << 20
)

func (h *clientHandshake) abort() {
	if h.sendOpt(optAbort, nil) == nil {
		_ = h.conn.SetReadDeadline(time.Now().Add(time.Second))
		_, _, _ = h.readOptReply(optAbort)
	}
}

// withHandshakeDeadline makes ctx cancel blocking handshake I/O on conn.
func withHandshakeDeadline(ctx context.Context, conn net.Conn) func() {
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	return func() {
		stop()
		_ = conn.SetDeadline(time.Time{})
	}
}

// openHandshake dials and runs greeting and optional STARTTLS.
func openHandshake(ctx context.Context, addr string, conn net.Conn, opts DialOptions) (*clientHandshake, error) {
	cfg, err := tlsConfigFor(opts, addr)
	if err != nil {
		return nil, err
	}
	h := &clientHandshake{conn: conn}
	if err := h.start(); err != nil {
		return nil, err
	}
	if cfg != nil {
		if err := h.startTLS(ctx, cfg); err != nil {
			return nil, err
		}
	}
	return h, nil
}

func dial(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s %s: %w", network, addr, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	return conn, nil
}

// ListExports connects, asks for the export list (NBD_OPT_LIST) and
// disconnects. opts.Export is ignored.
func ListExports(ctx context.Context, network, addr string, opts DialOptions) ([]ExportInfo, error) {
	conn, err := dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	defer withHandshakeDeadline(ctx, conn)()
	h, err := openHandshake(ctx, addr, conn, opts)
	if err != nil {
		return nil, err
	}
	defer h.conn.Close()
	l, err := h.list()
	if err != nil {
		return nil, err
	}
	h.abort()
	return l, nil
}

// QueryExport connects, asks for opts.Export's details (NBD_OPT_INFO) and
// disconnects.
func QueryExport(ctx context.Context, network, addr string, opts DialOptions) (ExportInfo, error) {
	conn, err := dial(ctx, network, addr)
	if err != nil {
		return ExportInfo{}, err
	}
	defer conn.Close()
	defer withHandshakeDeadline(ctx, conn)()
	h, err := openHandshake(ctx, addr, conn, opts)
	if err != nil {
		return ExportInfo{}, err
	}
	defer h.conn.Close()
	if err := h.infoGo(optInfo, opts.Export); err != nil {
		return ExportInfo{}, err
	}
	h.abort()
	return h.info, nil
}
