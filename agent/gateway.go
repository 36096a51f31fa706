package agent

import (
	"context"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
)

// gateway is the agent's end of the WAN gateway. The destination listens
// and serves forwards to the targets the controller allowed; the source
// dials and keeps one local listener per forwarded target.
type gateway struct {
	a *Agent

	mu       sync.Mutex
	ctx      context.Context // of the running gateway; nil when stopped
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	ln       *wan.Listener
	sessions []*wan.Session // destination: accepted sessions
	allowed  map[string]bool
	cur      *wan.Session // source: the dialled session
	dialAddr string
	changed  chan struct{} // closed when cur changes
	forwards map[string]string
	rate     int64
	base     GatewayStatsResponse // counters of sessions already closed
}

func (g *gateway) startLocked() context.Context {
	if g.ctx == nil {
		g.ctx, g.cancel = context.WithCancel(g.a.ctx)
		g.allowed = map[string]bool{}
		g.forwards = map[string]string{}
		g.changed = make(chan struct{})
	}
	return g.ctx
}

func (g *gateway) wanConfig() wan.Config {
	m := g.a.cfg.TLS
	return wan.Config{CertPEM: m.GatewayCert, KeyPEM: m.GatewayKey, CAPEM: m.CACert, Logger: g.a.log.Named("wan")}
}

func (g *gateway) listenAddr() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ln == nil {
		return ""
	}
	return g.ln.Addr().String()
}

func (g *gateway) role(want contract.Role, what string) error {
	if g.a.cfg.Role != want {
		return fmt.Errorf("%s runs on the %s agent, this is the %s agent: %w", what, want, g.a.cfg.Role, contract.ErrInvalidArgument)
	}
	return nil
}

// listen starts the destination listener (idempotent: an existing
// listener is kept and its address returned).
func (g *gateway) listen(ctx context.Context, req GatewayListenRequest) (GatewayListenResponse, error) {
	if err := g.role(contract.RoleDestination, "GatewayListen"); err != nil {
		return GatewayListenResponse{}, err
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ln != nil {
		return GatewayListenResponse{Addr: g.ln.Addr().String()}, nil
	}
	gctx := g.startLocked()
	addr := req.Addr
	if addr == "" {
		addr = g.a.cfg.GatewayListen
	}
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := wan.Listen(ctx, addr, g.wanConfig())
	if err != nil {
		return GatewayListenResponse{}, fmt.Errorf("gateway listen: %v: %w", err, contract.ErrUnavailable)
	}
	g.ln = ln
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.acceptLoop(gctx, ln)
	}()
	g.a.log.Info("gateway listening", "addr", ln.Addr().String())
	return GatewayListenResponse{Addr: ln.Addr().String()}, nil
}

func (g *gateway) acceptLoop(ctx context.Context, ln *wan.Listener) {
	for {
		sess, err := ln.Accept(ctx)
		if err != nil {
			return
		}
		g.mu.Lock()
		g.sessions = append(g.sessions, sess)
		if g.rate > 0 {
			sess.SetRateLimit(g.rate)
		}
		g.mu.Unlock()
		g.a.log.Info("gateway session accepted", "session", sess.ID())
		g.wg.Add(1)
		go func() {
			defer g.wg.Done()
			_ = sess.ServeForwards(ctx, g.policy)
			select {
			case <-sess.Done():
				g.retire(sess)
			case <-ctx.Done(): // stop folds and closes it
			}
		}()
	}
}

// retire removes an accepted session that ended from the live list and
// adds its counters to the base, so a destination whose source re-dials
// many times does not keep every ended session (and GatewayStats stays
// cumulative, after GatewayStop too).
func (g *gateway) retire(sess *wan.Session) {
	g.mu.Lock()
	found := false
	for i, s := range g.sessions {
		if s == sess {
			g.sessions = append(g.sessions[:i], g.sessions[i+1:]...)
			found = true
			break
		}
	}
	if found {
		g.fold(sess)
	}
	g.mu.Unlock()
	if found {
		_ = sess.Close() // already ended: releases what is left
		g.a.log.Info("gateway session ended", "session", sess.ID(), "error", sess.Err())
	}
}

// liveSessions is the number of accepted sessions kept (tests).
func (g *gateway) liveSessions() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.sessions)
}

