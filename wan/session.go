// Package wan is the WAN gateway data plane: a session between two site
// agents made of several parallel TLS 1.3 TCP streams that carries
// multiplexed channels (ordered byte streams and acknowledged block
// channels), with per-frame zstd, zero-block elision, a shared bandwidth cap
// and transparent reconnect/resend after link cuts. See docs/wan-gateway.md.
package wan

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/klauspost/compress/zstd"
)

// Session is one gateway session between two sites. All methods are safe for
// concurrent use.
type Session struct {
	id     []byte
	cfg    Config
	log    hclog.Logger
	dialer bool
	addr   string
	tlsc   *tls.Config
	lim    *RateLimiter

	mu        sync.Mutex
	cond      *sync.Cond // writers wait here for work
	chans     map[uint32]*channel
	closedCh  map[uint32]uint64 // finished channels → final cumulative ack
	nextID    uint32
	ready     []*channel
	ackq      []uint32
	ackSet    map[uint32]bool
	streams   []*stream
	nconn     int
	downSince time.Time
	err       error
	closing   bool
	incoming  []*Conn
	inSig     chan struct{}
	blockWait map[string]*channel   // opened by the peer, no sink yet
	sinks     map[string]*BlockSink // registered, not yet opened
	done      chan struct{}
	wg        sync.WaitGroup
	onClose   func()
	rtt0      time.Duration
	// autoWindow: ChannelWindow follows the stream count (not set by the user).
	autoWindow bool

	st counters
}

type counters struct {
	offered, wireOut, wireIn, frameOut, payloadFirst, offeredFirst atomic.Int64
	retx, zero, delivered, reconnects, dupIn                       atomic.Int64
}

// stream is one TCP+TLS connection of a session.
type stream struct {
	idx    int
	conn   net.Conn
	raw    *countConn
	ctrl   []*header
	dead   bool
	deadCh chan struct{}
	rtt    atomic.Int64
	rate   atomic.Int64
	last   int64
}

// countConn counts the TCP bytes under TLS.
type countConn struct {
	net.Conn
	in, out *atomic.Int64
	sin     atomic.Int64
	sout    atomic.Int64
}

func (c *countConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.in.Add(int64(n))
	c.sin.Add(int64(n))
	return n, err
}

func (c *countConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.out.Add(int64(n))
	c.sout.Add(int64(n))
	return n, err
}

func newSession(cfg Config, dialer bool, id []byte) *Session {
	s := &Session{
		id:        id,
		cfg:       cfg,
		dialer:    dialer,
		lim:       NewRateLimiter(cfg.RateLimit),
		chans:     map[uint32]*channel{},
		closedCh:  map[uint32]uint64{},
		ackSet:    map[uint32]bool{},
		inSig:     make(chan struct{}),
		blockWait: map[string]*channel{},
		sinks:     map[string]*BlockSink{},
		done:      make(chan struct{}),
		downSince: time.Now(),
	}
	s.log = cfg.Logger.With("session", hex.EncodeToString(id[:4]))
	s.cond = sync.NewCond(&s.mu)
	if dialer {
		s.nextID = 1
	} else {
		s.nextID = 2
	}
	return s
}

// ID returns the session identifier (random, 16 bytes, hex).
func (s *Session) ID() string { return hex.EncodeToString(s.id) }

// Done is closed when the session has ended; Err tells why.
func (s *Session) Done() <-chan struct{} { return s.done }

// Err returns why the session ended (nil while it runs).
func (s *Session) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// SetRateLimit changes the shared bandwidth cap (bytes/s, 0 = unlimited)
// while the session runs.
func (s *Session) SetRateLimit(bytesPerSec int64) { s.lim.SetRate(bytesPerSec) }

// RateLimit returns the current cap in bytes/s (0 = unlimited).
func (s *Session) RateLimit() int64 { return s.lim.Rate() }

// Close ends the session: the peer is told (best effort), every stream is
// closed and every blocked call returns ErrClosed. Data not yet acknowledged
// is dropped; wait for Conn/BlockSender completion first.
func (s *Session) Close() error {
	s.mu.Lock()
	if s.err == nil && !s.closing {
		s.closing = true
		for _, st := range s.streams {
			if st != nil && !st.dead {
				st.ctrl = append(st.ctrl, &header{T: ftBye})
			}
		}
		s.cond.Broadcast()
	}
	s.mu.Unlock()
	// Give writers a moment to deliver the goodbye.
	t := time.NewTimer(300 * time.Millisecond)
	select {
	case <-t.C:
	case <-s.done:
	case <-s.byeFlushed():
	}
	t.Stop()
	s.fail(ErrClosed)
	s.wg.Wait()
	return nil
}

