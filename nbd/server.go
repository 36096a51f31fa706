package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Export is one export a Server offers.
type Export struct {
	Name        string
	Description string
	Backend     Backend
	// ReadOnly refuses WRITE, TRIM and WRITE_ZEROES with EPERM. A backend
	// with a ReadOnly() bool method returning true is always read-only.
	ReadOnly bool
	// MultiConn advertises NBD_FLAG_CAN_MULTI_CONN: the backend's Sync
	// covers writes made through every connection (true for FileBackend).
	MultiConn bool
	// Release, if set, is called once when the server is done with this
	// *Export for the connection that resolved it: after answering
	// NBD_OPT_INFO, when the handshake fails, or when transmission ends.
	// Use it to close a backend opened by the ExportFunc per connection.
	Release func()
}

func (e *Export) release() {
	if e != nil && e.Release != nil {
		e.Release()
	}
}

// ExportFunc resolves the export name a client asked for. Return an error
// wrapping ErrUnknownExport to answer NBD_REP_ERR_UNKNOWN; any other error
// (ErrPolicy for instance) answers NBD_REP_ERR_POLICY. The name is whatever
// the client sent, e.g. "/<vdi-uuid>?session_id=<ref>". The server never
// logs names, but it logs refusal errors: keep secrets out of them.
type ExportFunc func(ctx context.Context, name string) (*Export, error)

// ListFunc returns the exports NBD_OPT_LIST shows (Name and Description).
type ListFunc func(ctx context.Context) ([]*Export, error)

// StaticExports returns an ExportFunc and a ListFunc serving a fixed set of
// exports. The empty name selects the export named "" if any, else the
// first one.
func StaticExports(exports ...*Export) (ExportFunc, ListFunc) {
	byName := make(map[string]*Export, len(exports))
	for _, e := range exports {
		byName[e.Name] = e
	}
	lookup := func(_ context.Context, name string) (*Export, error) {
		if e, ok := byName[name]; ok {
			return e, nil
		}
		if name == "" && len(exports) > 0 {
			return exports[0], nil
		}
		return nil, fmt.Errorf("%w: %q", ErrUnknownExport, name)
	}
	list := func(context.Context) ([]*Export, error) { return exports, nil }
	return lookup, list
}

// ServerOptions configure a Server.
type ServerOptions struct {
	Exports ExportFunc
	// List answers NBD_OPT_LIST; nil refuses listing with NBD_REP_ERR_POLICY.
	List ListFunc
	// TLS enables NBD_OPT_STARTTLS (minimum version forced to TLS 1.2).
	TLS *tls.Config
	// RequireTLS refuses every option but STARTTLS and ABORT before TLS.
	RequireTLS bool
	Logger     hclog.Logger
	// MaxInFlight bounds requests processed at once per connection (default 16).
	MaxInFlight int
	// MaxBufferBytes bounds payload memory per connection (default 64 MiB,
	// at least MaxPayload).
	MaxBufferBytes int64
	// HandshakeTimeout bounds the option haggling phase (default 30 s).
	HandshakeTimeout time.Duration
}

// Server serves NBD exports.
type Server struct {
	opts   ServerOptions
	log    hclog.Logger
	tls    *tls.Config
	active atomic.Int64
}

// ActiveConns is the number of connections being served right now.
func (s *Server) ActiveConns() int { return int(s.active.Load()) }

// NewServer returns a server; it fails when no export resolver is given or
// TLS is required without a TLS configuration.
func NewServer(opts ServerOptions) (*Server, error) {
	if opts.Exports == nil {
		return nil, errors.New("nbd: ServerOptions.Exports is required")
	}
	if opts.RequireTLS && opts.TLS == nil {
		return nil, errors.New("nbd: RequireTLS needs ServerOptions.TLS")
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 16
	}
	if opts.MaxBufferBytes < MaxPayload {
		opts.MaxBufferBytes = 2 * MaxPayload
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 30 * time.Second
	}
	s := &Server{opts: opts, log: opts.Logger}
	if s.log == nil {
		s.log = hclog.NewNullLogger()
	}
	if opts.TLS != nil {
		s.tls = opts.TLS.Clone()
		if s.tls.MinVersion < tls.VersionTLS12 {
			s.tls.MinVersion = tls.VersionTLS12
		}
	}
	return s, nil
}

