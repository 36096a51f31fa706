package nbd

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestClientServerRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name       string
		structured bool
		tls        bool
	}{
		{"simple", false, false},
		{"structured", true, false},
		{"structured-tls", true, true},
		{"simple-tls", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeak(t)
			const size = 8 << 20
			mem := NewMemBackend(size)
			var opts DialOptions
			var srvTLS *tls.Config
			if tc.tls {
				p := newPKI(t)
				srvTLS = p.serverTLS()
				opts.TLS = p.clientTLS()
			}
			ts := startStatic(t, srvTLS, tc.tls, &Export{Name: "disk", Backend: mem, MultiConn: true})
			opts.Export = "disk"
			opts.DisableStructuredReplies = !tc.structured
			opts.RequestSize = 256 << 10 // force splitting and pipelining
			ctx := context.Background()
			c, err := Dial(ctx, "tcp", ts.addr, opts)
			require.NoError(t, err)
			defer c.Close()
			assert.Equal(t, int64(size), c.Size())
			assert.True(t, c.CanMultiConn())
			assert.False(t, c.ReadOnly())
			assert.Equal(t, tc.structured, c.StructuredReplies())
			assert.Equal(t, tc.structured, c.CanBlockStatus())

			// Concurrent writes of distinct regions, then reads.
			data := randomData(size/2, 7)
			var wg sync.WaitGroup
			for i := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					off := int64(i) * (size / 16)
					assert.NoError(t, c.WriteAt(ctx, data[off:off+size/16], off, i%2 == 0))
				}()
			}
			wg.Wait()
			got := make([]byte, size)
			require.NoError(t, c.ReadAt(ctx, got, 0))
			assert.True(t, bytesEqual(data, got[:size/2]), "written half differs")
			assert.True(t, IsZero(got[size/2:]), "unwritten half not zero")
			assert.True(t, bytesEqual(mem.Bytes()[:size/2], data))
			require.NoError(t, c.Flush(ctx))

			// Zeroing and trimming.
			require.NoError(t, c.WriteZeroes(ctx, 0, 1<<20, 0))
			require.NoError(t, c.WriteZeroes(ctx, 1<<20, 1<<20, ZeroNoHole|ZeroFUA))
			require.NoError(t, c.WriteZeroes(ctx, 2<<20, 4096, ZeroFast))
			require.NoError(t, c.Trim(ctx, 3<<20, 1<<20))
			buf := make([]byte, 3<<20)
			require.NoError(t, c.ReadAt(ctx, buf, 0))
			assert.True(t, IsZero(buf[:2<<20+4096]), "zeroed range not zero")
			assert.True(t, bytesEqual(buf[2<<20+4096:], data[2<<20+4096:3<<20]))

			if tc.structured {
				exts, err := c.BlockStatus(ctx, 0, size)
				require.NoError(t, err)
				require.NotEmpty(t, exts)
				// 0-1M hole (punched), 1M-2M allocated (NO_HOLE), 2M-3M data,
				// 3M-4M trimmed hole, 4M.. written data, rest hole.
				// 0-1M punched hole, 1M-2M allocated zeroes (NO_HOLE) and
				// 2M-3M data, 3M-4M trimmed, 4M-8M never written.
				assert.Equal(t, []Extent{
					{0, 1 << 20, ExtentHole | ExtentZero},
					{1 << 20, 2 << 20, 0},
					{3 << 20, 5 << 20, ExtentHole | ExtentZero},
				}, exts)
				exts, err = c.BlockStatus(ctx, 100, 10)
				require.NoError(t, err)
				assert.Equal(t, []Extent{{100, 10, ExtentHole | ExtentZero}}, exts)
			} else {
				_, err := c.BlockStatus(ctx, 0, size)
				assert.ErrorIs(t, err, ErrUnsupported)
			}

			// Client-side range checks.
			assert.ErrorIs(t, c.ReadAt(ctx, make([]byte, 10), size-5), ErrInvalid)
			assert.ErrorIs(t, c.WriteAt(ctx, make([]byte, 10), -1, false), ErrInvalid)
		})
	}
}

