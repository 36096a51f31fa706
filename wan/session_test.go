package wan

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/wan/wanemu"
)

// testData returns n bytes mixing incompressible random runs, text-like
// compressible runs and zero runs.
func testData(seed int64, n int) []byte {
	r := rand.New(rand.NewSource(seed))
	b := make([]byte, n)
	for off := 0; off < n; {
		run := min(n-off, 1024+r.Intn(300<<10))
		switch r.Intn(3) {
		case 0:
			r.Read(b[off : off+run])
		case 1:
			for i := range run {
				b[off+i] = "the quick brown fox jumps over the lazy dog "[i%44]
			}
		case 2: // zeroes
		}
		off += run
	}
	return b
}

// hashServer accepts connections, hashes what it reads until EOF, writes
// back the digest and reply bytes, then closes its write side.
func hashServer(t *testing.T, reply []byte) (addr string, got chan [32]byte) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	got = make(chan [32]byte, 8)
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
				// Reply concurrently with reading: both directions at once.
				werr := make(chan error, 1)
				go func() {
					_, err := c.Write(reply)
					werr <- err
				}()
				h := sha256.New()
				_, err := io.Copy(h, c)
				if err != nil {
					return
				}
				var sum [32]byte
				copy(sum[:], h.Sum(nil))
				got <- sum
				if <-werr == nil {
					_ = c.(*net.TCPConn).CloseWrite()
				}
				_, _ = io.Copy(io.Discard, c)
			}()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		wg.Wait()
	})
	return ln.Addr().String(), got
}

// runForward sends up through a forwarded connection and checks the server
// saw exactly up (by hash) and the client read exactly down.
func runForward(t *testing.T, p *pair, up, down []byte, during func(stop <-chan struct{})) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	target, got := hashServer(t, down)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		_ = p.dst.ServeForwards(ctx, AllowTargets(target))
	}()
	go func() {
		defer wg.Done()
		_ = p.src.Forward(ctx, ln, target)
	}()
	defer func() {
		cancel()
		wg.Wait()
	}()

	c, err := net.Dial("tcp", ln.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	readDone := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(c)
		readDone <- b
	}()
	if during != nil {
		stop, stopped := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(stopped)
			during(stop)
		}()
		defer func() {
			close(stop)
			<-stopped
		}()
	}
	_, err = c.Write(up)
	require.NoError(t, err)
	require.NoError(t, c.(*net.TCPConn).CloseWrite())

	select {
	case sum := <-got:
		assert.Equal(t, sha256.Sum256(up), sum, "server received different bytes")
	case <-ctx.Done():
		t.Fatal("server never finished reading")
	}
	select {
	case b := <-readDone:
		require.Equal(t, len(down), len(b), "client read length")
		assert.True(t, bytes.Equal(down, b), "client read different bytes")
	case <-ctx.Done():
		t.Fatal("client never finished reading")
	}
}

func TestForwardBothDirections(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	up, down := testData(1, 6<<20), testData(2, 3<<20)
	runForward(t, p, up, down, nil)

	st := p.src.Stats()
	assert.GreaterOrEqual(t, st.BytesOffered, int64(len(up)))
	assert.Greater(t, st.CompressionRatio, 1.2, "mixed data should compress")
	assert.Greater(t, st.ZeroBytesElided, int64(0))
	assert.Less(t, st.BytesOnWire, int64(len(up)), "compression and zero elision should shrink the wire bytes")
	assert.Equal(t, int64(len(down)), st.BytesDelivered)
	assert.Equal(t, 4, len(st.Streams), "unknown bandwidth picks 4 streams")
}

