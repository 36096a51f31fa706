package nbdstore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/nbd"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
)

// errSourceRead marks a failed read of the snapshot.
var errSourceRead = errors.New("reading the snapshot failed")

type peerConfig struct {
	network, addr, token string
	round                int
	snapshot             string
	conns, inFlight      int
	chunk                int64
	timeout              time.Duration
	stall                time.Duration
}

// peer is the connection pool to the receiver's data export; it redials
// (with backoff, up to the reconnect timeout) after a connection fails.
type peer struct {
	cfg        peerConfig
	onWire     *atomic.Int64
	log        hclog.Logger
	reconnects atomic.Int64
	active     atomic.Int64 // requests in flight through do
	progress   atomic.Int64 // requests completed through do
	lastOK     atomic.Int64 // unix ns of the last request completed through do (or of newPeer)
	stop       chan struct{}
	watching   sync.WaitGroup

	mu     sync.Mutex
	pool   *nbd.Pool
	gen    int
	closed bool
}

func newPeer(cfg peerConfig, onWire *atomic.Int64, log hclog.Logger) *peer {
	if cfg.conns < 1 {
		cfg.conns = 1
	}
	p := &peer{cfg: cfg, onWire: onWire, log: log, stop: make(chan struct{})}
	p.lastOK.Store(time.Now().UnixNano())
	if cfg.stall > 0 {
		p.watching.Add(1)
		go p.watch()
	}
	return p
}

// watch drops the connections when requests are in flight but none
// completes for the stall timeout (a WAN path that went silent without
// closing anything); the requests are then sent again on new ones.
func (p *peer) watch() {
	defer p.watching.Done()
	t := time.NewTicker(max(p.cfg.stall/4, 10*time.Millisecond))
	defer t.Stop()
	last, since := p.progress.Load(), time.Now()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
		}
		cur := p.progress.Load()
		if cur != last || p.active.Load() == 0 {
			last, since = cur, time.Now()
			continue
		}
		if time.Since(since) < p.cfg.stall {
			continue
		}
		p.log.Warn("no reply from the receiver, reconnecting", "stalled_for", time.Since(since).Round(time.Millisecond))
		if p.mu.TryLock() { // a reconnect in progress holds it
			if p.pool != nil {
				_ = p.pool.Close()
				p.pool = nil
			}
			p.mu.Unlock()
		}
		since = time.Now()
	}
}

// wireConn counts the bytes we send.
type wireConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *wireConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(int64(n))
	return n, err
}

