// Package wanemu emulates a WAN link in userspace for tests, the demo and
// benchmarks: a TCP proxy (Shopify/toxiproxy used as a library) between a
// local listening address and an upstream address, with a one-way delay of
// RTT/2 in each direction, a bandwidth shared by all connections crossing
// the link (per direction, FIFO), scripted cuts and byte counters.
//
// The proxy terminates TCP on both sides, so a connection's real TCP window
// only spans loopback; LinkConfig.Window emulates the window limit across
// the emulated delay instead. Packet loss and reordering are not modelled.
// See docs/wan-gateway.md.
package wanemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/hashicorp/go-hclog"
	"github.com/rs/zerolog"
)

// LinkConfig describes an emulated link.
type LinkConfig struct {
	// Upstream is the address connections are forwarded to.
	Upstream string
	// Listen is the local address to accept on (127.0.0.1:0 when empty).
	Listen string
	// RTT is the round-trip propagation delay (each direction gets RTT/2).
	RTT time.Duration
	// Bandwidth is the link rate in bits per second per direction, shared by
	// every connection on the link (0 = unlimited).
	Bandwidth int64
	// Window bounds the bytes one connection may have in flight per
	// direction (sent into the link and not yet acknowledged: the
	// acknowledgement takes another RTT/2 to come back), which models a TCP
	// stream's window limit across the emulated delay. 0 selects
	// DefaultWindow; a negative value means unbounded.
	Window int64
	// Logger (hclog.NewNullLogger when nil).
	Logger hclog.Logger
}

// DefaultWindow is the per-connection in-flight limit when LinkConfig.Window
// is 0: 4 MiB, Linux's default maximum TCP send buffer (net.ipv4.tcp_wmem).
const DefaultWindow = 4 << 20

// ErrClosed is returned by operations on a closed link.
var ErrClosed = errors.New("wanemu: link closed")

// Link is a running emulated link.
type Link struct {
	cfg   LinkConfig
	log   hclog.Logger
	proxy *toxiproxy.Proxy
	up    *pacer // client → upstream
	down  *pacer // upstream → client

	mu        sync.Mutex
	cut       bool
	blackhole bool
	closed    bool
	cuts      int
}

var registerOnce sync.Once

const linkToxicType = "wanemu_link"

// NewLink starts a link. Close it when done.
func NewLink(ctx context.Context, cfg LinkConfig) (*Link, error) {
	if cfg.Upstream == "" {
		return nil, errors.New("wanemu: upstream address required")
	}
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Window == 0 {
		cfg.Window = DefaultWindow
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	registerOnce.Do(func() { toxics.Register(linkToxicType, new(linkToxic)) })
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	name := fmt.Sprintf("wanemu-%d", linkSeq.Add(1))
	p := toxiproxy.NewProxy(server, name, cfg.Listen, cfg.Upstream)
	l := &Link{cfg: cfg, log: cfg.Logger.With("link", name), proxy: p, up: newPacer(cfg.Bandwidth), down: newPacer(cfg.Bandwidth)}
	for _, dir := range []string{"upstream", "downstream"} {
		j, err := json.Marshal(map[string]any{"name": "wan_" + dir, "type": linkToxicType, "stream": dir})
		if err != nil {
			return nil, fmt.Errorf("wanemu: toxic json: %w", err)
		}
		w, err := p.Toxics.AddToxicJson(strings.NewReader(string(j)))
		if err != nil {
			return nil, fmt.Errorf("wanemu: add link toxic: %w", err)
		}
		lt, ok := w.Toxic.(*linkToxic)
		if !ok {
			return nil, errors.New("wanemu: link toxic has the wrong type")
		}
		lt.delay, lt.window = cfg.RTT/2, cfg.Window
		if dir == "upstream" {
			lt.p = l.up
		} else {
			lt.p = l.down
		}
	}
	if err := p.Start(); err != nil {
		return nil, fmt.Errorf("wanemu: start proxy: %w", err)
	}
	l.log.Debug("link up", "listen", p.Listen, "upstream", cfg.Upstream, "rtt", cfg.RTT, "bandwidth_bps", cfg.Bandwidth)
	return l, nil
}

var linkSeq atomic.Int64

// Addr is the address clients dial to cross the link.
func (l *Link) Addr() string {
	l.proxy.Lock()
	defer l.proxy.Unlock()
	return l.proxy.Listen
}

// Cut drops every connection on the link and refuses new ones until Restore.
func (l *Link) Cut() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.cut || l.closed {
		return
	}
	l.cut = true
	l.cuts++
	l.proxy.Stop()
	l.up.dropAll()
	l.down.dropAll()
	l.log.Debug("link cut")
}

