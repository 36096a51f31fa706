package wan

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// Conn is an ordered, reliable byte stream carried by a session: every byte
// written on one side is read exactly once, in order, on the other side,
// across stream cuts. Both directions close independently (CloseWrite).
type Conn struct {
	s   *Session
	ch  *channel
	wmu sync.Mutex
	// deadlines, guarded by s.mu
	rdl, wdl time.Time
}

var _ net.Conn = (*Conn)(nil)

// Addr names one end of a Conn: the session and the forward target.
type Addr struct {
	Session string
	Target  string
}

// Network returns "wan".
func (a Addr) Network() string { return "wan" }

func (a Addr) String() string { return a.Session + "/" + a.Target }

// LocalAddr returns the session and target of the stream.
func (c *Conn) LocalAddr() net.Addr { return Addr{Session: c.s.ID(), Target: c.ch.name} }

// RemoteAddr returns the session and target of the stream.
func (c *Conn) RemoteAddr() net.Addr { return Addr{Session: c.s.ID(), Target: c.ch.name} }

// SetDeadline sets both deadlines.
func (c *Conn) SetDeadline(t time.Time) error {
	_ = c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline makes blocked and future reads fail with
// os.ErrDeadlineExceeded after t (zero: no deadline).
func (c *Conn) SetReadDeadline(t time.Time) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.rdl = t
	c.ch.signal()
	return nil
}

// SetWriteDeadline bounds future writes' wait for window space; it applies
// from the next Write call.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	c.s.mu.Lock()
	defer c.s.mu.Unlock()
	c.wdl = t
	return nil
}

// OpenConn opens a byte stream whose far end the peer connects to target
// (subject to the peer's ServeForwards policy). It does not wait for the
// peer's dial: if that fails, Read returns an error wrapping ErrReset.
func (s *Session) OpenConn(ctx context.Context, target string) (*Conn, error) {
	ch, err := s.newLocalChannel(chConn, target)
	if err != nil {
		return nil, err
	}
	c := &Conn{s: s, ch: ch}
	s.mu.Lock()
	ch.conn = c
	s.mu.Unlock()
	if err := s.submit(ctx, ch, &outFrame{kind: kindOpenConn, name: target}); err != nil {
		return nil, err
	}
	return c, nil
}

// AcceptConn returns the next byte stream opened by the peer and the target
// the peer asked for. Most callers use ServeForwards instead.
func (s *Session) AcceptConn(ctx context.Context) (*Conn, string, error) {
	for {
		s.mu.Lock()
		if len(s.incoming) > 0 {
			c := s.incoming[0]
			s.incoming = s.incoming[1:]
			s.mu.Unlock()
			return c, c.ch.name, nil
		}
		if s.err != nil {
			err := s.err
			s.mu.Unlock()
			return nil, "", err
		}
		sig := s.inSig
		s.mu.Unlock()
		select {
		case <-sig:
		case <-ctx.Done():
			return nil, "", ctx.Err()
		}
	}
}

// Target is the address the opening side asked the peer to connect to.
func (c *Conn) Target() string { return c.ch.name }

// Write queues p for delivery; it blocks while the channel window is full.
func (c *Conn) Write(p []byte) (int, error) {
	c.s.mu.Lock()
	dl := c.wdl
	c.s.mu.Unlock()
	if dl.IsZero() {
		return c.WriteContext(context.Background(), p)
	}
	ctx, cancel := context.WithDeadline(context.Background(), dl)
	defer cancel()
	n, err := c.WriteContext(ctx, p)
	if errors.Is(err, context.DeadlineExceeded) {
		err = os.ErrDeadlineExceeded
	}
	return n, err
}