func (p *peer) dialOne(ctx context.Context, export string, perConn int) (*nbd.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, p.cfg.network, p.cfg.addr)
	if err != nil {
		return nil, fmt.Errorf("dial peer %s: %w", p.cfg.addr, err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	c, err := nbd.NewClient(ctx, &wireConn{Conn: conn, n: p.onWire},
		nbd.DialOptions{Export: export, MaxInFlight: perConn, RequestSize: int(p.cfg.chunk), Logger: p.log.Named("nbd")})
	if err != nil {
		_ = conn.Close()
		return nil, redact(fmt.Errorf("peer %s: %w", p.cfg.addr, err), p.cfg.token)
	}
	return c, nil
}

func (p *peer) dial(ctx context.Context) (*nbd.Pool, error) {
	export := dataExport(p.cfg.token, p.cfg.round, p.cfg.snapshot)
	perConn := max(1, (p.cfg.inFlight+p.cfg.conns-1)/p.cfg.conns) * 2
	first, err := p.dialOne(ctx, export, perConn)
	if err != nil {
		return nil, err
	}
	return nbd.NewPool(first), nil
}

// addConns opens the other connections in the background (each handshake
// costs a few round trips, so the copy starts on the first one) and then
// widens the pool of generation gen, unless it failed meanwhile.
func (p *peer) addConns(ctx context.Context, gen int, first *nbd.Client) {
	if p.cfg.conns <= 1 || !first.CanMultiConn() {
		return
	}
	export := dataExport(p.cfg.token, p.cfg.round, p.cfg.snapshot)
	perConn := max(1, (p.cfg.inFlight+p.cfg.conns-1)/p.cfg.conns) * 2
	p.watching.Add(1)
	go func() {
		defer p.watching.Done()
		ctx, cancel := context.WithCancel(ctx)
		defer cancel()
		go func() {
			select {
			case <-p.stop:
				cancel()
			case <-ctx.Done():
			}
		}()
		extra := make([]*nbd.Client, p.cfg.conns-1)
		var wg sync.WaitGroup
		for i := range extra {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := p.dialOne(ctx, export, perConn)
				if err == nil {
					extra[i] = c
				}
			}()
		}
		wg.Wait()
		clients := []*nbd.Client{first}
		for _, c := range extra {
			if c != nil {
				clients = append(clients, c)
			}
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		if p.gen != gen || p.pool == nil || p.closed {
			for _, c := range clients[1:] {
				_ = c.Close()
			}
			return
		}
		p.pool = nbd.NewPool(clients...)
	}()
}

// permanent reports a dial error retrying cannot fix.
func permanent(err error) bool {
	c := classifyNBD(err)
	return c == contract.ErrPermissionDenied || c == contract.ErrFailedPrecondition || c == contract.ErrCancelled
}

// withRetry runs fn with a fresh dial after transient failures, up to the
// reconnect timeout.
func (p *peer) withRetry(ctx context.Context, what string, fn func(ctx context.Context) error) error {
	start := time.Now()
	backoff := 50 * time.Millisecond
	for {
		err := fn(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%s: %w: %v", what, contract.ErrCancelled, ctx.Err())
		}
		if permanent(err) {
			return fmt.Errorf("%s: %v: %w", what, err, classifyNBD(err))
		}
		if time.Since(start) > p.cfg.timeout {
			return fmt.Errorf("%s: peer unreachable for %s: %v: %w", what, p.cfg.timeout, err, contract.ErrUnavailable)
		}
		p.log.Debug("peer not reachable, retrying", "what", what, "error", err, "backoff", backoff)
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: %w: %v", what, contract.ErrCancelled, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 2*time.Second)
	}
}

// get returns the current pool, dialling (with retries) when there is none.
func (p *peer) get(ctx context.Context) (*nbd.Pool, int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pool != nil {
		return p.pool, p.gen, nil
	}
	err := p.withRetry(ctx, "connect to receiver", func(ctx context.Context) error {
		pool, err := p.dial(ctx)
		if err == nil {
			p.pool = pool
		}
		return err
	})
	if err != nil {
		return nil, 0, err
	}
	if p.gen > 0 {
		p.reconnects.Add(1)
		p.log.Info("reconnected to the receiver", "generation", p.gen+1)
	}
	p.gen++
	p.addConns(ctx, p.gen, p.pool.Clients()[0])
	return p.pool, p.gen, nil
}

// fail drops pool generation gen (its connections broke).
func (p *peer) fail(gen int, cause error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.gen == gen && p.pool != nil {
		p.log.Warn("connection to the receiver broke, redoing the requests in flight", "error", cause)
		_ = p.pool.Close()
		p.pool = nil
	}
}

// handshakeTimeout bounds connecting to the receiver (TCP + NBD options).
const handshakeTimeout = 30 * time.Second

func (p *peer) close() {
	close(p.stop)
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.watching.Wait()
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pool != nil {
		_ = p.pool.Close()
		p.pool = nil
	}
}

// transient reports a request error caused by the connection, not by the
// receiver refusing the request.
func transient(err error) bool {
	var ne *nbd.Error
	return !errors.As(err, &ne)
}

// do runs fn on the pool, reconnecting and running it again after a
// connection failure (fn must be idempotent: writes of the same data are).
// It gives up when no request has completed for the reconnect timeout
// (connections that open but never carry a request through).
func (p *peer) do(ctx context.Context, fn func(ctx context.Context, pool *nbd.Pool) error) error {
	backoff := 10 * time.Millisecond
	for {
		pool, gen, err := p.get(ctx)
		if err != nil {
			return err
		}
		p.active.Add(1)
		err = fn(ctx, pool)
		p.active.Add(-1)
		if err == nil {
			p.progress.Add(1)
			p.lastOK.Store(time.Now().UnixNano())
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w: %v", contract.ErrCancelled, ctx.Err())
		}
		if !transient(err) {
			return fmt.Errorf("receiver refused a request: %v: %w", err, classifyNBD(err))
		}
		p.fail(gen, err)
		if idle := time.Since(time.Unix(0, p.lastOK.Load())); idle > p.cfg.timeout {
			return fmt.Errorf("no request to the receiver completed for %s (connections open but fail): %v: %w",
				idle.Round(time.Second), redact(err, p.cfg.token), contract.ErrUnavailable)
		}
		select { // do not spin on a receiver that fails every request at once
		case <-ctx.Done():
			return fmt.Errorf("%w: %v", contract.ErrCancelled, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, time.Second)
	}
}

// flush asks the receiver to make every acknowledged write durable. The
// export is multi-conn, so one FLUSH covers the writes completed on every
// connection (and our receiver's flush is an fsync of the whole device).
func (p *peer) flush(ctx context.Context) error {
	return p.do(ctx, func(ctx context.Context, pool *nbd.Pool) error { return pool.Clients()[0].Flush(ctx) })
}

// checkSize checks the replica can hold size bytes.
func (p *peer) checkSize(ctx context.Context, size int64) error {
	pool, _, err := p.get(ctx)
	if err != nil {
		return err
	}
	if pool.Size() < size {
		return fmt.Errorf("replica export is %d bytes, the snapshot %d: %w", pool.Size(), size, contract.ErrFailedPrecondition)
	}
	return nil
}

// journal reads the receiver's applied-block record for (round, snapshot).
func (p *peer) journal(ctx context.Context, round int, snapshot string) (*journalRecord, error) {
	var rec *journalRecord
	err := p.withRetry(ctx, "read the receiver's journal", func(ctx context.Context) error {
		c, err := p.dialOne(ctx, p.cfg.token+"/journal", 4)
		if err != nil {
			return err
		}
		defer func() { _ = c.Close() }()
		b := make([]byte, c.Size())
		if err := c.ReadAt(ctx, b, 0); err != nil {
			return err
		}
		r, err := decodeJournal(b)
		if err != nil {
			return fmt.Errorf("%w: %v", nbd.ErrProtocol, err)
		}
		rec = r
		return nil
	})
	if err != nil {
		return nil, err
	}
	if rec.Round != round || rec.Snapshot != snapshot {
		return nil, nil
	}
	return rec, nil
}

// job is one range to apply.
type job struct {
	off, n int64
	zero   bool // known zero from block status: WRITE_ZEROES, not counted in BytesToCopy
}

// plan lists the round's jobs. Data ranges are aligned to 64 KiB blocks
// and cut in chunks; known-zero ranges (block status) become zero jobs;
// blocks the receiver's journal holds as applied are skipped.
func plan(ctx context.Context, src source, size int64, req contract.SyncRoundRequest, chunk int64, applied *journalRecord) ([]job, int64, int64, error) {
	var jobs []job
	var toCopy, skipped int64
	var accOff, accEnd int64 = -1, -1
	flushData := func() {
		if accOff < 0 {
			return
		}
		for off := accOff; off < accEnd; {
			n := min(chunk, accEnd-off)
			toCopy += n
			if applied == nil {
				jobs = append(jobs, job{off: off, n: n})
			} else {
				// Split around blocks already applied.
				runStart := int64(-1)
				for b := off; b < off+n; b += blockSize {
					e := min(b+blockSize, off+n)
					if applied.isSet(b / blockSize) {
						skipped += e - b
						if runStart >= 0 {
							jobs = append(jobs, job{off: runStart, n: b - runStart})
							runStart = -1
						}
					} else if runStart < 0 {
						runStart = b
					}
				}
				if runStart >= 0 {
					jobs = append(jobs, job{off: runStart, n: off + n - runStart})
				}
			}
			off += n
		}
		accOff, accEnd = -1, -1
	}
	addData := func(a, b int64) {
		a = a / blockSize * blockSize
		b = min(size, (b+blockSize-1)/blockSize*blockSize)
		if accOff >= 0 && a <= accEnd {
			accEnd = max(accEnd, b)
			return
		}
		flushData()
		accOff, accEnd = a, b
	}
	addZero := func(a, b int64) {
		z0 := (a + blockSize - 1) / blockSize * blockSize
		z1 := b / blockSize * blockSize
		if b == size {
			z1 = b
		}
		if z0 >= z1 {
			addData(a, b)
			return
		}
		if a < z0 {
			addData(a, z0)
		}
		flushData()
		if applied == nil || !rangeApplied(applied, z0, z1) {
			jobs = append(jobs, job{off: z0, n: z1 - z0, zero: true})
		}
		if z1 < b {
			addData(z1, b)
		}
	}
	if req.Full {
		for pos := int64(0); pos < size; {
			exts, err := src.Extents(ctx, pos, min(size-pos, 1<<30))
			if err != nil {
				return nil, 0, 0, fmt.Errorf("%w: block status: %v", errSourceRead, err)
			}
			if len(exts) == 0 {
				exts = []nbd.Extent{{Offset: pos, Length: min(size-pos, 1<<30)}}
			}
			for _, e := range exts {
				if e.Offset != pos || e.Length <= 0 {
					return nil, 0, 0, fmt.Errorf("%w: block status extents not contiguous at %d", errSourceRead, pos)
				}
				end := min(size, pos+e.Length)
				if e.Flags&nbd.ExtentZero != 0 {
					addZero(pos, end)
				} else {
					addData(pos, end)
				}
				pos = end
				if pos >= size {
					break
				}
			}
		}
	} else {
		bs := req.BlockSize
		bits := req.ChangedBlocks
		nb := min(int64(len(bits))*8, (size+bs-1)/bs)
		for i := int64(0); i < nb; {
			if bits[i/8]&(0x80>>(i%8)) == 0 {
				i++
				continue
			}
			j := i
			for j < nb && bits[j/8]&(0x80>>(j%8)) != 0 {
				j++
			}
			addData(i*bs, min(size, j*bs))
			i = j
		}
	}
	flushData()
	return jobs, toCopy, skipped, nil
}

func rangeApplied(r *journalRecord, a, b int64) bool {
	for x := a; x < b; x += blockSize {
		if !r.isSet(x / blockSize) {
			return false
		}
	}
	return true
}

// copier moves jobs from the source to the peer.
type copier struct {
	src        source
	peer       *peer
	copied     *atomic.Int64
	limiter    *wan.RateLimiter
	checkpoint int64
	log        hclog.Logger

	cpMu       sync.Mutex
	sinceFlush int64
	flushing   bool
	cpWG       sync.WaitGroup
}

func (c *copier) run(ctx context.Context, jobs []job, workers int) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	ch := make(chan job)
	var wg sync.WaitGroup
	for range min(workers, max(1, len(jobs))) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range ch {
				if err := c.apply(ctx, j); err != nil {
					cancel(err)
					return
				}
			}
		}()
	}
