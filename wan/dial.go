package wan

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Dial opens a session to the gateway listening at addr (the destination
// gateway's advertised address). It returns once the first stream is up; the
// remaining streams join in the background and are re-dialled with backoff
// after a cut until Config.MaxOutage passes without any stream.
func Dial(ctx context.Context, addr string, cfg Config) (*Session, error) {
	autoWindow := cfg.ChannelWindow <= 0
	cfg = cfg.withDefaults()
	tc, err := tlsConfig(&cfg, false)
	if err != nil {
		return nil, err
	}
	id, err := newSessionID()
	if err != nil {
		return nil, err
	}
	s := newSession(cfg, true, id)
	s.addr, s.tlsc, s.autoWindow = addr, tc, autoWindow
	conn, raw, dec, rtt, err := s.dialStream(ctx, 0, true)
	if err != nil {
		return nil, err
	}
	n := cfg.Streams
	if n <= 0 {
		bw := cfg.Bandwidth
		if bw <= 0 {
			bw = cfg.RateLimit
		}
		n = chooseStreams(rtt, bw, cfg.StreamWindow, cfg.MaxStreams)
	}
	n = max1(min(n, cfg.MaxStreams))
	s.streams = make([]*stream, n)
	st, err := s.attach(0, conn, raw, dec)
	if err != nil {
		return nil, err
	}
	s.rtt0 = rtt
	s.log.Debug("session dialled", "addr", addr, "streams", n, "rtt", rtt)
	fns := []func(){s.monitor, func() { s.slot(0, st) }}
	for i := 1; i < n; i++ {
		fns = append(fns, func() { s.slot(i, nil) })
	}
	if !s.start(fns...) {
		// The peer ended the session during the setup (bye, protocol error).
		s.fail(ErrClosed) // no-op: it has failed already
		err := s.Err()
		s.wg.Wait()
		return nil, fmt.Errorf("wan: session with %s ended while starting: %w", addr, err)
	}
	return s, nil
}

// start runs fns as session goroutines that Close waits for. The wg.Add is
// done under s.mu, as attach does, so it cannot race with Close's Wait:
// Close marks the session closing and fail sets s.err under s.mu before
// Close waits, and start refuses (returns false, starts nothing) once
// either is set.
func (s *Session) start(fns ...func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil || s.closing {
		return false
	}
	s.wg.Add(len(fns))
	for _, f := range fns {
		go func() {
			defer s.wg.Done()
			f()
		}()
	}
	return true
}

// slot keeps stream idx connected: it waits for the current one to fail and
// re-dials with exponential backoff. It runs under start.
func (s *Session) slot(idx int, st *stream) {
	backoff := s.cfg.MinBackoff
	had := st != nil
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		<-s.done
		cancel()
	}()
	for {
		if st != nil {
			select {
			case <-st.deadCh:
			case <-s.done:
				return
			}
			st = nil
		}
		select {
		case <-s.done:
			return
		default:
		}
		conn, raw, dec, _, err := s.dialStream(ctx, idx, false)
		if err != nil {
			if errors.Is(err, ErrSessionLost) {
				if s.isClosing() {
					return
				}
				s.fail(err)
				return
			}
			s.log.Debug("stream dial failed", "stream", idx, "error", err, "backoff", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-s.done:
				t.Stop()
				return
			}
			backoff = min(backoff*2, s.cfg.MaxBackoff)
			continue
		}
		backoff = s.cfg.MinBackoff
		st, err = s.attach(idx, conn, raw, dec)
		if err != nil {
			return
		}
		if had {
			s.st.reconnects.Add(1)
		}
		had = true
	}
}