// Blackhole makes the link silent without closing anything: connections
// stay open (and new ones are accepted) but no byte crosses in either
// direction, like a failed WAN path. Peers only notice through their own
// timeouts. Restore ends it; data that was in flight is lost and the
// connections that existed are dropped.
func (l *Link) Blackhole() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.blackhole || l.closed {
		return
	}
	l.blackhole = true
	l.cuts++
	l.up.setHold(true)
	l.down.setHold(true)
	l.log.Debug("link blackholed")
}

// Restore ends a Cut (accepting connections again on the same address) or a
// Blackhole.
func (l *Link) Restore() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
	}
	if l.blackhole {
		l.blackhole = false
		l.up.dropAll()
		l.down.dropAll()
		l.up.setHold(false)
		l.down.setHold(false)
		l.log.Debug("link blackhole ended")
	}
	if !l.cut {
		return nil
	}
	var err error
	for i := 0; i < 50; i++ { // the port can take a moment to free up
		if err = l.proxy.Start(); err == nil {
			l.cut = false
			l.log.Debug("link restored")
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("wanemu: restore: %w", err)
}

// SetBandwidth changes the link rate (bits/s, 0 = unlimited) for both
// directions, effective for data not yet paced.
func (l *Link) SetBandwidth(bitsPerSec int64) {
	l.up.setRate(bitsPerSec)
	l.down.setRate(bitsPerSec)
}

// Counters are the bytes that crossed the link.
type Counters struct {
	Upstream   int64 // client → upstream
	Downstream int64 // upstream → client
	Cuts       int   // cuts and blackholes so far
}

// Counters returns the bytes that crossed the link so far.
func (l *Link) Counters() Counters {
	l.mu.Lock()
	cuts := l.cuts
	l.mu.Unlock()
	return Counters{Upstream: l.up.bytes.Load(), Downstream: l.down.bytes.Load(), Cuts: cuts}
}

// Close stops the link and drops its connections.
func (l *Link) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return nil
	}
	l.closed = true
	l.proxy.Stop()
	l.up.dropAll()
	l.down.dropAll()
	l.up.setHold(false)
	l.down.setHold(false)
	l.up.close()
	l.down.close()
	return nil
}

// pacer serialises bytes at a fixed rate: one FIFO bottleneck shared by every
// connection crossing the link in one direction.
type pacer struct {
	mu     sync.Mutex
	rate   float64 // bytes/s; 0 = unlimited
	next   time.Time
	bytes  atomic.Int64
	closed bool
	gone   chan struct{} // closed when the link drops its current connections
	hold   chan struct{} // non-nil while blackholed; closed when released
}

func (p *pacer) setHold(on bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case on && p.hold == nil:
		p.hold = make(chan struct{})
	case !on && p.hold != nil:
		close(p.hold)
		p.hold = nil
	}
}

func (p *pacer) held() chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.hold
}

func newPacer(bitsPerSec int64) *pacer {
	p := &pacer{gone: make(chan struct{})}
	p.setRate(bitsPerSec)
	return p
}

func (p *pacer) setRate(bitsPerSec int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.rate = float64(max(bitsPerSec, 0)) / 8
}

// generation returns the channel closed when current connections are dropped.
func (p *pacer) generation() chan struct{} {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.gone
}

// dropAll abandons the data of every current connection (after a cut their
// sockets are closed and nobody reads the pipeline's output any more).
func (p *pacer) dropAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	close(p.gone)
	p.gone = make(chan struct{})
}

