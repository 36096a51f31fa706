package agent

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/rpc"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// ErrAgentUnreachable: the agent's control connection failed or could not
// be opened (the agent stopped, was killed, or the network is down). It
// matches contract.ErrUnavailable.
var ErrAgentUnreachable = fmt.Errorf("site agent unreachable: %w", contract.ErrUnavailable)

// wireHeader precedes every request and response body on the wire.
type wireHeader struct {
	Method string `msgpack:"m"`
	Seq    uint64 `msgpack:"s"`
	Error  string `msgpack:"e,omitempty"`
}

// maxMessage bounds one message on the control connection; requests and
// replies are small (bitmaps are the largest: 1 bit per 64 KiB block).
const maxMessage = 64 << 20

// limitedReader refuses to read more than maxMessage bytes per message, so
// a peer cannot make the decoder allocate without bound.
type limitedReader struct {
	r    *bufio.Reader
	left int64
}

func (l *limitedReader) Read(p []byte) (int, error) {
	if l.left <= 0 {
		return 0, errors.New("agent rpc: message too large")
	}
	if int64(len(p)) > l.left {
		p = p[:l.left]
	}
	n, err := l.r.Read(p)
	l.left -= int64(n)
	return n, err
}

func (l *limitedReader) ReadByte() (byte, error) {
	if l.left <= 0 {
		return 0, errors.New("agent rpc: message too large")
	}
	b, err := l.r.ReadByte()
	if err == nil {
		l.left--
	}
	return b, err
}

func (l *limitedReader) UnreadByte() error {
	if err := l.r.UnreadByte(); err != nil {
		return err
	}
	l.left++
	return nil
}

// activityConn records when anything was last read from a connection, so
// either end can tell a silent (half-open) connection from a busy one.
type activityConn struct {
	net.Conn
	lastRead atomic.Int64 // unix nanos
}

func newActivityConn(c net.Conn) *activityConn {
	a := &activityConn{Conn: c}
	a.lastRead.Store(time.Now().UnixNano())
	return a
}

func (a *activityConn) Read(p []byte) (int, error) {
	n, err := a.Conn.Read(p)
	if n > 0 {
		a.lastRead.Store(time.Now().UnixNano())
	}
	return n, err
}

// silentFor is how long nothing has been read.
func (a *activityConn) silentFor() time.Duration {
	return time.Since(time.Unix(0, a.lastRead.Load()))
}

// DefaultWriteTimeout bounds writing one message on a control connection:
// a peer that stopped reading (full send buffer on a dead path) cannot
// block a writer for longer. A write that times out closes the connection.
const DefaultWriteTimeout = 30 * time.Second

// codec is the msgpack framing shared by both ends: a header then a body,
// each one msgpack value.
type codec struct {
	c   io.ReadWriteCloser
	lr  *limitedReader
	dec *msgpack.Decoder
	w   *bufio.Writer
	enc *msgpack.Encoder
	// nc, when set, gets a write deadline of wt for every message.
	nc net.Conn
	wt time.Duration
	// onRead runs after each request header is read (server: activity).
	onRead func()
	// onClose runs when reading a request header fails (the connection is
	// gone): net/rpc then waits for the calls in flight before it returns,
	// so this is where the server learns to cancel them.
	onClose func()
}

func newCodec(c io.ReadWriteCloser) *codec {
	lr := &limitedReader{r: bufio.NewReader(c)}
	w := bufio.NewWriter(c)
	dec := msgpack.NewDecoder(lr)
	enc := msgpack.NewEncoder(w)
	enc.SetCustomStructTag("msgpack")
	cd := &codec{c: c, lr: lr, dec: dec, w: w, enc: enc, wt: DefaultWriteTimeout}
	if nc, ok := c.(net.Conn); ok {
		cd.nc = nc
	}
	return cd
}

func (c *codec) readHeader() (wireHeader, error) {
	c.lr.left = maxMessage
	var h wireHeader
	err := c.dec.Decode(&h)
	return h, err
}

func (c *codec) readBody(body any) error {
	if body == nil {
		return c.dec.Skip()
	}
	return c.dec.Decode(body)
}

// write sends one message. A failed write (a timeout included) closes the
// connection: the stream is out of step, and the read side then fails
// every call still waiting on it.
func (c *codec) write(h wireHeader, body any) error {
	if c.nc != nil && c.wt > 0 {
		_ = c.nc.SetWriteDeadline(time.Now().Add(c.wt))
	}
	err := c.enc.Encode(h)
	if err == nil {
		err = c.enc.Encode(body)
	}
	if err == nil {
		err = c.w.Flush()
	}
	if err != nil {
		_ = c.c.Close()
		return err
	}
	if c.nc != nil && c.wt > 0 {
		_ = c.nc.SetWriteDeadline(time.Time{})
	}
	return nil
}