func (s *Session) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// dialStream dials, runs TLS and the hello exchange; it returns the
// round-trip time of the hello.
func (s *Session) dialStream(ctx context.Context, idx int, first bool) (net.Conn, *countConn, *zstd.Decoder, time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
	defer cancel()
	var d net.Dialer
	tcp, err := d.DialContext(ctx, "tcp", s.addr)
	if err != nil {
		return nil, nil, nil, 0, fmt.Errorf("wan: dial %s: %w", s.addr, err)
	}
	raw := &countConn{Conn: tcp, in: &s.st.wireIn, out: &s.st.wireOut}
	conn := tls.Client(raw, s.tlsc)
	fail := func(err error) (net.Conn, *countConn, *zstd.Decoder, time.Duration, error) {
		_ = conn.Close()
		return nil, nil, nil, 0, err
	}
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	if err := conn.HandshakeContext(ctx); err != nil {
		return fail(fmt.Errorf("wan: tls handshake with %s: %w", s.addr, err))
	}
	hello := &header{T: ftHello, Ver: protocolVersion, Sess: s.id, Idx: idx}
	if first {
		hello.K = 1
	}
	bw := bufio.NewWriter(conn)
	t0 := time.Now()
	if _, err := writeFrame(bw, hello, nil); err != nil {
		return fail(fmt.Errorf("wan: send hello: %w", err))
	}
	if err := bw.Flush(); err != nil {
		return fail(fmt.Errorf("wan: send hello: %w", err))
	}
	// The hello ack is read byte-exact so no data is buffered past it.
	h, _, err := readFrame(bufio.NewReaderSize(&exactReader{r: conn}, 16))
	if err != nil {
		return fail(fmt.Errorf("wan: read hello ack: %w", err))
	}
	rtt := time.Since(t0)
	if h.T != ftHelloAck {
		return fail(fmt.Errorf("%w: expected hello ack, got %d", ErrProtocol, h.T))
	}
	if h.Err != "" {
		if h.K == 1 {
			return fail(fmt.Errorf("%w: %s", ErrSessionLost, h.Err))
		}
		return fail(fmt.Errorf("wan: peer refused stream: %s", h.Err))
	}
	_ = conn.SetDeadline(time.Time{})
	dec, err := newDecoder()
	if err != nil {
		return fail(err)
	}
	return conn, raw, dec, rtt, nil
}

// exactReader reads one byte at a time so a bufio.Reader on top of it never
// consumes bytes beyond the frame it parses.
type exactReader struct{ r net.Conn }

func (e *exactReader) Read(p []byte) (int, error) {
	if len(p) > 1 {
		p = p[:1]
	}
	return e.r.Read(p)
}

// Listener accepts gateway sessions (the destination side, --gateway-listen).
type Listener struct {
	autoWindow bool
	cfg        Config
	tlsc       *tls.Config
	ln         net.Listener

	mu                sync.Mutex
	sessions          map[string]*Session
	accept            chan *Session
	closed            bool
	done              chan struct{}
	wg                sync.WaitGroup
	handshakeFailures atomic.Int64
}

// Listen starts a gateway listener on addr ("127.0.0.1:0" for tests).
func Listen(ctx context.Context, addr string, cfg Config) (*Listener, error) {
	autoWindow := cfg.ChannelWindow <= 0
	cfg = cfg.withDefaults()
	tc, err := tlsConfig(&cfg, true)
	if err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("wan: listen %s: %w", addr, err)
	}
	return serveListener(ln, cfg, tc, autoWindow), nil
}

// serveListener accepts gateway streams on ln (cfg has its defaults).
func serveListener(ln net.Listener, cfg Config, tc *tls.Config, autoWindow bool) *Listener {
	l := &Listener{autoWindow: autoWindow, cfg: cfg, tlsc: tc, ln: ln, sessions: map[string]*Session{}, accept: make(chan *Session, 16), done: make(chan struct{})}
	l.wg.Add(1)
	go l.serve()
	return l
}

// Addr is the listening address.
func (l *Listener) Addr() net.Addr { return l.ln.Addr() }

// HandshakeFailures counts rejected TLS handshakes (bad or missing certificates).
func (l *Listener) HandshakeFailures() int64 { return l.handshakeFailures.Load() }