func (p *pacer) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
}

// reserve returns how long to wait before n bytes have left the bottleneck.
func (p *pacer) reserve(n int) time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	if p.rate == 0 {
		p.next = now
		return 0
	}
	if p.next.Before(now) {
		p.next = now
	}
	p.next = p.next.Add(time.Duration(float64(n) / p.rate * float64(time.Second)))
	return p.next.Sub(now)
}

// linkToxic is a toxiproxy toxic modelling one direction of the link for
// one connection: the shared FIFO bottleneck (pacer), the one-way delay and
// an optional per-connection window. One instance serves every connection of
// its direction (toxiproxy calls Pipe once per connection).
type linkToxic struct {
	p      *pacer
	delay  time.Duration
	window int64
}

const paceChunk = 32 << 10

type inFlight struct {
	chunk *stream.StreamChunk
	at    time.Time
}

func (t *linkToxic) Pipe(stub *toxics.ToxicStub) {
	if t.p == nil {
		new(toxics.NoopToxic).Pipe(stub)
		return
	}
	gone := t.p.generation()
	q := make(chan inFlight, 4096)
	flush := make(chan struct{})
	finished := make(chan struct{})
	var mu sync.Mutex
	var inflight int64
	credit := make(chan struct{}, 1)
	release := func(n int64) {
		mu.Lock()
		inflight -= n
		mu.Unlock()
		select {
		case credit <- struct{}{}:
		default:
		}
	}
	// Deliver in order once each piece has crossed the link.
	go func() {
		defer close(finished)
		for {
			var it inFlight
			select {
			case x, ok := <-q:
				if !ok {
					return
				}
				it = x
			case <-gone:
				return
			}
			if d := time.Until(it.at); d > 0 {
				tm := time.NewTimer(d)
				select {
				case <-tm.C:
				case <-flush:
					tm.Stop()
				case <-gone:
					tm.Stop()
					return
				}
			}
			if h := t.p.held(); h != nil {
				select {
				case <-h:
				case <-gone:
					return
				}
			}
			select {
			case stub.Output <- it.chunk:
			case <-gone:
				return
			}
			t.p.bytes.Add(int64(len(it.chunk.Data)))
			if t.window > 0 {
				n := int64(len(it.chunk.Data))
				time.AfterFunc(t.delay, func() { release(n) }) // the ack's way back
			}
		}
	}()
	stop := func(interrupted bool) {
		close(q)
		if interrupted {
			close(flush) // hand over everything at once, nothing dropped
		}
		<-finished // it stops promptly when the link drops connections
	}
	for {
		if t.window > 0 {
			for {
				mu.Lock()
				full := inflight >= t.window
				mu.Unlock()
				if !full {
					break
				}
				select {
				case <-credit:
				case <-stub.Interrupt:
					stop(true)
					return
				case <-gone:
					<-finished
					drain(stub)
					return
				}
			}
		}
		select {
		case <-stub.Interrupt:
			stop(true)
			return
		case <-gone:
			<-finished
			drain(stub)
			return
		case c := <-stub.Input:
			if c == nil {
				stop(false)
				stub.Close()
				return
			}
			data := c.Data
			for len(data) > 0 {
				n := min(len(data), paceChunk)
				wait := t.p.reserve(n) // serialisation at the shared bottleneck
				mu.Lock()
				inflight += int64(n)
				mu.Unlock()
				select {
				case q <- inFlight{chunk: &stream.StreamChunk{Data: data[:n], Timestamp: c.Timestamp}, at: time.Now().Add(wait + t.delay)}:
				case <-gone:
					<-finished
					drain(stub)
					return
				}
				data = data[n:]
			}
		}
	}
}

// drain ends a dropped connection: closing the output makes toxiproxy close
// the destination socket, then the input is discarded until the pipeline
// closes, so the toxics before this one never block.
func drain(stub *toxics.ToxicStub) {
	stub.Close()
	for c := range stub.Input {
		if c == nil {
			break
		}
	}
}