func TestReadOnlyExport(t *testing.T) {
	checkNoLeak(t)
	mem := NewMemBackend(1 << 20)
	_, err := mem.WriteAt([]byte("hello"), 0)
	require.NoError(t, err)
	ts := startStatic(t, nil, false, &Export{Name: "ro", Backend: mem, ReadOnly: true})
	ctx := context.Background()
	c, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "ro"})
	require.NoError(t, err)
	defer c.Close()
	assert.True(t, c.ReadOnly())
	assert.ErrorIs(t, c.WriteAt(ctx, []byte("x"), 0, false), ErrPerm)
	assert.ErrorIs(t, c.Trim(ctx, 0, 10), ErrUnsupported)

	// The server refuses writes even when the client does not check.
	raw := rawTransmission(t, ts.addr, "ro", true)
	for _, cmd := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
		var payload []byte
		if cmd == cmdWrite {
			payload = []byte("xxxxx")
		}
		errno := raw.simple(t, Request{Type: cmd, Offset: 0, Length: 5}, payload)
		assert.Equal(t, EPERM, errno, "command %d", cmd)
	}
	b := make([]byte, 5)
	require.NoError(t, c.ReadAt(ctx, b, 0))
	assert.Equal(t, "hello", string(b))
}

func TestServerRejectsBadRequests(t *testing.T) {
	checkNoLeak(t)
	const size = 1 << 20
	mem := NewMemBackend(size)
	ts := startStatic(t, nil, false, &Export{Name: "d", Backend: mem})
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprint("structured=", structured), func(t *testing.T) {
			raw := rawTransmission(t, ts.addr, "d", structured)
			cases := []struct {
				name    string
				req     Request
				payload []byte
				errno   uint32
			}{
				{"read past end", Request{Type: cmdRead, Offset: size - 1, Length: 2}, nil, EINVAL},
				{"read offset overflow", Request{Type: cmdRead, Offset: 1<<64 - 1, Length: 2}, nil, EINVAL},
				{"read too big", Request{Type: cmdRead, Offset: 0, Length: MaxPayload + 1}, nil, EINVAL},
				{"write past end", Request{Type: cmdWrite, Offset: size - 2, Length: 4}, []byte("abcd"), EINVAL},
				{"trim past end", Request{Type: cmdTrim, Offset: size, Length: 1}, nil, EINVAL},
				{"zeroes past end", Request{Type: cmdWriteZeroes, Offset: size - 1, Length: 2}, nil, EINVAL},
				{"unknown command", Request{Type: 99}, nil, EINVAL},
				{"unknown flag", Request{Type: cmdFlush, Flags: 1 << 12}, nil, EINVAL},
				{"write ok", Request{Type: cmdWrite, Offset: 10, Length: 4}, []byte("abcd"), 0},
				{"flush ok", Request{Type: cmdFlush}, nil, 0},
			}
			if !structured {
				cases = append(cases, struct {
					name    string
					req     Request
					payload []byte
					errno   uint32
				}{"block status not negotiated", Request{Type: cmdBlockStatus, Length: 10}, nil, EINVAL})
			}
			for _, c := range cases {
				assert.Equal(t, c.errno, raw.simple(t, c.req, c.payload), c.name)
			}
			// Oversized write: payload is drained, EINVAL, connection usable.
			big := make([]byte, MaxPayload+1)
			assert.Equal(t, EINVAL, raw.simple(t, Request{Type: cmdWrite, Length: uint32(len(big))}, big))
			assert.Equal(t, uint32(0), raw.simple(t, Request{Type: cmdFlush}, nil))
			raw.disc(t)
		})
	}
	assert.Equal(t, "abcd", string(mem.Bytes()[10:14]))
	assert.True(t, IsZero(mem.Bytes()[size-4:]), "nothing written outside the export")
}

// faultBackend fails chosen operations.
type faultBackend struct {
	*MemBackend
	mu                         sync.Mutex
	readErr, writeErr, syncErr error
}

func (f *faultBackend) set(fn func()) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn()
}

func (f *faultBackend) errs() (r, w, s error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.readErr, f.writeErr, f.syncErr
}

func (f *faultBackend) ReadAt(p []byte, off int64) (int, error) {
	if err, _, _ := f.errs(); err != nil {
		return 0, err
	}
	return f.MemBackend.ReadAt(p, off)
}