func (s *Session) byeFlushed() <-chan struct{} {
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		for i := 0; i < 30; i++ {
			s.mu.Lock()
			pending := false
			for _, st := range s.streams {
				if st != nil && !st.dead && len(st.ctrl) > 0 {
					pending = true
				}
			}
			s.mu.Unlock()
			if !pending {
				time.Sleep(20 * time.Millisecond) // let the flush reach the socket
				return
			}
			select {
			case <-s.done:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	return ch
}

// fail ends the session with err (first error wins).
func (s *Session) fail(err error) {
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		return
	}
	s.err = err
	close(s.done)
	for _, st := range s.streams {
		if st != nil && !st.dead {
			st.dead = true
			close(st.deadCh)
			_ = st.conn.Close()
		}
	}
	for _, ch := range s.chans {
		ch.signal()
	}
	for name, sink := range s.sinks { // registered, never opened by the peer
		sink.err = err
		close(sink.done)
		delete(s.sinks, name)
	}
	close(s.inSig)
	s.inSig = make(chan struct{})
	s.cond.Broadcast()
	onClose := s.onClose
	s.mu.Unlock()
	switch {
	case errors.Is(err, ErrClosed):
		s.log.Debug("session closed")
	case errors.Is(err, ErrPeerClosed):
		s.log.Info("session closed by peer")
	default:
		s.log.Warn("session ended", "error", err)
	}
	if onClose != nil {
		onClose()
	}
}

// attach starts the reader and writer of a freshly handshaken stream.
func (s *Session) attach(idx int, conn net.Conn, raw *countConn, dec *zstd.Decoder) (*stream, error) {
	st := &stream{idx: idx, conn: conn, raw: raw, deadCh: make(chan struct{})}
	s.mu.Lock()
	if s.err != nil {
		s.mu.Unlock()
		_ = conn.Close()
		return nil, s.err
	}
	for len(s.streams) <= idx {
		s.streams = append(s.streams, nil)
	}
	if old := s.streams[idx]; old != nil && !old.dead {
		s.downLocked(old, errors.New("replaced by a new connection"))
	}
	s.streams[idx] = st
	s.nconn++
	if s.autoWindow {
		s.cfg.ChannelWindow = max(s.cfg.ChannelWindow, autoChannelWindow(len(s.streams), s.cfg.StreamWindow))
	}
	s.wg.Add(2) // under s.mu: fail() cannot have started Close's Wait yet
	s.mu.Unlock()
	go s.writer(st)
	go s.reader(st, dec)
	s.log.Debug("stream up", "stream", idx, "remote", conn.RemoteAddr().String())
	return st, nil
}

// down marks a stream failed and requeues what it carried.
func (s *Session) down(st *stream, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.downLocked(st, err)
}

func (s *Session) downLocked(st *stream, err error) {
	if st.dead {
		return
	}
	st.dead = true
	close(st.deadCh)
	_ = st.conn.Close()
	s.nconn--
	if s.nconn == 0 {
		s.downSince = time.Now()
	}
	if s.err != nil {
		return
	}
	s.log.Debug("stream down", "stream", st.idx, "error", err)
	requeued := 0
	for id, ch := range s.chans {
		if n := ch.requeue(st); n > 0 {
			requeued += n
			s.markReady(ch)
		}
		// Acks carried by the dead stream may be lost: send them again.
		if ch.consumed > 0 {
			s.queueAck(id)
		}
	}
	for id := range s.closedCh {
		s.queueAck(id)
	}
	if requeued > 0 {
		s.log.Debug("frames requeued", "stream", st.idx, "frames", requeued)
	}
	s.cond.Broadcast()
}

func (s *Session) markReady(ch *channel) {
	if !ch.inReady && ch.hasWork() {
		ch.inReady = true
		s.ready = append(s.ready, ch)
		s.cond.Signal()
	}
}

func (s *Session) queueAck(id uint32) {
	if !s.ackSet[id] {
		s.ackSet[id] = true
		s.ackq = append(s.ackq, id)
		s.cond.Signal()
	}
}

// work is what a writer sends next: a control header or a reliable frame.
type work struct {
	h      *header
	f      *outFrame
	resend bool
}

// next returns the next unit of work for st; with wait it blocks until there
// is some, otherwise it returns false at once.
func (s *Session) next(st *stream, wait bool) (work, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if st.dead || s.err != nil {
			return work{}, false
		}
		if len(st.ctrl) > 0 {
			h := st.ctrl[0]
			st.ctrl = st.ctrl[1:]
			return work{h: h}, true
		}
		if !s.closing {
			if len(s.ackq) > 0 {
				id := s.ackq[0]
				s.ackq = s.ackq[1:]
				delete(s.ackSet, id)
				var seq uint64
				if ch := s.chans[id]; ch != nil {
					seq = ch.consumed
				} else if last, ok := s.closedCh[id]; ok {
					seq = last
				}
				if seq > 0 {
					return work{h: &header{T: ftAck, Ch: id, Seq: seq}}, true
				}
				continue
			}
			for len(s.ready) > 0 {
				ch := s.ready[0]
				s.ready[0] = nil
				s.ready = s.ready[1:]
				f := ch.pick()
				if f == nil {
					ch.inReady = false
					continue
				}
				if ch.hasWork() {
					s.ready = append(s.ready, ch)
					s.cond.Signal() // more work: wake another writer
				} else {
					ch.inReady = false
				}
				f.sentOn = st
				resend := f.sent
				f.sent = true
				return work{f: f, resend: resend}, true
			}
		}
		if !wait {
			return work{}, false
		}
		s.cond.Wait()
	}
}

