package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Client is one NBD connection in the transmission phase. All methods are
// safe for concurrent use: concurrent calls are pipelined on the connection
// (up to MaxInFlight requests) and matched to their replies by handle.
type Client struct {
	conn       net.Conn
	log        hclog.Logger
	info       ExportInfo
	structured bool
	hasMeta    bool
	metaID     uint32
	reqSize    int

	sem chan struct{}
	wmu sync.Mutex

	mu      sync.Mutex
	pending map[uint64]*call
	next    uint64
	err     error

	done      chan struct{} // closed when the reply reader exits
	closeOnce sync.Once
}

type call struct {
	cmd    uint16
	off    uint64
	length uint32

	mu        sync.Mutex // guards buf writes against abandonment
	abandoned bool
	buf       []byte // READ destination

	// Owned by the reply reader until done is closed:
	covered int64
	extents []Extent
	err     error

	result error // set by whoever closes done
	done   chan struct{}
}

// Dial connects to an NBD server and negotiates opts.Export. network and
// addr are as for net.Dial ("tcp", "host:10809" or "unix", "/path").
func Dial(ctx context.Context, network, addr string, opts DialOptions) (*Client, error) {
	conn, err := dial(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	if opts.ServerName == "" && network == "unix" {
		opts.ServerName = "localhost"
	}
	c, err := newClient(ctx, conn, addr, opts)
	if err != nil {
		_ = conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient negotiates opts.Export on an established connection, which the
// client then owns (Close closes it). TLS needs opts.ServerName or a
// PinnedCertPEM here.
func NewClient(ctx context.Context, conn net.Conn, opts DialOptions) (*Client, error) {
	return newClient(ctx, conn, "", opts)
}

func newClient(ctx context.Context, conn net.Conn, addr string, opts DialOptions) (*Client, error) {
	restore := withHandshakeDeadline(ctx, conn)
	h, err := openHandshake(ctx, addr, conn, opts)
	if err != nil {
		restore()
		return nil, err
	}
	if !opts.DisableStructuredReplies {
		if err := h.negotiateStructured(opts.Export); err != nil {
			restore()
			return nil, err
		}
	}
	err = h.infoGo(optGo, opts.Export)
	var oe *OptionError
	if errors.As(err, &oe) && oe.Reply == repErrUnsup && !h.structured {
		err = h.exportName(opts.Export)
	}
	restore()
	if err != nil {
		if h.conn != conn {
			_ = h.conn.Close()
		}
		return nil, fmt.Errorf("nbd: negotiate export %q: %w", opts.Export, err)
	}
	if opts.MaxInFlight <= 0 {
		opts.MaxInFlight = 16
	}
	reqSize := MaxPayload
	if h.info.MaxBlock > 0 && int64(h.info.MaxBlock) < int64(reqSize) {
		reqSize = int(h.info.MaxBlock)
	}
	if opts.RequestSize > 0 && opts.RequestSize < reqSize {
		reqSize = opts.RequestSize
	}
	if mb := int(h.info.MinBlock); mb > 1 && reqSize > mb {
		reqSize -= reqSize % mb
	}
	c := &Client{
		conn:       h.conn,
		log:        opts.Logger,
		info:       h.info,
		structured: h.structured,
		hasMeta:    h.hasMeta,
		metaID:     h.metaID,
		reqSize:    reqSize,
		sem:        make(chan struct{}, opts.MaxInFlight),
		pending:    map[uint64]*call{},
		done:       make(chan struct{}),
	}
	if c.log == nil {
		c.log = hclog.NewNullLogger()
	}
	c.log.Debug("nbd connected", "export_size", c.info.Size, "flags", c.info.Flags,
		"structured", c.structured, "block_status", c.hasMeta, "tls", h.tls)
	go c.readLoop(c.conn)
	return c, nil
}

// Size is the export size in bytes.
func (c *Client) Size() int64 { return c.info.Size }

// Flags are the export's transmission flags (FlagReadOnly, FlagCanMultiConn...).
func (c *Client) Flags() uint16 { return c.info.Flags }

// Info is what the server told about the export.
func (c *Client) Info() ExportInfo { return c.info }

// ReadOnly reports whether the export refuses writes.
func (c *Client) ReadOnly() bool { return c.info.Flags&FlagReadOnly != 0 }

// CanMultiConn reports whether several connections to the export see one
// consistent disk (NBD_FLAG_CAN_MULTI_CONN).
func (c *Client) CanMultiConn() bool { return c.info.Flags&FlagCanMultiConn != 0 }

// StructuredReplies reports whether structured replies were negotiated.
func (c *Client) StructuredReplies() bool { return c.structured }

// CanBlockStatus reports whether base:allocation block status is available.
func (c *Client) CanBlockStatus() bool { return c.hasMeta }

// Close sends NBD_CMD_DISC and closes the connection. Requests still in
// flight fail with ErrClosed.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.mu.Lock()
		broken := c.err != nil
		c.mu.Unlock()
		if !broken {
			// A server that stopped reading must not hang Close: bound the
			// DISC write, and with it a request write stuck on a full socket
			// while holding wmu (it fails, and fails the connection).
			_ = c.conn.SetWriteDeadline(time.Now().Add(discTimeout))
			hdr := Request{Type: cmdDisc}.encode(nil)
			c.wmu.Lock()
			_, _ = c.conn.Write(hdr)
			c.wmu.Unlock()
		}
		c.fail(ErrClosed)
		<-c.done
	})
	return nil
}