// WriteContext is Write with a context bounding the wait for window space.
func (c *Conn) WriteContext(ctx context.Context, p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.s.mu.Lock()
	closed := c.ch.closed || c.ch.finQueued
	c.s.mu.Unlock()
	if closed {
		return 0, net.ErrClosed
	}
	written := 0
	for len(p) > 0 {
		n := min(len(p), c.s.cfg.MaxFrame)
		f := &outFrame{kind: kindData, n: n}
		if isZero(p[:n]) {
			f.zero = true
		} else {
			f.data = append([]byte(nil), p[:n]...)
		}
		if err := c.s.submit(ctx, c.ch, f); err != nil {
			return written, err
		}
		written += n
		p = p[n:]
	}
	return written, nil
}

// CloseWrite ends this direction: the peer reads io.EOF after the data.
func (c *Conn) CloseWrite() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.s.mu.Lock()
	if c.ch.finQueued || c.ch.closed {
		c.s.mu.Unlock()
		return nil
	}
	c.ch.finQueued = true
	c.s.mu.Unlock()
	return c.s.submit(context.Background(), c.ch, &outFrame{kind: kindFin})
}

// Read reads in-order data; io.EOF after the peer's CloseWrite.
func (c *Conn) Read(p []byte) (int, error) {
	return c.ReadContext(context.Background(), p)
}

// ReadContext is Read with a context bounding the wait.
func (c *Conn) ReadContext(ctx context.Context, p []byte) (int, error) {
	s, ch := c.s, c.ch
	s.mu.Lock()
	defer s.mu.Unlock()
	for {
		if ch.closed {
			return 0, net.ErrClosed
		}
		if len(ch.rq) > 0 {
			f := ch.rq[0]
			if f.kind == kindFin {
				ch.popRQ()
				ch.rfin = true
				s.consume(ch, f.seq)
				s.maybeRemove(ch)
				return 0, io.EOF
			}
			var n int
			if f.zero {
				n = min(len(p), f.n-f.pos)
				clear(p[:n])
			} else {
				n = copy(p, f.data[f.pos:])
			}
			f.pos += n
			if f.pos >= f.n {
				ch.popRQ()
				s.consume(ch, f.seq)
			}
			return n, nil
		}
		if ch.rfin {
			return 0, io.EOF
		}
		if ch.rerr != nil {
			return 0, ch.rerr
		}
		if s.err != nil {
			return 0, s.err
		}
		var tm *time.Timer
		var timeout <-chan time.Time
		if !c.rdl.IsZero() {
			d := time.Until(c.rdl)
			if d <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			tm = time.NewTimer(d)
			timeout = tm.C
		}
		sig := ch.sig
		s.mu.Unlock()
		var err error
		select {
		case <-sig:
		case <-timeout:
		case <-ctx.Done():
			err = ctx.Err()
		}
		if tm != nil {
			tm.Stop()
		}
		s.mu.Lock()
		if err != nil {
			return 0, err
		}
	}
}

// Close releases the stream. If either direction is unfinished the peer's
// end is reset (it reads an error wrapping ErrReset).
func (c *Conn) Close() error {
	return c.abort("closed by peer")
}

// Flush waits until everything written so far has been consumed by the
// peer's reader.
func (c *Conn) Flush(ctx context.Context) error {
	return c.s.waitAcked(ctx, c.ch)
}

func (c *Conn) abort(reason string) error {
	s, ch := c.s, c.ch
	s.mu.Lock()
	if ch.closed {
		s.mu.Unlock()
		return nil
	}
	ch.closed = true
	finished := (ch.finAcked || ch.sseq == 0) && (ch.rfin || ch.rerr != nil)
	sendReset := !finished && ch.rerr == nil && s.err == nil
	// Unread data is dropped and acknowledged.
	for _, f := range ch.rq {
		s.consume(ch, f.seq)
		if f.kind == kindFin {
			ch.rfin = true
		}
	}
	ch.dropRQ()
	ch.signal()
	s.maybeRemove(ch)
	s.mu.Unlock()
	if sendReset {
		// Not bounded by the window: a reset carries no data.
		return s.submit(context.Background(), ch, &outFrame{kind: kindReset, name: reason})
	}
	return nil
}

