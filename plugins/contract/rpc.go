package contract

import (
	"context"
	"fmt"
	"net/rpc"
	"sync"
	"sync/atomic"
	"time"
)

// CallMeta travels with every request: the call's id (for Cancel) and the
// deadline of the host's ctx.
type CallMeta struct {
	ID       uint64
	Deadline time.Time // zero means none
}

// Args is the net/rpc argument of every method: the metadata plus the
// method's request struct.
type Args[Req any] struct {
	Call CallMeta
	Req  Req
}

// Reply is the net/rpc reply of every method: the method's response struct
// plus the error envelope. The RPC-level error is reserved for transport
// failures.
type Reply[Resp any] struct {
	Resp Resp
	Err  *WireError
}

// CancelArgs asks the server to cancel the ctx of call ID.
type CancelArgs struct {
	ID uint64
}

// CancelReply is empty.
type CancelReply struct{}

// rpcService is the go-plugin net/rpc service name of a dispensed plugin.
const rpcService = "Plugin"

// DefaultCancelGrace is how long a client stub waits, after sending Cancel,
// for the backend to return from the cancelled call before giving up on it.
const DefaultCancelGrace = 10 * time.Second

// rpcClient is the common part of the client stubs.
type rpcClient struct {
	c      *rpc.Client
	nextID atomic.Uint64
	grace  time.Duration
}

// call runs method with ctx semantics over net/rpc: deadline forwarded,
// cancellation turned into a Cancel RPC, transport failures classified.
func call[Req, Resp any](ctx context.Context, rc *rpcClient, method string, req Req) (Resp, error) {
	var zero Resp
	if err := ctx.Err(); err != nil {
		return zero, fmt.Errorf("%s: %w (%w)", method, ErrCancelled, err)
	}
	args := Args[Req]{Call: CallMeta{ID: rc.nextID.Add(1)}, Req: req}
	if dl, ok := ctx.Deadline(); ok {
		args.Call.Deadline = dl
	}
	var reply Reply[Resp]
	pending := rc.c.Go(rpcService+"."+method, args, &reply, make(chan *rpc.Call, 1))
	select {
	case <-pending.Done:
	case <-ctx.Done():
		// Tell the backend; then give it a bounded time to return.
		rc.c.Go(rpcService+".Cancel", CancelArgs{ID: args.Call.ID}, &CancelReply{}, make(chan *rpc.Call, 1))
		t := time.NewTimer(rc.grace)
		defer t.Stop()
		select {
		case <-pending.Done:
			if pending.Error == nil && reply.Err == nil {
				// The call completed before the cancellation reached it.
				return reply.Resp, nil
			}
		case <-t.C:
		}
		return zero, fmt.Errorf("%s: %w (%w)", method, ErrCancelled, ctx.Err())
	}
	if pending.Error != nil {
		return zero, transportError(method, pending.Error)
	}
	if reply.Err != nil {
		return reply.Resp, fmt.Errorf("%s: %w", method, FromWire(reply.Err))
	}
	return reply.Resp, nil
}

// CallTracker is the common part of the RPC server adapters (the backend
// adapters here and the site agent's control service): it owns the ctx of
// every call in flight so a Cancel request can reach it, and it forwards the
// caller's deadline.
type CallTracker struct {
	base context.Context

	mu      sync.Mutex
	running map[uint64]context.CancelFunc
	// early holds Cancel requests that overtook their call (net/rpc runs
	// each request in its own goroutine), with their arrival time.
	early map[uint64]time.Time
}

// NewCallTracker returns a tracker whose call contexts derive from base
// (cancelling base cancels every call).
func NewCallTracker(base context.Context) *CallTracker {
	if base == nil {
		base = context.Background()
	}
	return &CallTracker{base: base, running: map[uint64]context.CancelFunc{}, early: map[uint64]time.Time{}}
}

// earlyTTL bounds how long an early Cancel is remembered.
const earlyTTL = time.Minute

// Begin returns the context of the call m (with its deadline) and a func to
// call when the call ends.
func (t *CallTracker) Begin(m CallMeta) (context.Context, func()) {
	ctx, cancel := context.WithCancel(t.base)
	if !m.Deadline.IsZero() {
		var c2 context.CancelFunc
		ctx, c2 = context.WithDeadline(ctx, m.Deadline)
		inner := cancel
		cancel = func() { c2(); inner() }
	}
	t.mu.Lock()
	if _, ok := t.early[m.ID]; ok {
		delete(t.early, m.ID)
		cancel()
	}
	now := time.Now()
	for id, at := range t.early {
		if now.Sub(at) > earlyTTL {
			delete(t.early, id)
		}
	}
	t.running[m.ID] = cancel
	t.mu.Unlock()
	return ctx, func() {
		t.mu.Lock()
		delete(t.running, m.ID)
		t.mu.Unlock()
		cancel()
	}
}

// Cancel cancels call id, or remembers the request for a short while if it
// overtook its call.
func (t *CallTracker) Cancel(id uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if c, ok := t.running[id]; ok {
		c()
		return
	}
	t.early[id] = time.Now()
}

// serve runs one server-side method.
func serve[Req, Resp any](t *CallTracker, args Args[Req], reply *Reply[Resp], fn func(context.Context, Req) (Resp, error)) error {
	ctx, done := t.Begin(args.Call)
	defer done()
	resp, err := fn(ctx, args.Req)
	reply.Resp = resp
	reply.Err = ToWire(err)
	return nil
}