// discTimeout bounds how long Close tries to send NBD_CMD_DISC.
const discTimeout = 2 * time.Second

// fail breaks the connection: every pending and future request gets err.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		if !errors.Is(err, ErrClosed) {
			err = fmt.Errorf("%w: %w", ErrClosed, err)
		}
		c.err = err
	}
	pend := c.pending
	c.pending = map[uint64]*call{}
	c.mu.Unlock()
	_ = c.conn.Close()
	for _, cl := range pend {
		cl.mu.Lock()
		cl.abandoned = true // the reader must not touch the caller's buffer
		cl.mu.Unlock()
		cl.result = c.err
		close(cl.done)
		<-c.sem
	}
}

func (c *Client) complete(h uint64, cl *call) {
	c.mu.Lock()
	_, ok := c.pending[h]
	delete(c.pending, h)
	c.mu.Unlock()
	if ok {
		cl.result = cl.err
		close(cl.done)
		<-c.sem
	}
}

// do sends one request (with payload for WRITE) and waits for its reply.
func (c *Client) do(ctx context.Context, cl *call, flags uint16, payload []byte) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-c.done:
		return c.connErr()
	}
	cl.done = make(chan struct{})
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		<-c.sem
		return err
	}
	h := c.next
	c.next++
	c.pending[h] = cl
	c.mu.Unlock()

	hdr := Request{Flags: flags, Type: cl.cmd, Handle: h, Offset: cl.off, Length: cl.length}.encode(make([]byte, 0, requestHdrLen))
	c.wmu.Lock()
	var err error
	if len(payload) > 0 {
		bufs := net.Buffers{hdr, payload}
		_, err = bufs.WriteTo(c.conn)
	} else {
		_, err = c.conn.Write(hdr)
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("send request: %w", err))
	}
	select {
	case <-cl.done:
		return cl.result
	case <-ctx.Done():
		cl.mu.Lock()
		cl.abandoned = true
		cl.mu.Unlock()
		return ctx.Err()
	}
}

func (c *Client) connErr() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return ErrClosed
}

// ---- reply reader ----

func (c *Client) readLoop(r io.Reader) {
	defer close(c.done)
	err := c.readReplies(bufio.NewReaderSize(r, 256<<10))
	c.fail(err)
}

