// Package wanemu emulates a WAN link in userspace for tests, the demo and
// benchmarks: a TCP proxy (Shopify/toxiproxy used as a library) between a
// local listening address and an upstream address, with a one-way delay of
// RTT/2 in each direction, a bandwidth shared by all connections crossing
// the link (per direction, FIFO), scripted cuts and byte counters.
//
// What it does not model: packet loss, reordering and per-connection TCP
// window limits across the emulated delay (the proxy terminates TCP on both
// sides, so each connection's window only spans loopback). See
// docs/wan-gateway.md.
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
	// Logger (hclog.NewNullLogger when nil).
	Logger hclog.Logger
}

// ErrClosed is returned by operations on a closed link.
var ErrClosed = errors.New("wanemu: link closed")

// Link is a running emulated link.
type Link struct {
	cfg   LinkConfig
	log   hclog.Logger
	proxy *toxiproxy.Proxy
	up    *pacer // client → upstream
	down  *pacer // upstream → client

	mu     sync.Mutex
	cut    bool
	closed bool
	cuts   int
}

var registerOnce sync.Once

const paceToxicType = "wanemu_pace"

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
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	registerOnce.Do(func() { toxics.Register(paceToxicType, new(paceToxic)) })
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	name := fmt.Sprintf("wanemu-%d", linkSeq.Add(1))
	p := toxiproxy.NewProxy(server, name, cfg.Listen, cfg.Upstream)
	l := &Link{cfg: cfg, log: cfg.Logger.With("link", name), proxy: p, up: newPacer(cfg.Bandwidth), down: newPacer(cfg.Bandwidth)}
	for _, dir := range []string{"upstream", "downstream"} {
		if cfg.RTT > 0 {
			// Latency in ms per direction (toxiproxy's unit); RTT = 2 × latency.
			lat := fmt.Sprintf(`{"name":"latency_%s","type":"latency","stream":%q,"attributes":{"latency":%d}}`, dir, dir, (cfg.RTT / 2).Milliseconds())
			if _, err := p.Toxics.AddToxicJson(strings.NewReader(lat)); err != nil {
				return nil, fmt.Errorf("wanemu: add latency: %w", err)
			}
		}
		j, _ := json.Marshal(map[string]any{"name": "pace_" + dir, "type": paceToxicType, "stream": dir})
		w, err := p.Toxics.AddToxicJson(strings.NewReader(string(j)))
		if err != nil {
			return nil, fmt.Errorf("wanemu: add pacing: %w", err)
		}
		pt, ok := w.Toxic.(*paceToxic)
		if !ok {
			return nil, errors.New("wanemu: pacing toxic has the wrong type")
		}
		if dir == "upstream" {
			pt.p = l.up
		} else {
			pt.p = l.down
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

// Restore accepts connections again on the same address after a Cut.
func (l *Link) Restore() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.closed {
		return ErrClosed
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
	Cuts       int
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
	done   chan struct{}
	closed bool
	gone   chan struct{} // closed when the link drops its current connections
}

func newPacer(bitsPerSec int64) *pacer {
	p := &pacer{done: make(chan struct{}), gone: make(chan struct{})}
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
	if !p.closed {
		p.closed = true
		close(p.done)
	}
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

// paceToxic is a toxiproxy toxic delegating to a link's pacer. One instance
// serves all connections of one direction, so the rate is shared.
type paceToxic struct {
	p *pacer
}

const paceChunk = 16 << 10

func (t *paceToxic) Pipe(stub *toxics.ToxicStub) {
	var gone, done chan struct{}
	if t.p != nil {
		gone, done = t.p.generation(), t.p.done
	}
	for {
		select {
		case <-stub.Interrupt:
			return
		case <-gone:
			drain(stub)
			return
		case c := <-stub.Input:
			if c == nil {
				stub.Close()
				return
			}
			data := c.Data
			for len(data) > 0 {
				n := min(len(data), paceChunk)
				piece := data[:n]
				data = data[n:]
				if t.p != nil {
					if d := t.p.reserve(n); d > 0 {
						tm := time.NewTimer(d)
						select {
						case <-tm.C:
						case <-stub.Interrupt:
							tm.Stop()
							// Do not drop data: pass the rest on and stop.
							stub.Output <- &stream.StreamChunk{Data: append(piece, data...), Timestamp: c.Timestamp}
							return
						case <-gone:
							tm.Stop()
							drain(stub)
							return
						case <-done:
							tm.Stop()
						}
					}
					t.p.bytes.Add(int64(n))
				}
				select {
				case stub.Output <- &stream.StreamChunk{Data: piece, Timestamp: c.Timestamp}:
				case <-gone:
					drain(stub)
					return
				}
			}
		}
	}
}

// drain discards a dropped connection's data until its pipeline closes, so
// the toxics before this one never block.
func drain(stub *toxics.ToxicStub) {
	for c := range stub.Input {
		if c == nil {
			break
		}
	}
	stub.Close()
}
