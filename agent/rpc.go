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

// codec is the msgpack framing shared by both ends: a header then a body,
// each one msgpack value.
type codec struct {
	c   io.ReadWriteCloser
	lr  *limitedReader
	dec *msgpack.Decoder
	w   *bufio.Writer
	enc *msgpack.Encoder
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
	return &codec{c: c, lr: lr, dec: dec, w: w, enc: enc}
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

func (c *codec) write(h wireHeader, body any) error {
	if err := c.enc.Encode(h); err != nil {
		return err
	}
	if err := c.enc.Encode(body); err != nil {
		return err
	}
	return c.w.Flush()
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
		return err
	}
	r.ServiceMethod, r.Seq, r.Error = h.Method, h.Seq, h.Error
	return nil
}

func (c *clientCodec) ReadResponseBody(body any) error { return c.readBody(body) }

func (c *clientCodec) Close() error { return c.c.Close() }

// Conn is the controller's end of one agent control connection.
type Conn struct {
	rc     *rpc.Client
	nextID atomic.Uint64
	grace  time.Duration
}

// DefaultCancelGrace is how long Call waits, after sending Cancel, for the
// agent to return from the cancelled call.
const DefaultCancelGrace = 10 * time.Second

// NewConn wraps an established (TLS) connection to an agent.
func NewConn(c net.Conn) *Conn {
	return &Conn{rc: rpc.NewClientWithCodec(&clientCodec{codec: newCodec(c)}), grace: DefaultCancelGrace}
}

// Close closes the connection; calls in flight fail.
func (c *Conn) Close() error { return c.rc.Close() }

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
		case <-t.C:
		}
		return zero, fmt.Errorf("agent %s: %w (%w)", method, contract.ErrCancelled, ctx.Err())
	}
	if pending.Error != nil {
		var se rpc.ServerError
		if errors.As(pending.Error, &se) {
			return zero, fmt.Errorf("agent %s: %s: %w", method, string(se), contract.ErrInternal)
		}
		return zero, fmt.Errorf("agent %s: %w: %v", method, ErrAgentUnreachable, pending.Error)
	}
	if reply.Err != nil {
		return reply.Resp, fmt.Errorf("agent %s: %w", method, contract.FromWire(reply.Err))
	}
	return reply.Resp, nil
}