func (f *faultBackend) WriteAt(p []byte, off int64) (int, error) {
	if _, err, _ := f.errs(); err != nil {
		return 0, err
	}
	return f.MemBackend.WriteAt(p, off)
}

func (f *faultBackend) Sync() error {
	_, _, err := f.errs()
	return err
}

func TestBackendErrorsReachClient(t *testing.T) {
	checkNoLeak(t)
	for _, structured := range []bool{false, true} {
		t.Run(fmt.Sprint("structured=", structured), func(t *testing.T) {
			fb := &faultBackend{
				MemBackend: NewMemBackend(1 << 20),
				readErr:    errors.New("disk on fire"),
				writeErr:   fmt.Errorf("full: %w", ErrNoSpace),
				syncErr:    errors.New("sync failed"),
			}
			ts := startStatic(t, nil, false, &Export{Name: "f", Backend: fb})
			ctx := context.Background()
			c, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "f", DisableStructuredReplies: !structured})
			require.NoError(t, err)
			defer c.Close()
			err = c.ReadAt(ctx, make([]byte, 4096), 0)
			assert.ErrorIs(t, err, ErrIO)
			var ne *Error
			require.ErrorAs(t, err, &ne)
			assert.Equal(t, EIO, ne.Errno)
			assert.ErrorIs(t, c.WriteAt(ctx, make([]byte, 4096), 0, false), ErrNoSpace)
			assert.ErrorIs(t, c.Flush(ctx), ErrIO)
			fb.set(func() { fb.writeErr = nil })
			assert.ErrorIs(t, c.WriteAt(ctx, make([]byte, 4096), 0, true), ErrIO, "FUA runs sync")
			// The connection survives errors: a good read after the bad ones.
			fb.set(func() { fb.readErr = nil })
			assert.NoError(t, c.ReadAt(ctx, make([]byte, 4096), 0))
		})
	}
}

func TestFastZeroWithoutZeroer(t *testing.T) {
	// A backend with no Zeroer: FAST_ZERO gets ENOTSUP, plain zeroing writes zeroes.
	type plain struct{ Backend }
	mem := NewMemBackend(1 << 20)
	_, err := mem.WriteAt(randomData(1<<20, 3), 0)
	require.NoError(t, err)
	ts := startStatic(t, nil, false, &Export{Name: "p", Backend: plain{mem}})
	ctx := context.Background()
	c, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "p"})
	require.NoError(t, err)
	defer c.Close()
	assert.ErrorIs(t, c.WriteZeroes(ctx, 0, 4096, ZeroFast), ErrNotSup)
	require.NoError(t, c.WriteZeroes(ctx, 0, 4096, 0))
	assert.True(t, IsZero(mem.Bytes()[:4096]))
	assert.False(t, IsZero(mem.Bytes()[4096:8192]))
	exts, err := c.BlockStatus(ctx, 0, 1<<20)
	require.NoError(t, err)
	assert.Equal(t, []Extent{{0, 1 << 20, 0}}, exts, "no ExtentLister: all data")
}

func TestPipelinedManyInFlight(t *testing.T) {
	checkNoLeak(t)
	const size = 4 << 20
	mem := NewMemBackend(size)
	ts := startStatic(t, nil, false, &Export{Name: "d", Backend: mem, MultiConn: true})
	ctx := context.Background()
	pool, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "d", MaxInFlight: 4}, 3)
	require.NoError(t, err)
	defer pool.Close()
	require.Len(t, pool.Clients(), 3)
	data := randomData(size, 9)
	var wg sync.WaitGroup
	for i := range 64 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := int64(i) * size / 64
			assert.NoError(t, pool.WriteAt(ctx, data[off:off+size/64], off, false))
		}()
	}
	wg.Wait()
	require.NoError(t, pool.Flush(ctx))
	got := make([]byte, size)
	require.NoError(t, pool.ReadAt(ctx, got, 0))
	assert.True(t, bytesEqual(data, got))
}