func (s *Session) writer(st *stream) {
	defer s.wg.Done()
	enc, err := newEncoder()
	if err != nil {
		s.down(st, err)
		return
	}
	defer enc.Close()
	bw := bufio.NewWriterSize(st.conn, 128<<10)
	var cbuf []byte
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-st.deadCh:
		case <-ctx.Done():
		}
		cancel()
	}()
	for {
		w, ok := s.next(st, false)
		if !ok {
			if bw.Buffered() > 0 {
				_ = st.conn.SetWriteDeadline(time.Now().Add(s.cfg.IdleTimeout))
				if err := bw.Flush(); err != nil {
					s.down(st, fmt.Errorf("write: %w", err))
					return
				}
			}
			w, ok = s.next(st, true)
			if !ok {
				return
			}
		}
		h, payload := w.h, []byte(nil)
		if w.f != nil {
			h, payload, cbuf = s.encode(enc, w.f, cbuf)
		}
		size := len(payload) + 32
		if err := s.lim.Wait(ctx, int64(size)); err != nil {
			s.down(st, err)
			return
		}
		_ = st.conn.SetWriteDeadline(time.Now().Add(s.cfg.IdleTimeout))
		n, err := writeFrame(bw, h, payload)
		if err != nil {
			s.down(st, fmt.Errorf("write: %w", err))
			return
		}
		s.st.frameOut.Add(int64(n))
		if w.f != nil {
			if w.resend {
				s.st.retx.Add(int64(len(payload)))
			} else {
				s.st.payloadFirst.Add(int64(len(payload)))
				s.st.offeredFirst.Add(int64(w.f.n))
			}
		}
		if h.T == ftBye {
			_ = bw.Flush()
		}
	}
}

// encode builds the header and wire payload of a reliable frame.
func (s *Session) encode(enc *zstd.Encoder, f *outFrame, cbuf []byte) (*header, []byte, []byte) {
	h := &header{T: ftData, Ch: f.ch.id, Seq: f.seq, K: f.kind, Off: f.off, Name: f.name, N: uint32(f.n)}
	switch {
	case f.zero:
		h.F |= flagZero
		return h, nil, cbuf
	case len(f.data) == 0 || s.cfg.Compression == CompressOff:
		return h, f.data, cbuf
	}
	if s.cfg.Compression == CompressAuto && f.ch.skip.Load() > 0 {
		f.ch.skip.Add(-1)
		return h, f.data, cbuf
	}
	cbuf = enc.EncodeAll(f.data, cbuf[:0])
	if len(cbuf) < len(f.data)-len(f.data)/10 || (s.cfg.Compression == CompressAlways && len(cbuf) < len(f.data)) {
		f.ch.skip.Store(0)
		h.F |= flagZstd
		return h, cbuf, cbuf
	}
	if s.cfg.Compression == CompressAuto {
		f.ch.skip.Store(16) // incompressible: try again 16 frames later
	}
	return h, f.data, cbuf
}