// Serve accepts connections on ln until ctx is done, then closes ln and
// every connection and returns nil after all of them have finished.
//
// Serve owns ln: it is closed whenever Serve returns. On a permanent accept
// error (the listener was closed by someone else, or failed) ln is closed at
// once, so its port is released and new clients are refused rather than
// left hanging; the connections already open keep being served until they
// end or ctx is done, and then Serve returns the error. Temporary errors
// (EMFILE, ECONNABORTED...) are retried with a backoff.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { _ = ln.Close() })
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer func() { _ = ln.Close() }() // before the Wait: nothing more is accepted
	var backoff time.Duration
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if temporaryAccept(err) {
				// Out of file descriptors, a connection aborted before
				// accept...: keep serving, as net/http does.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed, retrying", "error", err, "backoff", backoff)
				select {
				case <-ctx.Done():
					return nil
				case <-time.After(backoff):
				}
				continue
			}
			return fmt.Errorf("nbd: accept: %w", err)
		}
		backoff = 0
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.ServeConn(ctx, conn); err != nil {
				s.log.Debug("connection ended", "remote", conn.RemoteAddr().String(), "error", err)
			}
		}()
	}
}

// temporaryAccept reports an accept error after which the listener still
// works (EMFILE, ENFILE, ECONNABORTED...).
func temporaryAccept(err error) bool {
	var t interface{ Temporary() bool }
	return errors.As(err, &t) && t.Temporary()
}

var errAbort = errors.New("nbd: client aborted the handshake")

// ServeConn runs the protocol on one connection until the client
// disconnects or ctx is done, and closes conn. A clean disconnect (DISC or
// ABORT) returns nil.
func (s *Server) ServeConn(ctx context.Context, conn net.Conn) error {
	s.active.Add(1)
	defer s.active.Add(-1)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()
	defer conn.Close()
	c := &serverConn{s: s, raw: conn, conn: conn, log: s.log.With("remote", addrString(conn.RemoteAddr()))}
	defer func() { c.exp.release() }()
	c.r = bufio.NewReaderSize(conn, 64<<10)
	c.w = bufio.NewWriterSize(conn, 64<<10)
	_ = conn.SetDeadline(time.Now().Add(s.opts.HandshakeTimeout))
	err := c.handshake(ctx)
	if errors.Is(err, errAbort) {
		return nil
	}
	if err != nil {
		return err
	}
	_ = conn.SetDeadline(time.Time{})
	return c.transmit(ctx)
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

type serverConn struct {
	s    *Server
	log  hclog.Logger
	raw  net.Conn
	conn net.Conn // raw, or the TLS conn over it
	r    *bufio.Reader
	wmu  sync.Mutex
	w    *bufio.Writer

	noZeroes   bool
	tlsDone    bool
	structured bool
	metaAlloc  bool

	exp      *Export
	size     int64
	readOnly bool
	flags    uint16
}

// ---- handshake ----

func (c *serverConn) handshake(ctx context.Context) error {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, nbdMagic)
	b = binary.BigEndian.AppendUint64(b, optMagic)
	b = binary.BigEndian.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
	if _, err := c.w.Write(b); err != nil {
		return err
	}
	if err := c.w.Flush(); err != nil {
		return err
	}
	var cf [4]byte
	if _, err := io.ReadFull(c.r, cf[:]); err != nil {
		return fmt.Errorf("nbd: read client flags: %w", err)
	}
	flags := binary.BigEndian.Uint32(cf[:])
	if flags&^(clientFlagFixedNewstyle|clientFlagNoZeroes) != 0 || flags&clientFlagFixedNewstyle == 0 {
		return fmt.Errorf("%w: unsupported client flags %#x", ErrProtocol, flags)
	}
	c.noZeroes = flags&clientFlagNoZeroes != 0

	for range 1024 {
		var h [optHdrLen]byte
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			return fmt.Errorf("nbd: read option: %w", err)
		}
		if m := binary.BigEndian.Uint64(h[:]); m != optMagic {
			return fmt.Errorf("%w: bad option magic %#x", ErrProtocol, m)
		}
		opt := binary.BigEndian.Uint32(h[8:])
		n := binary.BigEndian.Uint32(h[12:])
		if n > maxOptionLen {
			if opt == optExportName {
				return fmt.Errorf("%w: export name of %d bytes", ErrProtocol, n)
			}
			if _, err := io.CopyN(io.Discard, c.r, int64(n)); err != nil {
				return err
			}
			if err := c.optReply(opt, repErrTooBig, []byte("option too long")); err != nil {
				return err
			}
			continue
		}
		data := make([]byte, n)
		if _, err := io.ReadFull(c.r, data); err != nil {
			return fmt.Errorf("nbd: read option data: %w", err)
		}
		if c.s.opts.RequireTLS && !c.tlsDone && opt != optStartTLS && opt != optAbort {
			if opt == optExportName {
				return fmt.Errorf("%w: EXPORT_NAME before STARTTLS", ErrTLSRequired)
			}
			if err := c.optReply(opt, repErrTLSReqd, []byte("TLS is required")); err != nil {
				return err
			}
			continue
		}
		done, err := c.option(ctx, opt, data)
		if err != nil || done {
			return err
		}
	}
	return fmt.Errorf("%w: too many options", ErrProtocol)
}