// readReplies reads replies until an error; it never panics on bad input.
func (c *Client) readReplies(br *bufio.Reader) error {
	var hb [structHdrLen]byte
	for {
		if _, err := io.ReadFull(br, hb[:4]); err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		n, err := replyHeaderLen(binary.BigEndian.Uint32(hb[:4]))
		if err != nil {
			return err
		}
		if _, err := io.ReadFull(br, hb[4:n]); err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		rep, err := DecodeReply(hb[:n])
		if err != nil {
			return err
		}
		c.mu.Lock()
		cl := c.pending[rep.Handle]
		c.mu.Unlock()
		if cl == nil {
			return fmt.Errorf("%w: reply for unknown handle %d", ErrProtocol, rep.Handle)
		}
		if !rep.Structured {
			if rep.Errno != 0 {
				cl.err = &Error{Errno: rep.Errno}
			} else if cl.cmd == cmdRead {
				if err := readInto(br, cl, 0, int64(cl.length)); err != nil {
					return err
				}
				cl.covered = int64(cl.length)
			} else if cl.cmd == cmdBlockStatus {
				return fmt.Errorf("%w: simple reply to block status", ErrProtocol)
			}
			c.complete(rep.Handle, cl)
			continue
		}
		if !c.structured {
			return fmt.Errorf("%w: structured reply without negotiation", ErrProtocol)
		}
		if err := c.readChunk(br, rep, cl); err != nil {
			return err
		}
		if rep.Flags&chunkFlagDone != 0 {
			if cl.err == nil && cl.cmd == cmdRead && cl.covered != int64(cl.length) {
				cl.err = fmt.Errorf("%w: read reply covered %d of %d bytes", ErrProtocol, cl.covered, cl.length)
			}
			if cl.err == nil && cl.cmd == cmdBlockStatus && len(cl.extents) == 0 {
				cl.err = fmt.Errorf("%w: block status reply without extents", ErrProtocol)
			}
			c.complete(rep.Handle, cl)
		}
	}
}

const maxChunkMeta = 1 << 20 // non-data chunk payload cap

func (c *Client) readChunk(br *bufio.Reader, rep Reply, cl *call) error {
	switch rep.Type {
	case chunkNone:
		if rep.Length != 0 {
			return fmt.Errorf("%w: NONE chunk with payload", ErrProtocol)
		}
		return nil
	case chunkOffsetData:
		if cl.cmd != cmdRead || rep.Length < 8 {
			return fmt.Errorf("%w: unexpected data chunk", ErrProtocol)
		}
		var ob [8]byte
		if _, err := io.ReadFull(br, ob[:]); err != nil {
			return err
		}
		off := binary.BigEndian.Uint64(ob[:])
		n := uint64(rep.Length - 8)
		if off < cl.off || off-cl.off > uint64(cl.length) || n > uint64(cl.length)-(off-cl.off) {
			return fmt.Errorf("%w: data chunk outside the request", ErrProtocol)
		}
		cl.covered += int64(n)
		return readInto(br, cl, int64(off-cl.off), int64(n))
	case chunkOffsetHole:
		if cl.cmd != cmdRead || rep.Length != 12 {
			return fmt.Errorf("%w: unexpected hole chunk", ErrProtocol)
		}
		var b [12]byte
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return err
		}
		off := binary.BigEndian.Uint64(b[:])
		n := uint64(binary.BigEndian.Uint32(b[8:]))
		if off < cl.off || off-cl.off > uint64(cl.length) || n > uint64(cl.length)-(off-cl.off) {
			return fmt.Errorf("%w: hole chunk outside the request", ErrProtocol)
		}
		cl.covered += int64(n)
		cl.mu.Lock()
		if !cl.abandoned {
			clear(cl.buf[off-cl.off : off-cl.off+n])
		}
		cl.mu.Unlock()
		return nil
	}
	if rep.Length > maxChunkMeta {
		return fmt.Errorf("%w: chunk of %d bytes", ErrProtocol, rep.Length)
	}
	p := make([]byte, rep.Length)
	if _, err := io.ReadFull(br, p); err != nil {
		return err
	}
	switch rep.Type {
	case chunkBlockStatus:
		if cl.cmd != cmdBlockStatus {
			return fmt.Errorf("%w: unexpected block status chunk", ErrProtocol)
		}
		id, descs, err := decodeBlockStatus(p)
		if err != nil {
			return err
		}
		if id != c.metaID {
			return nil
		}
		pos := int64(cl.off)
		if n := len(cl.extents); n > 0 {
			pos = cl.extents[n-1].Offset + cl.extents[n-1].Length
		}
		end := int64(cl.off) + int64(cl.length)
		for _, d := range descs {
			if d[0] == 0 {
				return fmt.Errorf("%w: zero-length extent", ErrProtocol)
			}
			// Only the last extent may run past the request: more would
			// let a server grow cl.extents without bound.
			if pos >= end {
				return fmt.Errorf("%w: block status extent at %d, past the request end %d", ErrProtocol, pos, end)
			}
			cl.extents = append(cl.extents, Extent{Offset: pos, Length: int64(d[0]), Flags: d[1]})
			pos += int64(d[0])
		}
		return nil
	case chunkError, chunkErrorOffset:
		errno, msg, err := decodeErrorChunk(rep.Type, p)
		if err != nil {
			return err
		}
		if cl.err == nil {
			if errno == 0 {
				errno = EIO
			}
			cl.err = &Error{Errno: errno, Message: msg}
		}
		return nil
	}
	if rep.Type&(1<<15) != 0 && len(p) >= 4 { // unknown error chunk
		if cl.err == nil {
			cl.err = &Error{Errno: max(binary.BigEndian.Uint32(p), EIO)}
		}
		return nil
	}
	return fmt.Errorf("%w: unknown chunk type %d", ErrProtocol, rep.Type)
}

