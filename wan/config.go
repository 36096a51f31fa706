package wan

import (
	"errors"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Errors a session reports. Use errors.Is.
var (
	// ErrOutage: no stream could be (re)established for Config.MaxOutage.
	ErrOutage = errors.New("wan: link outage exceeded the allowed maximum")
	// ErrClosed: the session was closed locally.
	ErrClosed = errors.New("wan: session closed")
	// ErrPeerClosed: the peer closed the session.
	ErrPeerClosed = errors.New("wan: session closed by peer")
	// ErrSessionLost: the listening side no longer knows this session (it restarted).
	ErrSessionLost = errors.New("wan: session unknown to peer")
	// ErrReset: the peer aborted a channel (dial failure, apply failure, reset).
	ErrReset = errors.New("wan: channel reset by peer")
	// ErrNotAllowed: a forward target was refused by the peer's policy.
	ErrNotAllowed = errors.New("wan: forward target not allowed")
	// ErrProtocol: the peer sent something that does not follow the protocol.
	ErrProtocol = errors.New("wan: protocol error")
)

// Compression selects the per-frame zstd policy.
type Compression int

// Compression policies.
const (
	CompressAuto   Compression = iota // compress, skip automatically while data is incompressible
	CompressOff                       // never compress
	CompressAlways                    // compress every frame
)

// Config configures both ends of a session. Zero values select defaults.
type Config struct {
	// TLS material, PEM encoded: this side's certificate and key and the
	// pinned per-migration CA the peer's certificate must chain to.
	CertPEM, KeyPEM, CAPEM []byte
	// ServerName the dialling side verifies in the listener's certificate
	// (DefaultServerName when empty).
	ServerName string

	// Streams is the number of parallel TCP streams the dialling side opens.
	// 0 picks it from the measured RTT and Bandwidth (or RateLimit).
	Streams int
	// MaxStreams bounds the automatic choice and what a listener accepts (16).
	MaxStreams int
	// Bandwidth is the expected link rate in bytes/s, used only to pick the
	// stream count; 0 means unknown.
	Bandwidth int64
	// StreamWindow is the bytes one TCP stream is assumed to keep in flight
	// when choosing the stream count (4 MiB, Linux's default tcp_wmem max).
	StreamWindow int64

	// RateLimit caps the bytes/s written to the wire by all streams together
	// (0 = unlimited). Change it later with Session.SetRateLimit.
	RateLimit int64
	// ChannelWindow is how many unacknowledged payload bytes one channel may
	// have outstanding. It must cover the bandwidth-delay product plus the
	// socket buffers of every stream for a single channel to fill the link.
	// 0 = 4 × streams × StreamWindow, bounded to 32..128 MiB. Larger
	// values are lowered to 128 MiB: the receiver refuses a channel holding
	// much more than that unconsumed (ErrProtocol).
	ChannelWindow int
	// MaxFrame is the largest payload of one frame before compression (256 KiB).
	MaxFrame int
	// Compression policy (CompressAuto).
	Compression Compression

	// MaxOutage is how long a session survives with no connected stream (2m).
	MaxOutage time.Duration
	// IdleTimeout closes a stream that received nothing, not even a
	// heartbeat, for this long (20s). Heartbeats go every second.
	IdleTimeout time.Duration
	// DialTimeout bounds one TCP+TLS dial and handshake (10s).
	DialTimeout time.Duration
	// MinBackoff and MaxBackoff bound the re-dial backoff (100ms, 5s).
	MinBackoff, MaxBackoff time.Duration

	// Logger receives debug and warning lines (hclog.NewNullLogger when nil).
	Logger hclog.Logger
}

func (c Config) withDefaults() Config {
	if c.MaxStreams <= 0 {
		c.MaxStreams = 16
	}
	if c.StreamWindow <= 0 {
		c.StreamWindow = 4 << 20
	}
	if c.ChannelWindow <= 0 {
		c.ChannelWindow = minChannelWindow
	}
	c.ChannelWindow = min(c.ChannelWindow, maxChannelWindow)
	if c.MaxFrame <= 0 {
		c.MaxFrame = 256 << 10
	}
	if c.MaxFrame > maxPayload {
		c.MaxFrame = maxPayload
	}
	if c.MaxOutage <= 0 {
		c.MaxOutage = 2 * time.Minute
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 20 * time.Second
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.MinBackoff <= 0 {
		c.MinBackoff = 100 * time.Millisecond
	}
	if c.MaxBackoff <= 0 {
		c.MaxBackoff = 5 * time.Second
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	return c
}

const (
	minChannelWindow = 32 << 20
	maxChannelWindow = 128 << 20
)

// autoChannelWindow sizes the default channel window for n streams.
func autoChannelWindow(n int, streamWindow int64) int {
	w := int64(n) * 4 * streamWindow
	return int(min(max(w, minChannelWindow), maxChannelWindow))
}

// chooseStreams picks the stream count so that the per-stream windows cover
// the bandwidth-delay product, bounded by [1, max].
func chooseStreams(rtt time.Duration, bandwidth, window int64, max int) int {
	if bandwidth <= 0 {
		return min(4, max)
	}
	bdp := float64(bandwidth) * rtt.Seconds()
	n := int(bdp/float64(window)) + 1
	// A spare stream keeps the link busy while one recovers from a loss.
	n++
	return max1(min(n, max))
}

func max1(n int) int {
	if n < 1 {
		return 1
	}
	return n
}