// waitAcked waits until every frame submitted on ch is acknowledged.
func (s *Session) waitAcked(ctx context.Context, ch *channel) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for len(ch.unacked) > 0 {
		if ch.rerr != nil {
			return ch.rerr
		}
		if s.err != nil {
			return s.err
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
	return ch.rerr
}

// Forward accepts connections on ln and carries each through the session to
// remoteTarget, dialled by the peer (which must allow it in ServeForwards).
// Both directions and half-closes are carried. It returns when ctx ends, ln
// fails or the session ends; ln is closed and active connections are torn
// down before it returns.
func (s *Session) Forward(ctx context.Context, ln net.Listener, remoteTarget string) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-ctx.Done():
		case <-s.done:
		}
		_ = ln.Close()
	}()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		tcp, err := ln.Accept()
		if err != nil {
			if s.Err() != nil {
				return s.Err()
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("wan: forward accept: %w", err)
		}
		c, err := s.OpenConn(ctx, remoteTarget)
		if err != nil {
			_ = tcp.Close()
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			pump(ctx, tcp, c)
		}()
	}
}

// ForwardPolicy decides whether the peer may reach target; return nil to
// allow, an error (it is sent to the peer) to refuse.
type ForwardPolicy func(target string) error

// AllowTargets returns a policy allowing exactly the listed addresses.
func AllowTargets(targets ...string) ForwardPolicy {
	set := map[string]bool{}
	for _, t := range targets {
		set[t] = true
	}
	return func(target string) error {
		if !set[target] {
			return fmt.Errorf("%w: %s", ErrNotAllowed, target)
		}
		return nil
	}
}

// ServeForwards accepts byte streams opened by the peer, checks each target
// against allow, dials it and carries the traffic until ctx or the session
// ends. Refused or failed dials reset the peer's stream with the reason.
func (s *Session) ServeForwards(ctx context.Context, allow ForwardPolicy) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, target, err := s.AcceptConn(ctx)
		if err != nil {
			return err
		}
		if allow == nil {
			_ = c.abort("no forward policy")
			continue
		}
		if err := allow(target); err != nil {
			s.log.Warn("forward refused", "target", target, "error", err)
			_ = c.abort(err.Error())
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			dctx, dcancel := context.WithTimeout(ctx, s.cfg.DialTimeout)
			var d net.Dialer
			tcp, err := d.DialContext(dctx, "tcp", target)
			dcancel()
			if err != nil {
				s.log.Warn("forward dial failed", "target", target, "error", err)
				_ = c.abort("dial " + target + ": " + err.Error())
				return
			}
			pump(ctx, tcp, c)
		}()
	}
}

// pump copies both directions between a TCP connection and a Conn, carrying
// half-closes, and tears both down when done or when ctx ends.
func pump(ctx context.Context, tcp net.Conn, c *Conn) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var once sync.Once
	abort := func() {
		once.Do(func() {
			_ = tcp.Close()
			_ = c.abort("forwarded connection aborted")
		})
	}
	go func() {
		<-ctx.Done()
		abort()
	}()
	errc := make(chan error, 2)
	go func() {
		_, err := io.Copy(c, tcp)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	go func() {
		_, err := io.Copy(tcp, readerCtx{ctx, c})
		if err == nil {
			if cw, ok := tcp.(interface{ CloseWrite() error }); ok {
				err = cw.CloseWrite()
			}
		}
		errc <- err
	}()
	for i := 0; i < 2; i++ {
		if err := <-errc; err != nil {
			abort()
		}
	}
	// Both directions finished cleanly: let the fin be acknowledged, then close.
	fctx, fcancel := context.WithTimeout(ctx, 30*time.Second)
	_ = c.Flush(fctx)
	fcancel()
	abort()
}

type readerCtx struct {
	ctx context.Context
	c   *Conn
}

func (r readerCtx) Read(p []byte) (int, error) {
	n, err := r.c.ReadContext(r.ctx, p)
	if errors.Is(err, context.Canceled) {
		return n, net.ErrClosed
	}
	return n, err
}