func TestForwardRefusedAndDialFailure(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_ = p.dst.ServeForwards(ctx, AllowTargets("127.0.0.1:1"))
	}()
	defer func() {
		cancel()
		wg.Wait()
	}()
	for _, tc := range []struct{ name, target, want string }{
		{"not allowed", "127.0.0.1:9", "not allowed"},
		{"dial fails", "127.0.0.1:1", "dial 127.0.0.1:1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := p.src.OpenConn(ctx, tc.target)
			require.NoError(t, err)
			defer c.Close()
			_, err = c.ReadContext(ctx, make([]byte, 10))
			require.ErrorIs(t, err, ErrReset)
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

type memDisk struct {
	mu   sync.Mutex
	data []byte
	n    int
}

func (m *memDisk) apply(_ context.Context, b Block) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if b.Off < 0 || b.Off+b.Length > int64(len(m.data)) {
		return errors.New("out of range")
	}
	if b.Zero {
		clear(m.data[b.Off : b.Off+b.Length])
	} else {
		copy(m.data[b.Off:], b.Data)
	}
	m.n++
	return nil
}

// runBlocks writes an image through a block channel in random order and
// checks the receiver ends with the same content.
func runBlocks(t *testing.T, p *pair, size int, during func(stop <-chan struct{})) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	img := testData(7, size)
	disk := &memDisk{data: bytes.Repeat([]byte{0xAA}, size)}
	sink, err := p.dst.AcceptBlockChannel(ctx, "disk0", disk.apply)
	require.NoError(t, err)
	var ackMu sync.Mutex
	var ackedSum int64
	var ackedOffs []int64
	var inCB, overlaps atomic.Int32
	bs, err := p.src.OpenBlockChannel(ctx, "disk0", func(off, n int64) {
		if inCB.Add(1) > 1 {
			overlaps.Add(1)
		}
		defer inCB.Add(-1)
		ackMu.Lock()
		ackedSum += n
		ackedOffs = append(ackedOffs, off)
		ackMu.Unlock()
	})
	require.NoError(t, err)
	if during != nil {
		stop, stopped := make(chan struct{}), make(chan struct{})
		go func() {
			defer close(stopped)
			during(stop)
		}()
		defer func() {
			close(stop)
			<-stopped
		}()
	}
	const blk = 64 << 10
	order := rand.New(rand.NewSource(3)).Perm(size / blk)
	for i, b := range order {
		off := int64(b * blk)
		if i%7 == 0 {
			require.NoError(t, bs.WriteZeroes(ctx, off, blk))
			copy(img[off:off+blk], make([]byte, blk))
			continue
		}
		require.NoError(t, bs.Write(ctx, off, img[off:off+blk]))
	}
	require.NoError(t, bs.Close(ctx))
	require.NoError(t, sink.Wait(ctx))
	assert.True(t, bytes.Equal(img, disk.data), "replica differs from source image")
	assert.Equal(t, int64(size), bs.Acked())
	assert.Equal(t, int64(size), sink.Applied())
	ackMu.Lock()
	assert.Equal(t, int64(size), ackedSum, "ack callbacks cover every byte once")
	var wantOffs []int64
	for _, b := range order {
		wantOffs = append(wantOffs, int64(b*blk))
	}
	assert.Equal(t, wantOffs, ackedOffs, "ack callbacks run in the sender's order")
	ackMu.Unlock()
	assert.Zero(t, overlaps.Load(), "ack callbacks never run at the same time")
}

func TestBlockChannel(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	runBlocks(t, p, 8<<20, nil)
}

func TestBlockApplyFailureResetsSender(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	sink, err := p.dst.AcceptBlockChannel(ctx, "d", func(context.Context, Block) error { return errors.New("disk full") })
	require.NoError(t, err)
	bs, err := p.src.OpenBlockChannel(ctx, "d", nil)
	require.NoError(t, err)
	require.NoError(t, bs.Write(ctx, 0, []byte("hello")))
	err = bs.Flush(ctx)
	require.ErrorIs(t, err, ErrReset)
	assert.Contains(t, err.Error(), "disk full")
	assert.ErrorContains(t, sink.Wait(ctx), "disk full")
}

// cutter cuts the link n times at random points, keeping it down briefly,
// until stop is closed; the link is left up.
func cutter(t *testing.T, link *wanemu.Link, seed int64, n int, spacing time.Duration) func(stop <-chan struct{}) {
	return func(stop <-chan struct{}) {
		r := rand.New(rand.NewSource(seed))
		pause := func(d time.Duration) bool {
			select {
			case <-stop:
				return false
			case <-time.After(d):
				return true
			}
		}
		for i := 0; i < n; i++ {
			if !pause(time.Duration(r.Int63n(int64(spacing))) + 20*time.Millisecond) {
				return
			}
			link.Cut()
			pause(time.Duration(50+r.Intn(250)) * time.Millisecond)
			if err := link.Restore(); err != nil {
				t.Errorf("restore link: %v", err)
				return
			}
		}
	}
}

func linkedPair(t *testing.T, pk pki, lc wanemu.LinkConfig, tweak func(*Config)) (*pair, *wanemu.Link) {
	var link *wanemu.Link
	srv, cli := pk.serverConfig(t), pk.clientConfig(t)
	cli.MinBackoff, cli.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
	if tweak != nil {
		tweak(&cli)
	}
	p := newPair(t, srv, cli, func(addr string) string {
		lc.Upstream = addr
		var err error
		link, err = wanemu.NewLink(context.Background(), lc)
		require.NoError(t, err)
		t.Cleanup(func() { _ = link.Close() })
		return link.Addr()
	})
	return p, link
}