feed:
	for _, j := range jobs {
		select {
		case ch <- j:
		case <-ctx.Done():
			break feed
		}
	}
	close(ch)
	wg.Wait()
	c.cpWG.Wait()
	if cause := context.Cause(ctx); cause != nil {
		return cause
	}
	return nil
}

// run is a piece of a job: data or zeroes.
type run struct {
	off  int64
	data []byte // nil: zeroes
	n    int64
}

// splitRuns cuts buf (at off) into data and all-zero runs of 64 KiB blocks.
func splitRuns(buf []byte, off int64) []run {
	var out []run
	for i := 0; i < len(buf); {
		e := min(len(buf), i+blockSize)
		z := nbd.IsZero(buf[i:e])
		if n := len(out); n > 0 && (out[n-1].data == nil) == z {
			out[n-1].n += int64(e - i)
			if !z {
				out[n-1].data = buf[out[n-1].off-off : int64(e)]
			}
		} else if z {
			out = append(out, run{off: off + int64(i), n: int64(e - i)})
		} else {
			out = append(out, run{off: off + int64(i), n: int64(e - i), data: buf[i:e]})
		}
		i = e
	}
	return out
}

func (c *copier) apply(ctx context.Context, j job) error {
	var runs []run
	if j.zero {
		runs = []run{{off: j.off, n: j.n}}
	} else {
		buf := make([]byte, j.n)
		if err := c.src.ReadAt(ctx, buf, j.off); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w: %v", contract.ErrCancelled, ctx.Err())
			}
			return fmt.Errorf("%w at %d: %v", errSourceRead, j.off, err)
		}
		runs = splitRuns(buf, j.off)
		for _, r := range runs {
			if r.data != nil {
				if err := c.limiter.Wait(ctx, r.n); err != nil {
					return fmt.Errorf("%w: %v", contract.ErrCancelled, err)
				}
			}
		}
	}
	err := c.peer.do(ctx, func(ctx context.Context, pool *nbd.Pool) error {
		return writeRuns(ctx, pool, runs)
	})
	if err != nil {
		return err
	}
	if !j.zero {
		c.copied.Add(j.n)
		return c.maybeCheckpoint(ctx, j.n)
	}
	return nil
}