func (s *Session) reader(st *stream, dec *zstd.Decoder) {
	defer s.wg.Done()
	defer dec.Close()
	br := bufio.NewReaderSize(st.conn, 128<<10)
	for {
		_ = st.conn.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
		h, p, err := readFrame(br)
		if err != nil {
			s.down(st, fmt.Errorf("read: %w", err))
			return
		}
		switch h.T {
		case ftData:
			data, err := decodePayload(dec, h, p)
			if err != nil {
				s.down(st, err)
				return
			}
			if err := s.onData(h, data); err != nil {
				s.fail(err)
				return
			}
		case ftAck:
			s.onAck(h.Ch, h.Seq)
		case ftPing:
			s.mu.Lock()
			st.ctrl = append(st.ctrl, &header{T: ftPong, TS: h.TS})
			s.cond.Broadcast()
			s.mu.Unlock()
		case ftPong:
			if d := time.Since(time.Unix(0, h.TS)); d > 0 {
				st.rtt.Store(int64(d))
			}
		case ftBye:
			s.fail(ErrPeerClosed)
			return
		default:
			s.down(st, fmt.Errorf("%w: unexpected frame type %d", ErrProtocol, h.T))
			return
		}
	}
}

func (s *Session) isLocalID(id uint32) bool {
	if s.dialer {
		return id%2 == 1
	}
	return id%2 == 0
}

func (s *Session) onData(h *header, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil
	}
	ch := s.chans[h.Ch]
	if ch == nil {
		if _, ok := s.closedCh[h.Ch]; ok || s.isLocalID(h.Ch) || h.Seq == 0 {
			s.st.dupIn.Add(1)
			s.queueAck(h.Ch)
			return nil
		}
		ch = newChannel(s, h.Ch, chUnknown)
		s.chans[h.Ch] = ch
	}
	if h.Seq < ch.rnext || ch.rbuf[h.Seq] != nil {
		s.st.dupIn.Add(1)
		s.queueAck(h.Ch)
		return nil
	}
	in := &inFrame{seq: h.Seq, kind: h.K, off: h.Off, n: int(h.N), data: data, zero: h.F&flagZero != 0, name: h.Name}
	if len(ch.rbuf) > 4*maxChannelWindow/frameOverhead || ch.held+in.cost() > maxReceiveHeld {
		// The peer sent far more than its window allows.
		return fmt.Errorf("%w: channel %d receive buffer overflow (%d frames, %d bytes unconsumed)",
			ErrProtocol, h.Ch, len(ch.rbuf)+len(ch.rq), ch.held)
	}
	ch.rbuf[h.Seq] = in
	ch.held += in.cost()
	for {
		f := ch.rbuf[ch.rnext]
		if f == nil {
			break
		}
		delete(ch.rbuf, ch.rnext)
		ch.held -= f.cost()
		ch.rnext++
		s.deliver(ch, f)
	}
	return nil
}

// deliver hands an in-order frame to its channel. Caller holds s.mu.
func (s *Session) deliver(ch *channel, f *inFrame) {
	switch f.kind {
	case kindOpenConn:
		ch.kind = chConn
		ch.name = f.name
		ch.conn = &Conn{s: s, ch: ch}
		s.consume(ch, f.seq)
		s.incoming = append(s.incoming, ch.conn)
		close(s.inSig)
		s.inSig = make(chan struct{})
	case kindOpenBlock:
		ch.kind = chBlockRecv
		ch.name = f.name
		s.consume(ch, f.seq)
		if sink := s.sinks[f.name]; sink != nil {
			delete(s.sinks, f.name)
			s.bindSink(ch, sink)
		} else {
			s.blockWait[f.name] = ch
		}
	case kindReset:
		ch.rerr = fmt.Errorf("%w: %s", ErrReset, f.name)
		ch.dropRQ()
		s.consume(ch, f.seq)
		// Our own outstanding frames will never be consumed: forget them.
		for _, o := range ch.unacked {
			o.acked = true
		}
		ch.unacked, ch.retx, ch.nextSend, ch.inflight = nil, nil, 0, 0
		ch.finAcked = true
		ch.signal()
		s.maybeRemove(ch)
	default:
		if f.kind == kindData || f.kind == kindBlock {
			s.st.delivered.Add(int64(f.n))
		}
		if ch.closed && ch.kind == chConn {
			// Closed locally: swallow so the peer is not stalled.
			s.consume(ch, f.seq)
			if f.kind == kindFin {
				ch.rfin = true
				s.maybeRemove(ch)
			}
			return
		}
		ch.rq = append(ch.rq, f)
		ch.held += f.cost()
		ch.signal()
	}
}

// consume records that every frame up to seq is consumed and schedules an ack.
func (s *Session) consume(ch *channel, seq uint64) {
	if seq > ch.consumed {
		ch.consumed = seq
		s.queueAck(ch.id)
	}
}