func TestContextCancelAndDisconnect(t *testing.T) {
	checkNoLeak(t)
	mem := NewMemBackend(1 << 20)
	ts := startStatic(t, nil, false, &Export{Name: "d", Backend: mem})
	c, err := Dial(context.Background(), "tcp", ts.addr, DialOptions{Export: "d"})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	assert.ErrorIs(t, c.ReadAt(ctx, make([]byte, 10), 0), context.Canceled)
	require.NoError(t, c.Close())
	assert.ErrorIs(t, c.ReadAt(context.Background(), make([]byte, 10), 0), ErrClosed)
	require.NoError(t, c.Close(), "close twice")

	// A dial that cannot finish within its context fails with its error.
	ctx, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	ln := listenSilent(t)
	_, err = Dial(ctx, "tcp", ln, DialOptions{})
	assert.Error(t, err)
}

func TestServerSurvivesAbruptDisconnect(t *testing.T) {
	checkNoLeak(t)
	mem := NewMemBackend(4 << 20)
	ts := startStatic(t, nil, false, &Export{Name: "d", Backend: mem})
	for _, structured := range []bool{false, true} {
		raw := rawTransmission(t, ts.addr, "d", structured)
		// Many large reads in flight, a half-sent write, and the client vanishes
		// without reading a single reply.
		var b []byte
		for i := range 64 {
			b = append(b, Request{Type: cmdRead, Handle: uint64(i), Length: 1 << 20}.encode(nil)...)
		}
		b = append(b, Request{Type: cmdWrite, Handle: 99, Length: 1 << 20}.encode(nil)...)
		b = append(b, make([]byte, 1000)...)
		go func() { _, _ = raw.conn.Write(b) }()
		time.Sleep(50 * time.Millisecond)
		require.NoError(t, raw.conn.Close())
	}
	// The server still serves others.
	c, err := Dial(context.Background(), "tcp", ts.addr, DialOptions{Export: "d"})
	require.NoError(t, err)
	require.NoError(t, c.ReadAt(context.Background(), make([]byte, 4096), 0))
	require.NoError(t, c.Close())
	// Every connection ends by itself, without cancelling the server.
	require.Eventually(t, func() bool { return ts.srv.ActiveConns() == 0 }, 10*time.Second, 10*time.Millisecond)
}

func TestExportRelease(t *testing.T) {
	checkNoLeak(t)
	var mu sync.Mutex
	opened, released := 0, 0
	resolve := func(_ context.Context, name string) (*Export, error) {
		mu.Lock()
		defer mu.Unlock()
		opened++
		return &Export{Name: name, Backend: NewMemBackend(4096), Release: func() {
			mu.Lock()
			defer mu.Unlock()
			released++
		}}, nil
	}
	ts := startServer(t, ServerOptions{Exports: resolve})
	ctx := context.Background()
	_, err := QueryExport(ctx, "tcp", ts.addr, DialOptions{Export: "x"}) // INFO
	require.NoError(t, err)
	c, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "x"}) // GO
	require.NoError(t, err)
	require.NoError(t, c.ReadAt(ctx, make([]byte, 10), 0))
	require.NoError(t, c.Close())
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return opened == 2 && released == 2
	}, 5*time.Second, 10*time.Millisecond, "every resolved export is released once")
}

// flakyListener fails its first Accept with EMFILE, as a listener does
// when the process is out of file descriptors for a moment.
type flakyListener struct {
	net.Listener
	failed atomic.Bool
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if !l.failed.Swap(true) {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// A temporary accept error must not stop the server: every later client
// would be refused while its owner believes it serves.
func TestServeSurvivesTemporaryAcceptError(t *testing.T) {
	checkNoLeak(t)
	srv, err := NewServer(ServerOptions{Exports: func(context.Context, string) (*Export, error) {
		return &Export{Backend: NewMemBackend(1 << 16)}, nil
	}, Logger: nullLogger()})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, &flakyListener{Listener: ln}) }()
	dctx, dcancel := context.WithTimeout(ctx, 20*time.Second)
	defer dcancel()
	c, err := Dial(dctx, "tcp", ln.Addr().String(), DialOptions{})
	require.NoError(t, err, "the server still accepts after EMFILE")
	require.NoError(t, c.Close())
	cancel()
	require.NoError(t, <-done)
}