// serverCodec implements rpc.ServerCodec.
type serverCodec struct{ *codec }

func (s serverCodec) ReadRequestHeader(r *rpc.Request) error {
	h, err := s.readHeader()
	if err != nil {
		if s.onClose != nil {
			s.onClose()
		}
		return err
	}
	r.ServiceMethod, r.Seq = h.Method, h.Seq
	if s.onRead != nil {
		s.onRead()
	}
	return nil
}

func (s serverCodec) ReadRequestBody(body any) error { return s.readBody(body) }

func (s serverCodec) WriteResponse(r *rpc.Response, body any) error {
	return s.write(wireHeader{Method: r.ServiceMethod, Seq: r.Seq, Error: r.Error}, body)
}

func (s serverCodec) Close() error { return s.c.Close() }

// clientCodec implements rpc.ClientCodec.
type clientCodec struct {
	*codec
	mu sync.Mutex
}

func (c *clientCodec) WriteRequest(r *rpc.Request, body any) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.write(wireHeader{Method: r.ServiceMethod, Seq: r.Seq}, body)
}

func (c *clientCodec) ReadResponseHeader(r *rpc.Response) error {
	h, err := c.readHeader()
	if err != nil {
		if c.onClose != nil {
			c.onClose()
		}
		return err
	}
	r.ServiceMethod, r.Seq, r.Error = h.Method, h.Seq, h.Error
	return nil
}

// ReadResponseBody: a body that cannot be decoded ends net/rpc's read loop
// too, so the connection is marked closed (Done) as for a header error.
func (c *clientCodec) ReadResponseBody(body any) error {
	err := c.readBody(body)
	if err != nil && c.onClose != nil {
		c.onClose()
	}
	return err
}

func (c *clientCodec) Close() error { return c.c.Close() }

// Conn is the controller's end of one agent control connection.
type Conn struct {
	rc     *rpc.Client
	nc     *activityConn
	nextID atomic.Uint64
	grace  time.Duration

	liveness atomic.Int64 // nanoseconds; 0 = no liveness check

	mu        sync.Mutex
	pending   int       // calls waiting for their reply
	waitSince time.Time // when pending last went from 0 to 1
	reason    error     // why the connection was declared dead
	done      chan struct{}
	once      sync.Once
	wg        sync.WaitGroup
}

// DefaultCancelGrace is how long Call waits, after sending Cancel, for the
// agent to return from the cancelled call.
const DefaultCancelGrace = 10 * time.Second

// ConnOptions tune a control connection (NewConnOptions).
type ConnOptions struct {
	// Liveness, when positive, declares the connection dead when calls are
	// waiting and nothing at all (no reply, no byte of one) has arrived
	// from the agent for this long, counted from the later of the last
	// byte read and the moment a call started waiting on an idle
	// connection. The connection is then closed and every waiting call
	// fails with an error wrapping ErrAgentUnreachable, so a half-open
	// connection (a WAN path that went silent without a reset) is noticed
	// instead of hanging until each call's ctx ends. The caller must keep
	// replies flowing during long calls: heartbeats on the same connection
	// at a fraction of Liveness (agentclient sends them every Liveness/3).
	Liveness time.Duration
	// WriteTimeout bounds writing one request (0 = DefaultWriteTimeout).
	WriteTimeout time.Duration
}

// NewConn wraps an established (TLS) connection to an agent, without a
// liveness check.
func NewConn(c net.Conn) *Conn { return NewConnOptions(c, ConnOptions{}) }

// NewConnOptions wraps an established (TLS) connection to an agent.
func NewConnOptions(c net.Conn, o ConnOptions) *Conn {
	nc := newActivityConn(c)
	cd := newCodec(nc)
	if o.WriteTimeout > 0 {
		cd.wt = o.WriteTimeout
	}
	conn := &Conn{nc: nc, grace: DefaultCancelGrace, done: make(chan struct{})}
	cd.onClose = conn.ended
	conn.rc = rpc.NewClientWithCodec(&clientCodec{codec: cd})
	conn.liveness.Store(int64(o.Liveness))
	conn.wg.Add(1)
	go func() {
		defer conn.wg.Done()
		conn.watch()
	}()
	return conn
}

