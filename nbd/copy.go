package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// Device is what Copy reads from and writes to: a *Client or a *Pool.
type Device interface {
	Size() int64
	ReadAt(ctx context.Context, p []byte, off int64) error
	WriteAt(ctx context.Context, p []byte, off int64, fua bool) error
	WriteZeroes(ctx context.Context, off, n int64, flags ZeroFlags) error
	BlockStatus(ctx context.Context, off, n int64) ([]Extent, error)
	Flush(ctx context.Context) error
}

var (
	_ Device = (*Client)(nil)
	_ Device = (*Pool)(nil)
)

// Pool is several connections to one export, used as one Device: each
// request goes to the connection with the fewest requests in flight.
type Pool struct {
	clients []*Client
}

// DialPool opens up to n connections to the export; more than one only when
// the server advertises NBD_FLAG_CAN_MULTI_CONN. After the first, the
// connections are opened concurrently (a handshake can take tens of
// milliseconds, e.g. qemu-nbd's replies meet Nagle and delayed ACKs).
func DialPool(ctx context.Context, network, addr string, opts DialOptions, n int) (*Pool, error) {
	first, err := Dial(ctx, network, addr, opts)
	if err != nil {
		return nil, err
	}
	p := &Pool{clients: []*Client{first}}
	if !first.CanMultiConn() || n <= 1 {
		return p, nil
	}
	rest := make([]*Client, n-1)
	errs := make([]error, n-1)
	var wg sync.WaitGroup
	for i := range rest {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rest[i], errs[i] = Dial(ctx, network, addr, opts)
		}()
	}
	wg.Wait()
	for _, c := range rest {
		if c != nil {
			p.clients = append(p.clients, c)
		}
	}
	if err := errors.Join(errs...); err != nil {
		_ = p.Close()
		return nil, err
	}
	return p, nil
}

// NewPool groups connections that the caller opened to the same export.
func NewPool(clients ...*Client) *Pool { return &Pool{clients: clients} }

// Clients returns the pool's connections.
func (p *Pool) Clients() []*Client { return p.clients }

func (p *Pool) pick() *Client {
	best := p.clients[0]
	for _, c := range p.clients[1:] {
		if len(c.sem) < len(best.sem) {
			best = c
		}
	}
	return best
}

// Size implements Device.
func (p *Pool) Size() int64 { return p.clients[0].Size() }

// ReadAt implements Device.
func (p *Pool) ReadAt(ctx context.Context, b []byte, off int64) error {
	if len(p.clients) == 1 {
		return p.clients[0].ReadAt(ctx, b, off)
	}
	step := int64(p.clients[0].reqSize)
	return split(ctx, off, int64(len(b)), step, func(ctx context.Context, o, n int64) error {
		return p.pick().ReadAt(ctx, b[o-off:o-off+n], o)
	})
}

// WriteAt implements Device.
func (p *Pool) WriteAt(ctx context.Context, b []byte, off int64, fua bool) error {
	if len(p.clients) == 1 {
		return p.clients[0].WriteAt(ctx, b, off, fua)
	}
	step := int64(p.clients[0].reqSize)
	return split(ctx, off, int64(len(b)), step, func(ctx context.Context, o, n int64) error {
		return p.pick().WriteAt(ctx, b[o-off:o-off+n], o, fua)
	})
}

// WriteZeroes implements Device.
func (p *Pool) WriteZeroes(ctx context.Context, off, n int64, flags ZeroFlags) error {
	return p.pick().WriteZeroes(ctx, off, n, flags)
}

// BlockStatus implements Device.
func (p *Pool) BlockStatus(ctx context.Context, off, n int64) ([]Extent, error) {
	return p.pick().BlockStatus(ctx, off, n)
}

// Flush flushes every connection.
func (p *Pool) Flush(ctx context.Context) error {
	var errs []error
	for _, c := range p.clients {
		errs = append(errs, c.Flush(ctx))
	}
	return errors.Join(errs...)
}

// Close closes every connection.
func (p *Pool) Close() error {
	for _, c := range p.clients {
		_ = c.Close()
	}
	return nil
}

// CopyOptions tune Copy.
type CopyOptions struct {
	// ChunkSize is the size of each read/write (default 4 MiB, at most MaxPayload).
	ChunkSize int
	// Workers is how many chunks are in flight (default 16).
	Workers int
	// DestIsZero skips zeroing holes: the destination already reads as zeroes.
	DestIsZero bool
	// NoFlush skips the final Flush of the destination.
	NoFlush bool
}

// CopyStats counts what Copy did.
type CopyStats struct {
	Bytes     int64 // export size
	DataBytes int64 // bytes read and written as data
	ZeroBytes int64 // bytes zeroed or skipped as holes/zero data
}