// readInto reads n reply bytes into cl.buf[at:], or discards them once the
// caller has given up on the request.
func readInto(r io.Reader, cl *call, at, n int64) error {
	const step = 256 << 10
	for n > 0 {
		k := min(n, step)
		cl.mu.Lock()
		if cl.abandoned {
			cl.mu.Unlock()
			_, err := io.CopyN(io.Discard, r, n)
			return err
		}
		_, err := io.ReadFull(r, cl.buf[at:at+k])
		cl.mu.Unlock()
		if err != nil {
			return err
		}
		at += k
		n -= k
	}
	return nil
}

// ---- commands ----

func (c *Client) checkRange(off, n int64) error {
	if off < 0 || n < 0 || off > c.info.Size || n > c.info.Size-off {
		return fmt.Errorf("nbd: range %d+%d outside export of %d bytes: %w", off, n, c.info.Size, ErrInvalid)
	}
	return nil
}

// split runs fn over [off, off+n) in pieces of at most step, concurrently,
// and returns the first error.
func split(ctx context.Context, off, n, step int64, fn func(ctx context.Context, off, n int64) error) error {
	if n <= step {
		return fn(ctx, off, n)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
	)
	for pos := off; pos < off+n; pos += step {
		k := min(step, off+n-pos)
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(ctx, pos, k); err != nil {
				once.Do(func() { first = err; cancel() })
			}
		}()
	}
	wg.Wait()
	return first
}

// ReadAt fills p from offset off. Large reads are split into pipelined
// requests of at most RequestSize bytes.
func (c *Client) ReadAt(ctx context.Context, p []byte, off int64) error {
	if err := c.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	return split(ctx, off, int64(len(p)), int64(c.reqSize), func(ctx context.Context, o, n int64) error {
		cl := &call{cmd: cmdRead, off: uint64(o), length: uint32(n), buf: p[o-off : o-off+n]}
		if err := c.do(ctx, cl, 0, nil); err != nil {
			return fmt.Errorf("nbd: read %d+%d: %w", o, n, err)
		}
		return nil
	})
}

// WriteAt writes p at offset off; with fua the data is durable when it
// returns. Large writes are split into pipelined requests.
func (c *Client) WriteAt(ctx context.Context, p []byte, off int64, fua bool) error {
	if c.ReadOnly() {
		return fmt.Errorf("nbd: write to read-only export: %w", ErrPerm)
	}
	if err := c.checkRange(off, int64(len(p))); err != nil {
		return err
	}
	var flags uint16
	if fua {
		if c.info.Flags&FlagSendFUA == 0 {
			return fmt.Errorf("nbd: FUA: %w", ErrUnsupported)
		}
		flags = cmdFlagFUA
	}
	return split(ctx, off, int64(len(p)), int64(c.reqSize), func(ctx context.Context, o, n int64) error {
		cl := &call{cmd: cmdWrite, off: uint64(o), length: uint32(n)}
		if err := c.do(ctx, cl, flags, p[o-off:o-off+n]); err != nil {
			return fmt.Errorf("nbd: write %d+%d: %w", o, n, err)
		}
		return nil
	})
}