// option handles one option; done means transmission starts.
func (c *serverConn) option(ctx context.Context, opt uint32, data []byte) (bool, error) {
	switch opt {
	case optAbort:
		_ = c.optReply(opt, repAck, nil)
		return false, errAbort
	case optStartTLS:
		return false, c.startTLS(ctx, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optReply(opt, repErrInvalid, []byte("no data expected"))
		}
		c.structured = true
		return false, c.optReply(opt, repAck, nil)
	case optList:
		return false, c.list(ctx, data)
	case optSetMetaContext, optListMetaContext:
		return false, c.metaContext(opt, data)
	case optInfo, optGo:
		return c.infoGo(ctx, opt, data)
	case optExportName:
		return true, c.exportName(ctx, data)
	default:
		return false, c.optReply(opt, repErrUnsup, []byte("option not supported"))
	}
}

func (c *serverConn) optReply(opt, typ uint32, data []byte) error {
	var b []byte
	b = binary.BigEndian.AppendUint64(b, optReplyMagic)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	b = append(b, data...)
	if _, err := c.w.Write(b); err != nil {
		return err
	}
	return c.w.Flush()
}

func (c *serverConn) startTLS(ctx context.Context, data []byte) error {
	switch {
	case len(data) != 0:
		return c.optReply(optStartTLS, repErrInvalid, []byte("no data expected"))
	case c.s.tls == nil:
		return c.optReply(optStartTLS, repErrPolicy, []byte("TLS not configured"))
	case c.tlsDone:
		return c.optReply(optStartTLS, repErrInvalid, []byte("TLS already negotiated"))
	}
	if c.r.Buffered() > 0 {
		return fmt.Errorf("%w: data sent before STARTTLS reply", ErrProtocol)
	}
	if err := c.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	tc := tls.Server(c.raw, c.s.tls)
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("nbd: TLS handshake: %w", err)
	}
	c.conn = tc
	c.r.Reset(tc)
	c.w.Reset(tc)
	c.tlsDone = true
	c.structured, c.metaAlloc = false, false // nothing negotiated in clear survives
	return nil
}

func (c *serverConn) list(ctx context.Context, data []byte) error {
	if len(data) != 0 {
		return c.optReply(optList, repErrInvalid, []byte("no data expected"))
	}
	if c.s.opts.List == nil {
		return c.optReply(optList, repErrPolicy, []byte("listing disabled"))
	}
	exps, err := c.s.opts.List(ctx)
	if err != nil {
		c.log.Warn("list exports failed", "error", err)
		return c.optReply(optList, repErrPolicy, []byte("listing failed"))
	}
	for _, e := range exps {
		var b []byte
		b = binary.BigEndian.AppendUint32(b, uint32(len(e.Name)))
		b = append(b, e.Name...)
		b = append(b, e.Description...)
		if err := c.optReply(optList, repServer, b); err != nil {
			return err
		}
	}
	return c.optReply(optList, repAck, nil)
}

// parseString reads a u32-length-prefixed string.
func parseString(p []byte) (string, []byte, bool) {
	if len(p) < 4 {
		return "", nil, false
	}
	n := binary.BigEndian.Uint32(p)
	if n > maxStringLen || uint64(n) > uint64(len(p)-4) {
		return "", nil, false
	}
	return string(p[4 : 4+n]), p[4+n:], true
}