func TestIntegrityUnderCuts(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	for _, seed := range []int64{11, 12} {
		t.Run("forward", func(t *testing.T) {
			p, link := linkedPair(t, pk, wanemu.LinkConfig{RTT: 10 * time.Millisecond, Bandwidth: 400e6}, nil)
			up, down := testData(seed, 24<<20), testData(seed+100, 8<<20)
			runForward(t, p, up, down, cutter(t, link, seed, 3, 400*time.Millisecond))
			st := p.src.Stats()
			assert.Greater(t, st.Reconnects, int64(0), "streams re-dialled")
			assert.Greater(t, link.Counters().Cuts, 0)
			t.Logf("retransmitted=%d reconnects=%d dup=%d", st.RetransmittedBytes, st.Reconnects, p.dst.Stats().DuplicatesReceived)
		})
	}
	t.Run("blocks", func(t *testing.T) {
		p, link := linkedPair(t, pk, wanemu.LinkConfig{RTT: 10 * time.Millisecond, Bandwidth: 400e6}, nil)
		runBlocks(t, p, 24<<20, cutter(t, link, 5, 3, 300*time.Millisecond))
		assert.Greater(t, p.src.Stats().Reconnects, int64(0))
	})
}

func TestOutageGivesUp(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p, link := linkedPair(t, pk, wanemu.LinkConfig{RTT: 2 * time.Millisecond}, func(c *Config) {
		c.MaxOutage = 700 * time.Millisecond
	})
	link.Cut()
	select {
	case <-p.src.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("session did not give up")
	}
	require.ErrorIs(t, p.src.Err(), ErrOutage)
	ctx := context.Background()
	_, err := p.src.OpenConn(ctx, "x:1")
	assert.ErrorIs(t, err, ErrOutage)
}

func TestPeerCloseEndsSession(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	require.NoError(t, p.src.Close())
	select {
	case <-p.dst.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("peer did not notice the close")
	}
	assert.ErrorIs(t, p.dst.Err(), ErrPeerClosed)
	assert.ErrorIs(t, p.src.Err(), ErrClosed)
}

func TestRateLimit(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	cli := pk.clientConfig(t)
	cli.RateLimit = 3 << 20
	cli.Compression = CompressOff
	p := newPair(t, pk.serverConfig(t), cli, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sink, err := p.dst.AcceptBlockChannel(ctx, "r", func(context.Context, Block) error { return nil })
	require.NoError(t, err)
	bs, err := p.src.OpenBlockChannel(ctx, "r", nil)
	require.NoError(t, err)
	data := testData(99, 256<<10)
	rand.New(rand.NewSource(1)).Read(data)

	measure := func(limit int64, seconds float64) float64 {
		p.src.SetRateLimit(limit)
		total := int(float64(limit) * seconds)
		w0 := p.src.Stats().BytesOnWire
		t0 := time.Now()
		for off := 0; off < total; off += len(data) {
			require.NoError(t, bs.Write(ctx, int64(off), data))
		}
		require.NoError(t, bs.Flush(ctx))
		rate := float64(p.src.Stats().BytesOnWire-w0) / time.Since(t0).Seconds()
		return rate / float64(limit)
	}
	r1 := measure(3<<20, 2.5)
	r2 := measure(6<<20, 2.5)
	t.Logf("achieved/limit: %.3f at 3 MiB/s, %.3f at 6 MiB/s", r1, r2)
	for _, r := range []float64{r1, r2} {
		assert.GreaterOrEqual(t, r, 0.7)
		assert.LessOrEqual(t, r, 1.15)
	}
	require.NoError(t, bs.Close(ctx))
	require.NoError(t, sink.Wait(ctx))
}

func TestChooseStreams(t *testing.T) {
	for _, tc := range []struct {
		name string
		rtt  time.Duration
		bw   int64
		want int
	}{
		{"unknown bandwidth", 50 * time.Millisecond, 0, 4},
		{"100 Mbit 50 ms", 50 * time.Millisecond, 100e6 / 8, 2},
		{"1 Gbit 100 ms", 100 * time.Millisecond, 1e9 / 8, 4},
		{"10 Gbit 200 ms capped", 200 * time.Millisecond, 10e9 / 8, 16},
		{"lan", time.Millisecond, 1e9 / 8, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, chooseStreams(tc.rtt, tc.bw, 4<<20, 16))
		})
	}
}

func TestUnopenedSinkFailsWithSession(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sink, err := p.dst.AcceptBlockChannel(ctx, "never", func(context.Context, Block) error { return nil })
	require.NoError(t, err)
	_, err = p.dst.AcceptBlockChannel(ctx, "never", func(context.Context, Block) error { return nil })
	require.Error(t, err, "one sink per name")
	require.NoError(t, p.src.Close())
	assert.ErrorIs(t, sink.Wait(ctx), ErrPeerClosed)
}