// writeRuns sends all runs at once (pipelined) and waits for them.
func writeRuns(ctx context.Context, pool *nbd.Pool, runs []run) error {
	if len(runs) == 1 {
		return writeRun(ctx, pool, runs[0])
	}
	errs := make([]error, len(runs))
	var wg sync.WaitGroup
	for i, r := range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = writeRun(ctx, pool, r)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func writeRun(ctx context.Context, pool *nbd.Pool, r run) error {
	if r.data != nil {
		return pool.WriteAt(ctx, r.data, r.off, false)
	}
	return pool.WriteZeroes(ctx, r.off, r.n, 0)
}

// maybeCheckpoint flushes every checkpoint bytes, so the receiver's
// journal bounds what a restart sends again.
func (c *copier) maybeCheckpoint(ctx context.Context, n int64) error {
	if c.checkpoint <= 0 {
		return nil
	}
	c.cpMu.Lock()
	defer c.cpMu.Unlock()
	c.sinceFlush += n
	if c.sinceFlush < c.checkpoint || c.flushing {
		return nil
	}
	// In the background: the copy goes on while the receiver syncs.
	c.sinceFlush, c.flushing = 0, true
	c.cpWG.Add(1)
	go func() {
		defer c.cpWG.Done()
		if err := c.peer.flush(ctx); err != nil && ctx.Err() == nil {
			c.log.Debug("checkpoint flush failed; the next one or the round's end covers it", "error", err)
		}
		c.cpMu.Lock()
		c.flushing = false
		c.cpMu.Unlock()
	}()
	return nil
}

// verify compares SHA-256 of every 64 KiB block of the snapshot with the
// receiver's (hash export) and rewrites the blocks that differ. It
// returns the bytes repaired.
func (c *copier) verify(ctx context.Context, size int64) (int64, error) {
	nblocks := (size + blockSize - 1) / blockSize
	const batch = 256 // blocks per hash request (16 MiB of data, 8 KiB of hashes)
	var repaired int64
	remote := make([]byte, batch*hashSize)
	buf := make([]byte, blockSize)
	for first := int64(0); first < nblocks; first += batch {
		n := min(batch, nblocks-first)
		err := c.peer.withRetry(ctx, "read the replica's block hashes", func(ctx context.Context) error {
			cl, err := c.peer.dialOne(ctx, c.peer.cfg.token+"/hash", 4)
			if err != nil {
				return err
			}
			defer func() { _ = cl.Close() }()
			if cl.Size() < (first+n)*hashSize {
				return fmt.Errorf("%w: replica hash export too small", nbd.ErrProtocol)
			}
			return cl.ReadAt(ctx, remote[:n*hashSize], first*hashSize)
		})
		if err != nil {
			return repaired, err
		}
		for i := int64(0); i < n; i++ {
			off := (first + i) * blockSize
			k := min(blockSize, size-off)
			if err := c.src.ReadAt(ctx, buf[:k], off); err != nil {
				return repaired, fmt.Errorf("%w at %d: %v", errSourceRead, off, err)
			}
			sum := sha256.Sum256(buf[:k])
			if bytes.Equal(sum[:], remote[i*hashSize:(i+1)*hashSize]) {
				continue
			}
			runs := splitRuns(buf[:k], off)
			if err := c.peer.do(ctx, func(ctx context.Context, pool *nbd.Pool) error { return writeRuns(ctx, pool, runs) }); err != nil {
				return repaired, err
			}
			repaired += k
		}
	}
	if repaired > 0 {
		c.log.Warn("verify repaired blocks that differed", "bytes", repaired)
		return repaired, c.peer.flush(ctx)
	}
	return 0, nil
}

// redactedError hides a secret in an error's text, keeping its chain.
type redactedError struct {
	msg string
	err error
}

func (e *redactedError) Error() string { return e.msg }
func (e *redactedError) Unwrap() error { return e.err }

// redact replaces secret in err's message (export names carry the token).
func redact(err error, secret string) error {
	if err == nil || secret == "" || !strings.Contains(err.Error(), secret) {
		return err
	}
	return &redactedError{msg: strings.ReplaceAll(err.Error(), secret, "[redacted]"), err: err}
}