func (c *serverConn) metaContext(opt uint32, data []byte) error {
	if !c.structured {
		return c.optReply(opt, repErrInvalid, []byte("structured replies not negotiated"))
	}
	_, rest, ok := parseString(data)
	if !ok || len(rest) < 4 {
		return c.optReply(opt, repErrInvalid, []byte("malformed meta context request"))
	}
	nq := binary.BigEndian.Uint32(rest)
	rest = rest[4:]
	match := opt == optListMetaContext && nq == 0
	for range nq {
		var q string
		q, rest, ok = parseString(rest)
		if !ok {
			return c.optReply(opt, repErrInvalid, []byte("malformed meta context query"))
		}
		if q == MetaContextBaseAllocation || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	if len(rest) != 0 {
		return c.optReply(opt, repErrInvalid, []byte("trailing data"))
	}
	if opt == optSetMetaContext {
		c.metaAlloc = match
	}
	if match {
		var b []byte
		id := uint32(0)
		if opt == optSetMetaContext {
			id = 1
		}
		b = binary.BigEndian.AppendUint32(b, id)
		b = append(b, MetaContextBaseAllocation...)
		if err := c.optReply(opt, repMetaContext, b); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

// resolve finds an export and fixes the connection's view of it.
func (c *serverConn) resolve(ctx context.Context, name string) (uint32, string) {
	exp, err := c.s.opts.Exports(ctx, name)
	if err != nil || exp == nil || exp.Backend == nil {
		exp.release()
		if err == nil || errors.Is(err, ErrUnknownExport) {
			c.log.Debug("unknown export requested")
			return repErrUnknown, "unknown export"
		}
		c.log.Info("export refused", "error", err)
		return repErrPolicy, "export refused"
	}
	size, err := exp.Backend.Size()
	if err != nil || size < 0 {
		exp.release()
		c.log.Warn("export size failed", "error", err)
		return repErrUnknown, "export unavailable"
	}
	ro := exp.ReadOnly
	if r, ok := exp.Backend.(interface{ ReadOnly() bool }); ok && r.ReadOnly() {
		ro = true
	}
	flags := FlagHasFlags | FlagSendFlush | FlagSendFUA
	if ro {
		flags |= FlagReadOnly
	} else {
		flags |= FlagSendTrim | FlagSendWriteZeroes | FlagSendFastZero
	}
	if exp.MultiConn {
		flags |= FlagCanMultiConn
	}
	if c.structured {
		flags |= FlagSendDF
	}
	c.exp, c.size, c.readOnly, c.flags = exp, size, ro, flags
	return 0, ""
}

func (c *serverConn) infoGo(ctx context.Context, opt uint32, data []byte) (bool, error) {
	name, rest, ok := parseString(data)
	if !ok || len(rest) < 2 || len(rest) != 2+2*int(binary.BigEndian.Uint16(rest)) {
		return false, c.optReply(opt, repErrInvalid, []byte("malformed info request"))
	}
	var wantName, wantDesc bool
	for i := 2; i < len(rest); i += 2 {
		switch binary.BigEndian.Uint16(rest[i:]) {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	if rep, msg := c.resolve(ctx, name); rep != 0 {
		return false, c.optReply(opt, rep, []byte(msg))
	}
	var b []byte
	b = binary.BigEndian.AppendUint16(b, infoExport)
	b = binary.BigEndian.AppendUint64(b, uint64(c.size))
	b = binary.BigEndian.AppendUint16(b, c.flags)
	if err := c.optReply(opt, repInfo, b); err != nil {
		return false, err
	}
	b = binary.BigEndian.AppendUint16(b[:0], infoBlockSize)
	b = binary.BigEndian.AppendUint32(b, 1)
	b = binary.BigEndian.AppendUint32(b, 4096)
	b = binary.BigEndian.AppendUint32(b, MaxPayload)
	if err := c.optReply(opt, repInfo, b); err != nil {
		return false, err
	}
	if wantName {
		b = append(binary.BigEndian.AppendUint16(b[:0], infoName), c.exp.Name...)
		if err := c.optReply(opt, repInfo, b); err != nil {
			return false, err
		}
	}
	if wantDesc && c.exp.Description != "" {
		b = append(binary.BigEndian.AppendUint16(b[:0], infoDescription), c.exp.Description...)
		if err := c.optReply(opt, repInfo, b); err != nil {
			return false, err
		}
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optInfo {
		c.exp.release()
		c.exp = nil
		return false, nil
	}
	return true, nil
}

func (c *serverConn) exportName(ctx context.Context, data []byte) error {
	c.structured, c.metaAlloc = false, false // EXPORT_NAME cannot use them safely
	if rep, _ := c.resolve(ctx, string(data)); rep != 0 {
		return fmt.Errorf("%w: EXPORT_NAME refused (%#x)", ErrUnknownExport, rep)
	}
	var b []byte
	b = binary.BigEndian.AppendUint64(b, uint64(c.size))
	b = binary.BigEndian.AppendUint16(b, c.flags)
	if !c.noZeroes {
		b = append(b, make([]byte, 124)...)
	}
	if _, err := c.w.Write(b); err != nil {
		return err
	}
	return c.w.Flush()
}

// ---- transmission ----

func (c *serverConn) transmit(ctx context.Context) error {
	c.log.Debug("transmission started", "size", c.size, "flags", c.flags, "structured", c.structured)
	bud := newBudget(c.s.opts.MaxInFlight, c.s.opts.MaxBufferBytes)
	var wg sync.WaitGroup
	finish := func(graceful bool) {
		if !graceful {
			_ = c.conn.Close()
		}
		bud.close()
		wg.Wait()
	}
	var h [requestHdrLen]byte
	for {
		if _, err := io.ReadFull(c.r, h[:]); err != nil {
			finish(false)
			if errors.Is(err, io.EOF) || ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("nbd: read request: %w", err)
		}
		req, err := DecodeRequest(h[:])
		if err != nil {
			finish(false)
			return err
		}
		if req.Type == cmdDisc {
			finish(true)
			c.log.Debug("client disconnected")
			return nil
		}
		var cost int64
		if req.Type == cmdRead || req.Type == cmdWrite {
			cost = int64(req.Length)
		}
		if req.Type == cmdWrite && (req.Length > MaxPayload) {
			if _, err := io.CopyN(io.Discard, c.r, int64(req.Length)); err != nil {
				finish(false)
				return fmt.Errorf("nbd: discard oversized write: %w", err)
			}
			if err := c.replyErr(req, EINVAL); err != nil {
				finish(false)
				return err
			}
			continue
		}
		if cost > MaxPayload {
			cost = 0 // refused without a buffer
		}
		if !bud.acquire(cost) {
			finish(false)
			return ctx.Err()
		}
		var buf []byte
		if cost > 0 {
			buf = getBuf(int(cost))
		}
		if req.Type == cmdWrite && len(buf) > 0 {
			if _, err := io.ReadFull(c.r, buf); err != nil {
				putBuf(buf)
				bud.release(cost)
				finish(false)
				return fmt.Errorf("nbd: read write payload: %w", err)
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := c.handle(req, buf)
			if buf != nil {
				putBuf(buf)
			}
			bud.release(cost)
			if err != nil {
				c.log.Debug("reply failed", "error", err)
				_ = c.conn.Close()
			}
		}()
	}
}

// handle executes one request and writes its reply.
func (c *serverConn) handle(req Request, buf []byte) error {
	off, n := int64(req.Offset), int64(req.Length)
	inRange := req.Offset <= uint64(c.size) && uint64(req.Length) <= uint64(c.size)-req.Offset
	known := cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero
	if req.Flags&^known != 0 {
		return c.replyErr(req, EINVAL)
	}
	b := c.exp.Backend
	switch req.Type {
	case cmdRead:
		if !inRange || n > MaxPayload {
			return c.replyErr(req, EINVAL)
		}
		if _, err := b.ReadAt(buf, off); err != nil {
			return c.backendErr(req, "read", err)
		}
		return c.replyData(req, buf)
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if c.readOnly {
			return c.replyErr(req, EPERM)
		}
		if !inRange {
			return c.replyErr(req, EINVAL)
		}
		var err error
		switch req.Type {
		case cmdWrite:
			_, err = b.WriteAt(buf, off)
		case cmdTrim:
			if t, ok := b.(Trimmer); ok && n > 0 {
				err = t.Trim(off, n)
			}
		case cmdWriteZeroes:
			err = c.zero(off, n, req.Flags)
		}
		if err == nil && req.Flags&cmdFlagFUA != 0 {
			err = b.Sync()
		}
		if err != nil {
			return c.backendErr(req, "write", err)
		}
		return c.replyOK(req)
	case cmdFlush:
		if err := b.Sync(); err != nil {
			return c.backendErr(req, "flush", err)
		}
		return c.replyOK(req)
	case cmdBlockStatus:
		if !c.metaAlloc || !inRange || n == 0 {
			return c.replyErr(req, EINVAL)
		}
		return c.blockStatus(req)
	default:
		return c.replyErr(req, EINVAL)
	}
}

var zeroChunk = make([]byte, 1<<20)

func (c *serverConn) zero(off, n int64, flags uint16) error {
	if n == 0 {
		return nil
	}
	if z, ok := c.exp.Backend.(Zeroer); ok {
		err := z.ZeroAt(off, n, flags&cmdFlagNoHole != 0)
		if !errors.Is(err, ErrNotFast) {
			return err
		}
	}
	if flags&cmdFlagFastZero != 0 {
		return ErrNotSup
	}
	for n > 0 {
		k := min(n, int64(len(zeroChunk)))
		if _, err := c.exp.Backend.WriteAt(zeroChunk[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func (c *serverConn) blockStatus(req Request) error {
	off, n := int64(req.Offset), int64(req.Length)
	var exts []Extent
	if l, ok := c.exp.Backend.(ExtentLister); ok {
		var err error
		if exts, err = l.Extents(off, n); err != nil {
			return c.backendErr(req, "block status", err)
		}
	}
	var b []byte
	b = binary.BigEndian.AppendUint32(b, 1)
	pos, end := off, off+n
	for _, e := range exts {
		if e.Offset != pos || e.Length <= 0 || pos >= end {
			break
		}
		l := min(e.Length, end-pos)
		b = binary.BigEndian.AppendUint32(b, uint32(l))
		b = binary.BigEndian.AppendUint32(b, e.Flags&(ExtentHole|ExtentZero))
		pos += l
		if req.Flags&cmdFlagReqOne != 0 {
			break
		}
	}
	if pos == off { // no usable extents: report the range as data
		b = binary.BigEndian.AppendUint32(b, uint32(n))
		b = binary.BigEndian.AppendUint32(b, 0)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	hdr := appendChunkHeader(nil, chunkFlagDone, chunkBlockStatus, req.Handle, uint32(len(b)))
	return c.writeLocked(hdr, b)
}

func (c *serverConn) backendErr(req Request, what string, err error) error {
	errno := errnoOf(err)
	c.log.Warn("backend "+what+" failed", "offset", req.Offset, "length", req.Length, "errno", errno, "error", err)
	return c.replyErr(req, errno)
}

func (c *serverConn) writeLocked(parts ...[]byte) error {
	for _, p := range parts {
		if _, err := c.w.Write(p); err != nil {
			return err
		}
	}
	return c.w.Flush()
}

func (c *serverConn) replyOK(req Request) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeLocked(appendSimpleReply(nil, req.Handle, 0))
}

func (c *serverConn) replyErr(req Request, errno uint32) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if !c.structured {
		return c.writeLocked(appendSimpleReply(nil, req.Handle, errno))
	}
	hdr := appendChunkHeader(nil, chunkFlagDone, chunkError, req.Handle, 6)
	hdr = binary.BigEndian.AppendUint32(hdr, errno)
	hdr = binary.BigEndian.AppendUint16(hdr, 0)
	return c.writeLocked(hdr)
}

func (c *serverConn) replyData(req Request, data []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if !c.structured {
		return c.writeLocked(appendSimpleReply(nil, req.Handle, 0), data)
	}
	if len(data) == 0 {
		return c.writeLocked(appendChunkHeader(nil, chunkFlagDone, chunkNone, req.Handle, 0))
	}
	hdr := appendChunkHeader(nil, chunkFlagDone, chunkOffsetData, req.Handle, uint32(8+len(data)))
	hdr = binary.BigEndian.AppendUint64(hdr, req.Offset)
	return c.writeLocked(hdr, data)
}
