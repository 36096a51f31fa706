package wan

import (
	"context"
	"sync"
	"time"
)

// limiter is a token bucket shared by all streams of a session. Waiting
// callers take their bytes on credit and sleep off the debt, so large frames
// are admitted at the right average rate.
type limiter struct {
	mu     sync.Mutex
	rate   float64 // bytes per second; 0 = unlimited
	tokens float64
	last   time.Time
}

func newLimiter(rate int64) *limiter {
	l := &limiter{last: time.Now()}
	l.set(rate)
	return l
}

func (l *limiter) burst() float64 {
	// 20 ms of traffic, at least 64 KiB: small enough to hold the rate over
	// sub-second windows, large enough not to chop frames.
	return max(l.rate*0.02, 64<<10)
}

func (l *limiter) refill(now time.Time) {
	if l.rate > 0 {
		l.tokens += now.Sub(l.last).Seconds() * l.rate
		if b := l.burst(); l.tokens > b {
			l.tokens = b
		}
	}
	l.last = now
}

func (l *limiter) set(rate int64) {
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

func (l *limiter) get() int64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return int64(l.rate)
}

// wait blocks until n bytes may be sent.
func (l *limiter) wait(ctx context.Context, n int) error {
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