// Flush makes all completed writes durable (NBD_CMD_FLUSH).
func (c *Client) Flush(ctx context.Context) error {
	if c.info.Flags&FlagSendFlush == 0 {
		return fmt.Errorf("nbd: flush: %w", ErrUnsupported)
	}
	if err := c.do(ctx, &call{cmd: cmdFlush}, 0, nil); err != nil {
		return fmt.Errorf("nbd: flush: %w", err)
	}
	return nil
}

// bigStep is the largest length sent in one TRIM/WRITE_ZEROES/BLOCK_STATUS.
const bigStep = 1 << 30

// Trim discards [off, off+n) (NBD_CMD_TRIM); its contents become unspecified.
func (c *Client) Trim(ctx context.Context, off, n int64) error {
	if c.info.Flags&FlagSendTrim == 0 {
		return fmt.Errorf("nbd: trim: %w", ErrUnsupported)
	}
	if err := c.checkRange(off, n); err != nil {
		return err
	}
	return split(ctx, off, n, bigStep, func(ctx context.Context, o, k int64) error {
		if err := c.do(ctx, &call{cmd: cmdTrim, off: uint64(o), length: uint32(k)}, 0, nil); err != nil {
			return fmt.Errorf("nbd: trim %d+%d: %w", o, k, err)
		}
		return nil
	})
}

// WriteZeroes makes [off, off+n) read as zeroes (NBD_CMD_WRITE_ZEROES). With
// ZeroFast a server that cannot zero cheaply fails with ErrNotSup (also
// returned at once when the export lacks NBD_FLAG_SEND_FAST_ZERO).
func (c *Client) WriteZeroes(ctx context.Context, off, n int64, flags ZeroFlags) error {
	if c.info.Flags&FlagSendWriteZeroes == 0 {
		return fmt.Errorf("nbd: write zeroes: %w", ErrUnsupported)
	}
	if flags&ZeroFast != 0 && c.info.Flags&FlagSendFastZero == 0 {
		return fmt.Errorf("nbd: fast zero not advertised: %w", ErrNotSup)
	}
	if flags&ZeroFUA != 0 && c.info.Flags&FlagSendFUA == 0 {
		return fmt.Errorf("nbd: FUA: %w", ErrUnsupported)
	}
	if err := c.checkRange(off, n); err != nil {
		return err
	}
	return split(ctx, off, n, bigStep, func(ctx context.Context, o, k int64) error {
		if err := c.do(ctx, &call{cmd: cmdWriteZeroes, off: uint64(o), length: uint32(k)}, uint16(flags), nil); err != nil {
			return fmt.Errorf("nbd: write zeroes %d+%d: %w", o, k, err)
		}
		return nil
	})
}

// BlockStatus describes allocation from off onwards (base:allocation). The
// extents are consecutive, start at off and end at or before off+n; the
// server may describe less than asked, so callers loop.
func (c *Client) BlockStatus(ctx context.Context, off, n int64) ([]Extent, error) {
	if !c.hasMeta {
		return nil, fmt.Errorf("nbd: block status: %w", ErrUnsupported)
	}
	if err := c.checkRange(off, n); err != nil {
		return nil, err
	}
	if n == 0 {
		return nil, nil
	}
	cl := &call{cmd: cmdBlockStatus, off: uint64(off), length: uint32(min(n, bigStep))}
	if err := c.do(ctx, cl, 0, nil); err != nil {
		return nil, fmt.Errorf("nbd: block status %d+%d: %w", off, n, err)
	}
	end := off + n
	out := cl.extents[:0]
	for _, e := range cl.extents {
		if e.Offset >= end {
			break
		}
		if e.Offset+e.Length > end {
			e.Length = end - e.Offset
		}
		out = append(out, e)
	}
	return out, nil
}