// SetLiveness changes the liveness timeout (0 turns the check off).
func (c *Conn) SetLiveness(d time.Duration) { c.liveness.Store(int64(d)) }

// Done is closed once the connection is closed or has failed (the agent
// closed it, a read or write failed, or the liveness check declared it dead).
func (c *Conn) Done() <-chan struct{} { return c.done }

// Err is why the liveness check declared the connection dead (nil if it
// did not).
func (c *Conn) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.reason
}

func (c *Conn) ended() { c.once.Do(func() { close(c.done) }) }

// watch closes the connection when calls wait and nothing arrives for the
// liveness timeout.
func (c *Conn) watch() {
	for {
		d := time.Duration(c.liveness.Load())
		tick := time.Second
		if d > 0 {
			tick = min(max(d/8, 5*time.Millisecond), time.Second)
		}
		t := time.NewTimer(tick)
		select {
		case <-c.done:
			t.Stop()
			return
		case <-t.C:
		}
		if d <= 0 {
			continue
		}
		c.mu.Lock()
		silent := min(c.nc.silentFor(), time.Since(c.waitSince))
		dead := c.pending > 0 && silent > d
		if dead {
			c.reason = fmt.Errorf("nothing received from the agent for %s while calls waited (half-open connection or path down)",
				silent.Round(time.Millisecond))
		}
		c.mu.Unlock()
		if !dead {
			continue
		}
		_ = c.nc.Close() // the read loop fails every pending call
		c.ended()
		return
	}
}

// Close closes the connection; calls in flight fail.
func (c *Conn) Close() error {
	err := c.rc.Close()
	if errors.Is(err, rpc.ErrShutdown) {
		err = nil // already failed (the read loop ended it)
	}
	_ = c.nc.Close()
	c.ended()
	c.wg.Wait()
	return err
}

// Call runs one agent method with ctx semantics: the deadline travels to
// the agent, a cancelled ctx sends Cancel and returns after at most the
// grace period, agent errors keep their contract code (errors.Is works)
// and transport failures wrap ErrAgentUnreachable.
func Call[Req, Resp any](ctx context.Context, c *Conn, method string, req Req) (Resp, error) {
	var zero Resp
	if err := ctx.Err(); err != nil {
		return zero, fmt.Errorf("agent %s: %w (%w)", method, contract.ErrCancelled, err)
	}
	args := Args[Req]{Call: contract.CallMeta{ID: c.nextID.Add(1)}, Req: req}
	if dl, ok := ctx.Deadline(); ok {
		args.Call.Deadline = dl
	}
	var reply Reply[Resp]
	c.mu.Lock()
	if c.pending == 0 {
		c.waitSince = time.Now()
	}
	c.pending++
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.pending--
		c.mu.Unlock()
	}()
	pending := c.rc.Go(ServiceName+"."+method, args, &reply, make(chan *rpc.Call, 1))
	select {
	case <-pending.Done:
	case <-ctx.Done():
		c.rc.Go(ServiceName+"."+MethodCancel, Args[contract.CancelArgs]{Req: contract.CancelArgs{ID: args.Call.ID}},
			&Reply[Empty]{}, make(chan *rpc.Call, 1))
		t := time.NewTimer(c.grace)
		defer t.Stop()
		select {
		case <-pending.Done:
			if pending.Error == nil && reply.Err == nil {
				return reply.Resp, nil
			}
			var se rpc.ServerError
			if pending.Error != nil && !errors.As(pending.Error, &se) {
				// The connection failed meanwhile: say so, so the caller
				// drops it instead of reusing it.
				reason := c.Err()
				if reason == nil {
					reason = pending.Error
				}
				return zero, fmt.Errorf("agent %s: %w: %v (after %w)", method, ErrAgentUnreachable, reason, ctx.Err())
			}
		case <-t.C:
		}
		return zero, fmt.Errorf("agent %s: %w (%w)", method, contract.ErrCancelled, ctx.Err())
	}
	if pending.Error != nil {
		var se rpc.ServerError
		if errors.As(pending.Error, &se) {
			return zero, fmt.Errorf("agent %s: %s: %w", method, string(se), contract.ErrInternal)
		}
		if reason := c.Err(); reason != nil {
			return zero, fmt.Errorf("agent %s: %w: %v", method, ErrAgentUnreachable, reason)
		}
		return zero, fmt.Errorf("agent %s: %w: %v", method, ErrAgentUnreachable, pending.Error)
	}
	if reply.Err != nil {
		return reply.Resp, fmt.Errorf("agent %s: %w", method, contract.FromWire(reply.Err))
	}
	return reply.Resp, nil
}