// maybeRemove forgets a channel whose both directions are finished.
func (s *Session) maybeRemove(ch *channel) {
	var done bool
	switch ch.kind {
	case chConn:
		done = (ch.finAcked || ch.sseq == 0) && (ch.rfin || ch.rerr != nil)
	case chBlockSend:
		done = ch.finAcked
	case chBlockRecv:
		done = ch.rfin || ch.rerr != nil
	}
	if done && len(ch.unacked) == 0 && s.chans[ch.id] == ch {
		delete(s.chans, ch.id)
		s.closedCh[ch.id] = ch.consumed
	}
}

func (s *Session) onAck(id uint32, seq uint64) {
	s.mu.Lock()
	ch := s.chans[id]
	if ch == nil {
		s.mu.Unlock()
		return
	}
	acked := ch.ack(seq)
	cb := ch.onAck
	if cb != nil {
		ch.ackCB = append(ch.ackCB, acked...)
	}
	s.maybeRemove(ch)
	s.mu.Unlock()
	if cb == nil || len(acked) == 0 {
		return
	}
	// Readers of several streams get here at once: one at a time, each
	// draining what is queued, so onAck sees the extents in order.
	ch.cbMu.Lock()
	defer ch.cbMu.Unlock()
	for {
		s.mu.Lock()
		fs := ch.ackCB
		ch.ackCB = nil
		s.mu.Unlock()
		if len(fs) == 0 {
			return
		}
		for _, f := range fs {
			cb(f.off, int64(f.n))
		}
	}
}

// submit queues a reliable frame, waiting for window space when it carries
// data. data is owned by the session afterwards.
func (s *Session) submit(ctx context.Context, ch *channel, f *outFrame) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if s.err != nil {
			return s.err
		}
		if ch.rerr != nil && f.kind != kindReset {
			return ch.rerr
		}
		f.win = len(f.data) + frameOverhead
		if ch.inflight == 0 || ch.inflight+f.win <= s.cfg.ChannelWindow || f.kind == kindReset || f.kind == kindFin {
			break
		}
		sig := ch.sig
		s.mu.Unlock()
		select {
		case <-sig:
		case <-ctx.Done():
			s.mu.Lock()
			return ctx.Err()
		}
		s.mu.Lock()
	}
	ch.sseq++
	f.seq = ch.sseq
	f.ch = ch
	ch.unacked = append(ch.unacked, f)
	ch.inflight += f.win
	if f.kind == kindData || f.kind == kindBlock {
		s.st.offered.Add(int64(f.n))
		if f.zero {
			s.st.zero.Add(int64(f.n))
		}
	}
	s.markReady(ch)
	s.cond.Signal()
	return nil
}

// newLocalChannel allocates a channel opened by this side.
func (s *Session) newLocalChannel(kind chanKind, name string) (*channel, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	id := s.nextID
	s.nextID += 2
	ch := newChannel(s, id, kind)
	ch.name = name
	s.chans[id] = ch
	return ch, nil
}

// monitor enforces MaxOutage, sends heartbeats and samples stream rates.
// It runs under start.
func (s *Session) monitor() {
	tick := min(time.Second, max(s.cfg.MaxOutage/8, 10*time.Millisecond))
	t := time.NewTicker(tick)
	defer t.Stop()
	lastPing, lastRate := time.Now(), time.Now()
	for {
		select {
		case <-s.done:
			return
		case now := <-t.C:
			s.mu.Lock()
			if s.nconn == 0 && now.Sub(s.downSince) > s.cfg.MaxOutage {
				s.mu.Unlock()
				s.fail(fmt.Errorf("%w: no stream for %s", ErrOutage, s.cfg.MaxOutage))
				return
			}
			ping := now.Sub(lastPing) >= time.Second
			if ping {
				lastPing = now
			}
			dt := now.Sub(lastRate).Seconds()
			rate := dt >= 1
			if rate {
				lastRate = now
			}
			for _, st := range s.streams {
				if st == nil || st.dead {
					continue
				}
				if ping {
					st.ctrl = append(st.ctrl, &header{T: ftPing, TS: now.UnixNano()})
				}
				if rate {
					b := st.raw.sout.Load()
					st.rate.Store(int64(float64(b-st.last) / dt))
					st.last = b
				}
			}
			if ping {
				s.cond.Broadcast()
			}
			s.mu.Unlock()
		}
	}
}

// frameOverhead is the window cost of a frame beyond its stored bytes, so
// that zero ranges and control frames are bounded too.
const frameOverhead = 1024

func newSessionID() ([]byte, error) {
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		return nil, fmt.Errorf("wan: session id: %w", err)
	}
	return id, nil
}
