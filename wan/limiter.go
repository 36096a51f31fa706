package wan

import (
	"context"
	"sync"
	"time"
)

// RateLimiter is a token bucket: the gateway shares one between all streams
// of a session, and backends may use it to pace their own traffic. Waiting
// callers take their bytes on credit and sleep off the debt, so large frames
// are admitted at the right average rate. Safe for concurrent use.
type RateLimiter struct {
	mu     sync.Mutex
	rate   float64 // bytes per second; 0 = unlimited
	tokens float64
	last   time.Time
}

// NewRateLimiter returns a limiter of rate bytes per second (0: unlimited).
func NewRateLimiter(rate int64) *RateLimiter {
	l := &RateLimiter{last: time.Now()}
	l.SetRate(rate)
	return l
}

func (l *RateLimiter) burst() float64 {
	// 20 ms of traffic, at least 64 KiB: small enough to hold the rate over
	// sub-second windows, large enough not to chop frames.
	return max(l.rate*0.02, 64<<10)
}

func (l *RateLimiter) refill(now time.Time) {
	if l.rate > 0 {
		l.tokens += now.Sub(l.last).Seconds() * l.rate
		if b := l.burst(); l.tokens > b {
			l.tokens = b
		}
	}
	l.last = now
}

// SetRate changes the rate (bytes per second, 0: unlimited) while in use.
func (l *RateLimiter) SetRate(rate int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.refill(time.Now())
	if rate < 0 {
		rate = 0
	}
	l.rate = float64(rate)
	if l.rate == 0 {
		l.tokens = 0
	}
}

// Rate returns the current rate in bytes per second (0: unlimited).
func (l *RateLimiter) Rate() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return int64(l.rate)
}

// Wait blocks until n bytes may be sent, or ctx ends.
func (l *RateLimiter) Wait(ctx context.Context, n int64) error {
	l.mu.Lock()
	if l.rate == 0 {
		l.mu.Unlock()
		return nil
	}
	l.refill(time.Now())
	l.tokens -= float64(n)
	var d time.Duration
	if l.tokens < 0 {
		d = time.Duration(-l.tokens / l.rate * float64(time.Second))
	}
	l.mu.Unlock()
	if d <= 0 {
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
