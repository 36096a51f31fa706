package wanemu

import (
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

// echoServer echoes every connection until EOF.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

func newLink(t *testing.T, cfg LinkConfig) *Link {
	t.Helper()
	cfg.Logger = testutil.Logger(t)
	l, err := NewLink(context.Background(), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { _ = l.Close() })
	return l
}

func TestLinkDelaysAndCounts(t *testing.T) {
	before := runtime.NumGoroutine()
	up := echoServer(t)
	l := newLink(t, LinkConfig{Upstream: up, RTT: 80 * time.Millisecond})
	c, err := net.Dial("tcp", l.Addr())
	require.NoError(t, err)
	msg := []byte("ping over the wan")
	buf := make([]byte, len(msg))
	t0 := time.Now()
	_, err = c.Write(msg)
	require.NoError(t, err)
	_, err = io.ReadFull(c, buf)
	require.NoError(t, err)
	rtt := time.Since(t0)
	assert.Equal(t, msg, buf)
	// A lower bound only: the emulated delay can never be skipped.
	assert.GreaterOrEqual(t, rtt, 80*time.Millisecond)
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool {
		k := l.Counters()
		return k.Upstream == int64(len(msg)) && k.Downstream == int64(len(msg))
	}, 5*time.Second, 10*time.Millisecond, "counters: %+v", l.Counters())
	require.NoError(t, l.Close())
	require.Eventually(t, func() bool { return runtime.NumGoroutine() <= before+4 }, 5*time.Second, 20*time.Millisecond)
}

func TestLinkCutAndRestore(t *testing.T) {
	up := echoServer(t)
	l := newLink(t, LinkConfig{Upstream: up, RTT: 4 * time.Millisecond})
	c, err := net.Dial("tcp", l.Addr())
	require.NoError(t, err)
	defer c.Close()
	_, err = c.Write([]byte("a"))
	require.NoError(t, err)
	_, err = io.ReadFull(c, make([]byte, 1))
	require.NoError(t, err)

	l.Cut()
	// Existing connection dropped.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	require.Error(t, err, "a cut drops established connections")
	// New connections refused.
	_, err = net.DialTimeout("tcp", l.Addr(), time.Second)
	require.Error(t, err)

	require.NoError(t, l.Restore())
	c2, err := net.Dial("tcp", l.Addr())
	require.NoError(t, err)
	defer c2.Close()
	_, err = c2.Write([]byte("b"))
	require.NoError(t, err)
	b := make([]byte, 1)
	_, err = io.ReadFull(c2, b)
	require.NoError(t, err)
	assert.Equal(t, byte('b'), b[0])
	assert.Equal(t, 1, l.Counters().Cuts)
}

// sink counts what it receives and discards it.
func sinkServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return ln.Addr().String()
}

// send pushes n bytes over each of conns connections at once and returns the
// achieved rate in bits/s measured from the link's own counter.
func send(t *testing.T, l *Link, conns, n int) float64 {
	t.Helper()
	start := l.Counters().Upstream
	t0 := time.Now()
	var wg sync.WaitGroup
	for i := 0; i < conns; i++ {
		c, err := net.Dial("tcp", l.Addr())
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			_, _ = c.Write(make([]byte, n))
		}()
	}
	wg.Wait()
	require.Eventually(t, func() bool { return l.Counters().Upstream-start >= int64(conns*n) }, 30*time.Second, 5*time.Millisecond)
	return float64(l.Counters().Upstream-start) * 8 / time.Since(t0).Seconds()
}

func TestLinkBandwidthIsShared(t *testing.T) {
	l := newLink(t, LinkConfig{Upstream: sinkServer(t), RTT: 2 * time.Millisecond, Bandwidth: 16e6})
	one := send(t, l, 1, 2<<20) / 16e6
	three := send(t, l, 3, 2<<20/3) / 16e6
	l.SetBandwidth(32e6)
	faster := send(t, l, 2, 2<<20) / 32e6
	t.Logf("achieved/limit: 1 conn %.3f, 3 conns %.3f, after SetBandwidth %.3f", one, three, faster)
	for _, r := range []float64{one, three, faster} {
		assert.GreaterOrEqual(t, r, 0.7)
		assert.LessOrEqual(t, r, 1.15, "the limit is shared by all connections")
	}
}

func TestLinkWindowLimitsOneConnection(t *testing.T) {
	// 64 KiB window over 100 ms RTT: one connection tops out near
	// 64 KiB / 0.1 s ≈ 5 Mbit/s; four connections get about four times that.
	l := newLink(t, LinkConfig{Upstream: sinkServer(t), RTT: 100 * time.Millisecond, Window: 64 << 10})
	one := send(t, l, 1, 1<<20)
	four := send(t, l, 4, 1<<20)
	t.Logf("1 conn %.1f Mbit/s, 4 conns %.1f Mbit/s", one/1e6, four/1e6)
	assert.Greater(t, four/one, 2.0, "parallel connections must beat one window-limited connection")
	assert.Less(t, one, 12e6, "one connection is held near window/RTT (5 Mbit/s), far below an unbounded link")
}

func TestLinkBlackhole(t *testing.T) {
	up := echoServer(t)
	l := newLink(t, LinkConfig{Upstream: up, RTT: 4 * time.Millisecond})
	c, err := net.Dial("tcp", l.Addr())
	require.NoError(t, err)
	defer c.Close()

	l.Blackhole()
	_, err = c.Write([]byte("lost"))
	require.NoError(t, err, "the connection stays open")
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = c.Read(make([]byte, 4))
	var nerr net.Error
	require.ErrorAs(t, err, &nerr)
	assert.True(t, nerr.Timeout(), "silence, not a close: %v", err)

	require.NoError(t, l.Restore())
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(c)
	var ne net.Error
	assert.False(t, errors.As(err, &ne) && ne.Timeout(), "the old connection is dropped, not left hanging: %v", err)
	c2, err := net.Dial("tcp", l.Addr())
	require.NoError(t, err)
	defer c2.Close()
	_, err = c2.Write([]byte("back"))
	require.NoError(t, err)
	b := make([]byte, 4)
	_, err = io.ReadFull(c2, b)
	require.NoError(t, err)
	assert.Equal(t, "back", string(b))
	assert.Equal(t, 1, l.Counters().Cuts)
}