type copyJob struct {
	off, n int64
	zero   bool
}

// Copy copies the whole of src to dst (same size or larger), sparsely:
// holes and zero ranges reported by block status (when src supports it) and
// all-zero chunks become WRITE_ZEROES (or nothing with DestIsZero); data
// goes in ChunkSize pieces with Workers in flight. dst is flushed at the end.
func Copy(ctx context.Context, dst, src Device, opts CopyOptions) (CopyStats, error) {
	if opts.ChunkSize <= 0 {
		opts.ChunkSize = 4 << 20
	}
	opts.ChunkSize = min(opts.ChunkSize, MaxPayload)
	if opts.Workers <= 0 {
		opts.Workers = 16
	}
	size := src.Size()
	st := CopyStats{Bytes: size}
	if dst.Size() < size {
		return st, fmt.Errorf("nbd: copy: destination (%d bytes) smaller than source (%d bytes)", dst.Size(), size)
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	jobs := make(chan copyJob, opts.Workers)
	var dataBytes, zeroBytes atomic.Int64
	var wg sync.WaitGroup
	for range opts.Workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range jobs {
				if err := copyOne(ctx, dst, src, j, opts, &dataBytes, &zeroBytes); err != nil {
					cancel(err)
				}
			}
		}()
	}
	err := produceJobs(ctx, src, size, int64(opts.ChunkSize), jobs)
	close(jobs)
	wg.Wait()
	st.DataBytes, st.ZeroBytes = dataBytes.Load(), zeroBytes.Load()
	if cause := context.Cause(ctx); cause != nil {
		return st, fmt.Errorf("nbd: copy: %w", cause)
	}
	if err != nil {
		return st, fmt.Errorf("nbd: copy: %w", err)
	}
	if !opts.NoFlush {
		if err := dst.Flush(ctx); err != nil && !errors.Is(err, ErrUnsupported) {
			return st, fmt.Errorf("nbd: copy: %w", err)
		}
	}
	return st, nil
}

func produceJobs(ctx context.Context, src Device, size, chunk int64, jobs chan<- copyJob) error {
	send := func(j copyJob) error {
		select {
		case jobs <- j:
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	useStatus := true
	for pos := int64(0); pos < size; {
		var exts []Extent
		if useStatus {
			var err error
			exts, err = src.BlockStatus(ctx, pos, min(size-pos, bigStep))
			if errors.Is(err, ErrUnsupported) {
				useStatus = false
			} else if err != nil {
				return err
			}
		}
		if len(exts) == 0 {
			exts = []Extent{{Offset: pos, Length: min(size-pos, bigStep)}}
		}
		for _, e := range exts {
			if e.Offset != pos || e.Length <= 0 {
				return fmt.Errorf("%w: block status extents not contiguous at %d", ErrProtocol, pos)
			}
			if e.Flags&ExtentZero != 0 {
				if err := send(copyJob{off: pos, n: e.Length, zero: true}); err != nil {
					return err
				}
				pos += e.Length
				continue
			}
			for end := pos + e.Length; pos < end; {
				k := min(chunk, end-pos)
				if err := send(copyJob{off: pos, n: k}); err != nil {
					return err
				}
				pos += k
			}
		}
	}
	return nil
}

// IsZero reports whether b is all zero bytes (a block that can be sent as
// WRITE_ZEROES instead of data).
func IsZero(b []byte) bool {
	for len(b) > 0 {
		k := min(len(b), len(zeroChunk))
		if !bytes.Equal(b[:k], zeroChunk[:k]) {
			return false
		}
		b = b[k:]
	}
	return true
}

func zeroDst(ctx context.Context, dst Device, off, n int64, opts CopyOptions) error {
	if opts.DestIsZero {
		return nil
	}
	err := dst.WriteZeroes(ctx, off, n, 0)
	if !errors.Is(err, ErrUnsupported) {
		return err
	}
	for n > 0 {
		k := min(n, int64(len(zeroChunk)))
		if err := dst.WriteAt(ctx, zeroChunk[:k], off, false); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

func copyOne(ctx context.Context, dst, src Device, j copyJob, opts CopyOptions, data, zero *atomic.Int64) error {
	if j.zero {
		zero.Add(j.n)
		return zeroDst(ctx, dst, j.off, j.n, opts)
	}
	buf := getBuf(int(j.n))
	defer putBuf(buf)
	if err := src.ReadAt(ctx, buf, j.off); err != nil {
		return err
	}
	if IsZero(buf) {
		zero.Add(j.n)
		return zeroDst(ctx, dst, j.off, j.n, opts)
	}
	data.Add(j.n)
	return dst.WriteAt(ctx, buf, j.off, false)
}