// Accept returns the next new session.
func (l *Listener) Accept(ctx context.Context) (*Session, error) {
	select {
	case s := <-l.accept:
		return s, nil
	case <-l.done:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Close stops listening and closes sessions not yet returned by Accept.
// Accepted sessions stay open; close them with Session.Close.
func (l *Listener) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	close(l.done)
	l.mu.Unlock()
	err := l.ln.Close()
	l.wg.Wait()
	for {
		select {
		case s := <-l.accept:
			_ = s.Close()
		default:
			return err
		}
	}
}

func (l *Listener) serve() {
	defer l.wg.Done()
	var backoff time.Duration
	for {
		c, err := l.ln.Accept()
		if err != nil {
			var t interface{ Temporary() bool }
			if !errors.As(err, &t) || !t.Temporary() {
				return
			}
			// Out of file descriptors, a connection aborted before
			// accept...: keep listening, or no stream could reconnect.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			l.cfg.Logger.Warn("gateway accept failed, retrying", "error", err, "backoff", backoff)
			select {
			case <-l.done:
				return
			case <-time.After(backoff):
			}
			continue
		}
		backoff = 0
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			l.handle(c)
		}()
	}
}

func (l *Listener) handle(tcp net.Conn) {
	// Counters are attached once the session is known.
	raw := &countConn{Conn: tcp, in: new(atomic.Int64), out: new(atomic.Int64)}
	conn := tls.Server(raw, l.tlsc)
	_ = conn.SetDeadline(time.Now().Add(l.cfg.DialTimeout))
	ctx, cancel := context.WithTimeout(context.Background(), l.cfg.DialTimeout)
	defer cancel()
	go func() {
		select {
		case <-l.done:
			_ = conn.Close()
		case <-ctx.Done():
		}
	}()
	if err := conn.HandshakeContext(ctx); err != nil {
		l.handshakeFailures.Add(1)
		l.cfg.Logger.Warn("gateway handshake rejected", "remote", tcp.RemoteAddr().String(), "error", err)
		_ = conn.Close()
		return
	}
	h, _, err := readFrame(bufio.NewReaderSize(&exactReader{r: conn}, 16))
	if err != nil || h.T != ftHello || len(h.Sess) != 16 {
		l.cfg.Logger.Warn("gateway hello invalid", "remote", tcp.RemoteAddr().String(), "error", err)
		_ = conn.Close()
		return
	}
	reply := func(e string, lost bool) bool {
		ack := &header{T: ftHelloAck, Err: e}
		if lost {
			ack.K = 1
		}
		bw := bufio.NewWriter(conn)
		if _, err := writeFrame(bw, ack, nil); err != nil {
			return false
		}
		return bw.Flush() == nil
	}
	if h.Ver != protocolVersion {
		reply(fmt.Sprintf("protocol version %d not supported (want %d)", h.Ver, protocolVersion), false)
		_ = conn.Close()
		return
	}
	if h.Idx < 0 || h.Idx >= l.cfg.MaxStreams {
		reply(fmt.Sprintf("stream index %d out of range", h.Idx), false)
		_ = conn.Close()
		return
	}
	key := string(h.Sess)
	l.mu.Lock()
	s := l.sessions[key]
	isNew := false
	if s == nil && h.K == 1 && !l.closed {
		s = newSession(l.cfg, false, h.Sess)
		s.autoWindow = l.autoWindow
		s.onClose = func() {
			l.mu.Lock()
			delete(l.sessions, key)
			l.mu.Unlock()
		}
		l.sessions[key] = s
		isNew = true
	}
	l.mu.Unlock()
	if s == nil {
		reply("unknown session", true)
		_ = conn.Close()
		return
	}
	raw.in, raw.out = &s.st.wireIn, &s.st.wireOut
	if !reply("", false) {
		_ = conn.Close()
		if isNew {
			s.fail(errors.New("wan: first stream failed during hello"))
		}
		return
	}
	_ = conn.SetDeadline(time.Time{})
	dec, err := newDecoder()
	if err != nil {
		_ = conn.Close()
		if isNew {
			s.fail(fmt.Errorf("wan: first stream: %w", err))
		}
		return
	}
	if _, err := s.attach(h.Idx, conn, raw, dec); err != nil {
		return
	}
	if isNew {
		if !s.start(s.monitor) {
			return // ended during the setup (peer's bye...): nothing to accept
		}
		select {
		case l.accept <- s:
		case <-l.done:
			_ = s.Close()
		}
	} else {
		s.st.reconnects.Add(1)
	}
}