// policy allows exactly the targets the controller named (GatewayAllow).
func (g *gateway) policy(target string) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.allowed[target] {
		return fmt.Errorf("%w: %s was not allowed by the controller", wan.ErrNotAllowed, target)
	}
	return nil
}

func (g *gateway) allow(_ context.Context, req GatewayAllowRequest) (Empty, error) {
	if err := g.role(contract.RoleDestination, "GatewayAllow"); err != nil {
		return Empty{}, err
	}
	for _, t := range req.Targets {
		if _, _, err := net.SplitHostPort(t); err != nil {
			return Empty{}, fmt.Errorf("forward target %q: %v: %w", t, err, contract.ErrInvalidArgument)
		}
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.startLocked()
	for _, t := range req.Targets {
		g.allowed[t] = true
	}
	return Empty{}, nil
}

func parseCompression(s string) (wan.Compression, error) {
	switch s {
	case "", "zstd", "auto":
		return wan.CompressAuto, nil
	case "none", "off":
		return wan.CompressOff, nil
	case "always":
		return wan.CompressAlways, nil
	}
	return 0, fmt.Errorf("compression %q: want zstd, none or always: %w", s, contract.ErrInvalidArgument)
}

// dial opens the source session; a live session to the same address is kept.
func (g *gateway) dial(ctx context.Context, req GatewayDialRequest) (GatewayDialResponse, error) {
	if err := g.role(contract.RoleSource, "GatewayDial"); err != nil {
		return GatewayDialResponse{}, err
	}
	if req.Addr == "" || req.Streams < 0 || req.BandwidthBytesPerSec < 0 {
		return GatewayDialResponse{}, fmt.Errorf("gateway dial needs an address and non-negative streams and bandwidth: %w", contract.ErrInvalidArgument)
	}
	comp, err := parseCompression(req.Compression)
	if err != nil {
		return GatewayDialResponse{}, err
	}
	g.mu.Lock()
	// Keep a live session to the same address; one without any connected
	// stream (e.g. the destination agent restarted and the loss is not
	// noticed yet) is replaced.
	if g.cur != nil && g.cur.Err() == nil && g.dialAddr == req.Addr && g.cur.Stats().Connected > 0 {
		id := g.cur.ID()
		g.mu.Unlock()
		return GatewayDialResponse{SessionID: id, Existing: true}, nil
	}
	g.startLocked()
	g.mu.Unlock()

	cfg := g.wanConfig()
	cfg.Streams, cfg.Compression = req.Streams, comp
	cfg.RateLimit, cfg.Bandwidth = req.BandwidthBytesPerSec, req.BandwidthBytesPerSec
	sess, err := wan.Dial(ctx, req.Addr, cfg)
	if err != nil {
		return GatewayDialResponse{}, fmt.Errorf("gateway dial %s: %v: %w", req.Addr, err, contract.ErrUnavailable)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ctx == nil { // stopped meanwhile
		_ = sess.Close()
		return GatewayDialResponse{}, fmt.Errorf("gateway stopped: %w", contract.ErrCancelled)
	}
	if old := g.cur; old != nil {
		g.fold(old)
		_ = old.Close()
	}
	g.cur, g.dialAddr, g.rate = sess, req.Addr, req.BandwidthBytesPerSec
	close(g.changed)
	g.changed = make(chan struct{})
	g.a.log.Info("gateway session dialled", "addr", req.Addr, "session", sess.ID())
	return GatewayDialResponse{SessionID: sess.ID()}, nil
}

// forward returns the local end for target (the same one on every call).
func (g *gateway) forward(_ context.Context, req GatewayForwardRequest) (GatewayForwardResponse, error) {
	if err := g.role(contract.RoleSource, "GatewayForward"); err != nil {
		return GatewayForwardResponse{}, err
	}
	if _, _, err := net.SplitHostPort(req.Target); err != nil {
		return GatewayForwardResponse{}, fmt.Errorf("forward target %q: %v: %w", req.Target, err, contract.ErrInvalidArgument)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cur == nil {
		return GatewayForwardResponse{}, fmt.Errorf("gateway not dialled yet (GatewayDial first): %w", contract.ErrFailedPrecondition)
	}
	if addr, ok := g.forwards[req.Target]; ok {
		return GatewayForwardResponse{Addr: addr}, nil
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(g.a.cfg.ForwardHost, "0"))
	if err != nil {
		return GatewayForwardResponse{}, fmt.Errorf("forward listen: %v: %w", err, contract.ErrUnavailable)
	}
	addr := ln.Addr().String()
	g.forwards[req.Target] = addr
	gctx := g.ctx
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		g.supervise(gctx, ln, addr, req.Target)
	}()
	g.a.log.Info("gateway forward", "local", addr, "target", req.Target)
	return GatewayForwardResponse{Addr: addr}, nil
}

// supervise keeps a forward's local end serving across sessions: when the
// session is replaced (re-dialled after an outage or an agent restart at
// the other end), it listens again on the same address.
func (g *gateway) supervise(ctx context.Context, ln net.Listener, addr, target string) {
	defer func() {
		if ln != nil {
			_ = ln.Close()
		}
	}()
	var last *wan.Session
	for ctx.Err() == nil {
		g.mu.Lock()
		sess, changed := g.cur, g.changed
		g.mu.Unlock()
		if sess == nil || sess.Err() != nil || sess == last {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			case <-time.After(time.Second):
				last = nil // the same session may be fine again (Forward failed on a transient error)
			}
			continue
		}
		if ln == nil {
			var err error
			if ln, err = net.Listen("tcp", addr); err != nil {
				g.a.log.Warn("forward re-listen failed", "local", addr, "error", err)
				last = sess
				continue
			}
		}
		err := sess.Forward(ctx, ln, target) // closes ln
		ln, last = nil, sess
		if ctx.Err() == nil {
			g.a.log.Debug("forward ended, waiting for a session", "local", addr, "target", target, "error", err)
		}
	}
}

// fold adds a closing session's counters to the base (under g.mu).
func (g *gateway) fold(s *wan.Session) {
	st := s.Stats()
	g.base.BytesOffered += st.BytesOffered
	g.base.BytesOnWire += st.BytesOnWire
	g.base.BytesReceivedOnWire += st.BytesReceivedOnWire
	g.base.PayloadOnWire += st.PayloadOnWire
	g.base.RetransmittedBytes += st.RetransmittedBytes
	g.base.Reconnects += st.Reconnects
	g.base.Sessions++
}

func (g *gateway) stats(context.Context, Empty) (GatewayStatsResponse, error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	out := g.base
	out.RateLimit = g.rate
	live := append([]*wan.Session(nil), g.sessions...)
	if g.cur != nil {
		live = append(live, g.cur)
	}
	for _, s := range live {
		st := s.Stats()
		out.BytesOffered += st.BytesOffered
		out.BytesOnWire += st.BytesOnWire
		out.BytesReceivedOnWire += st.BytesReceivedOnWire
		out.PayloadOnWire += st.PayloadOnWire
		out.RetransmittedBytes += st.RetransmittedBytes
		out.Reconnects += st.Reconnects
		out.Connected += st.Connected
		out.Sessions++
		out.RateLimit = st.RateLimit
	}
	out.CompressionRatio = 1
	if out.PayloadOnWire > 0 {
		out.CompressionRatio = float64(out.BytesOffered-out.RetransmittedBytes) / float64(out.PayloadOnWire)
		if out.CompressionRatio <= 0 {
			out.CompressionRatio = 1
		}
	}
	return out, nil
}

func (g *gateway) setRateLimit(_ context.Context, req SetRateLimitRequest) (Empty, error) {
	if req.BytesPerSec < 0 {
		return Empty{}, fmt.Errorf("negative rate limit: %w", contract.ErrInvalidArgument)
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	g.rate = req.BytesPerSec
	for _, s := range g.sessions {
		s.SetRateLimit(req.BytesPerSec)
	}
	if g.cur != nil {
		g.cur.SetRateLimit(req.BytesPerSec)
	}
	return Empty{}, nil
}

// stop closes everything of the gateway (idempotent). Counters survive.
func (g *gateway) stop() {
	g.mu.Lock()
	if g.ctx == nil {
		g.mu.Unlock()
		return
	}
	g.cancel()
	ln, sessions, cur := g.ln, g.sessions, g.cur
	for _, s := range sessions {
		g.fold(s)
	}
	if cur != nil {
		g.fold(cur)
	}
	g.ctx, g.ln, g.sessions, g.cur, g.dialAddr = nil, nil, nil, nil, ""
	g.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	for _, s := range sessions {
		_ = s.Close()
	}
	if cur != nil {
		_ = cur.Close()
	}
	g.wg.Wait()
}