func TestChannelsShareTheCapFairly(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	cli := pk.clientConfig(t)
	cli.RateLimit = 4 << 20
	cli.Compression = CompressOff
	p := newPair(t, pk.serverConfig(t), cli, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	data := make([]byte, 256<<10)
	rand.New(rand.NewSource(5)).Read(data)
	var sinks []*BlockSink
	var wg sync.WaitGroup
	for _, name := range []string{"a", "b"} {
		sink, err := p.dst.AcceptBlockChannel(ctx, name, func(context.Context, Block) error { return nil })
		require.NoError(t, err)
		sinks = append(sinks, sink)
		bs, err := p.src.OpenBlockChannel(ctx, name, nil)
		require.NoError(t, err)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for off := int64(0); ctx.Err() == nil; off += int64(len(data)) {
				if bs.Write(ctx, off, data) != nil {
					return
				}
			}
		}()
	}
	time.Sleep(2500 * time.Millisecond)
	a, b := sinks[0].Applied(), sinks[1].Applied()
	cancel()
	wg.Wait()
	t.Logf("applied: a=%d b=%d", a, b)
	require.Greater(t, a, int64(0))
	require.Greater(t, b, int64(0))
	ratio := float64(a) / float64(b)
	assert.GreaterOrEqual(t, ratio, 0.6, "channel a starved")
	assert.LessOrEqual(t, ratio, 1.67, "channel b starved")
}

func TestListenerRestartLosesSession(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p, link := linkedPair(t, pk, wanemu.LinkConfig{RTT: 2 * time.Millisecond}, nil)
	addr := p.l.Addr().String()
	link.Cut()
	// The destination agent dies and comes back on the same address.
	require.NoError(t, p.dst.Close())
	require.NoError(t, p.l.Close())
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	l2, err := Listen(ctx, addr, pk.serverConfig(t))
	require.NoError(t, err)
	defer l2.Close()
	require.NoError(t, link.Restore())
	select {
	case <-p.src.Done():
	case <-ctx.Done():
		t.Fatal("dialler did not notice the lost session")
	}
	assert.ErrorIs(t, p.src.Err(), ErrSessionLost)
}

func TestSilentOutageDetectedByIdleTimeout(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	srv, cli := pk.serverConfig(t), pk.clientConfig(t)
	srv.IdleTimeout, cli.IdleTimeout = 1500*time.Millisecond, 1500*time.Millisecond
	cli.DialTimeout = 2 * time.Second
	cli.MinBackoff, cli.MaxBackoff = 20*time.Millisecond, 200*time.Millisecond
	var link *wanemu.Link
	p := newPair(t, srv, cli, func(addr string) string {
		var err error
		link, err = wanemu.NewLink(context.Background(), wanemu.LinkConfig{Upstream: addr, RTT: 4 * time.Millisecond, Bandwidth: 200e6})
		require.NoError(t, err)
		t.Cleanup(func() { _ = link.Close() })
		return link.Addr()
	})
	up, down := testData(21, 8<<20), testData(22, 2<<20)
	runForward(t, p, up, down, func(stop <-chan struct{}) {
		select {
		case <-stop:
			return
		case <-time.After(100 * time.Millisecond):
		}
		link.Blackhole()
		time.Sleep(3 * time.Second) // longer than IdleTimeout: streams are declared dead
		if err := link.Restore(); err != nil {
			t.Errorf("restore: %v", err)
		}
	})
	assert.Greater(t, p.src.Stats().Reconnects, int64(0), "streams were re-dialled after the silent outage")
	assert.NoError(t, p.src.Err())
}

func TestConnDeadlinesAndEcho(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	p := newPair(t, pk.serverConfig(t), pk.clientConfig(t), nil)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// The destination side echoes one stream by hand (no ServeForwards).
	echoDone := make(chan error, 1)
	go func() {
		c, target, err := p.dst.AcceptConn(ctx)
		if err != nil {
			echoDone <- err
			return
		}
		if target != "echo" {
			echoDone <- fmt.Errorf("target %q", target)
			return
		}
		_, err = io.Copy(c, c)
		if err == nil {
			err = c.CloseWrite()
		}
		echoDone <- err
	}()
	c, err := p.src.OpenConn(ctx, "echo")
	require.NoError(t, err)
	defer c.Close()

	require.NoError(t, c.SetReadDeadline(time.Now().Add(50*time.Millisecond)))
	_, err = c.Read(make([]byte, 1))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded, "nothing was sent yet")
	require.NoError(t, c.SetReadDeadline(time.Time{}))

	msg := []byte("over the wan and back")
	_, err = c.Write(msg)
	require.NoError(t, err)
	require.NoError(t, c.CloseWrite())
	got, err := io.ReadAll(c)
	require.NoError(t, err)
	assert.Equal(t, msg, got)
	require.NoError(t, <-echoDone)
	assert.Equal(t, "wan", c.LocalAddr().Network())
	assert.Contains(t, c.RemoteAddr().String(), "echo")
}
