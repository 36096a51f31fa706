package wan

import (
	"sort"
	"sync"
	"sync/atomic"
)

type chanKind uint8

const (
	chUnknown chanKind = iota // frames arrived before the open frame
	chConn
	chBlockSend
	chBlockRecv
)

// outFrame is a reliable frame kept until the peer acknowledges it.
type outFrame struct {
	ch     *channel
	seq    uint64
	kind   uint8
	off    int64
	n      int    // logical payload length
	win    int    // window cost: stored bytes plus a per-frame overhead
	data   []byte // nil for zero, open, fin and reset frames
	zero   bool
	name   string
	sentOn *stream // stream that carries it now; nil while queued
	sent   bool    // transmitted at least once
	acked  bool
}

// inFrame is a received frame waiting to be consumed in order.
type inFrame struct {
	seq  uint64
	kind uint8
	off  int64
	n    int
	data []byte
	zero bool
	name string
	pos  int // bytes already read (byte streams)
}

// cost is what a received frame counts against maxReceiveHeld.
func (f *inFrame) cost() int64 { return int64(len(f.data)) + frameOverhead }

// maxReceiveHeld bounds the bytes (frame data + frameOverhead each) one
// channel holds received but not yet consumed, in its reorder buffer and
// read queue. A peer honouring its window never needs more than its
// ChannelWindow (at most maxChannelWindow) plus one frame; a peer that
// ignores it gets ErrProtocol instead of exhausting our memory.
var maxReceiveHeld int64 = 2*maxChannelWindow + 2*(maxPayload+frameOverhead)

// channel is one multiplexed flow. Every field but cbMu is guarded by
// Session.mu.
type channel struct {
	s    *Session
	id   uint32
	kind chanKind
	name string // target (conn) or channel name (block)

	// send side
	sseq       uint64 // last assigned sequence number
	unacked    []*outFrame
	nextSend   int // index in unacked of the first never-sent frame
	retx       []*outFrame
	inflight   int // logical bytes not yet acknowledged
	inReady    bool
	finQueued  bool
	finAcked   bool
	ackedBytes int64
	onAck      func(off, n int64)
	ackCB      []*outFrame // acknowledged block frames not yet passed to onAck
	// cbMu serialises onAck calls (stream readers ack concurrently);
	// whoever holds it drains ackCB, so the calls keep the sender's order.
	cbMu sync.Mutex

	// receive side
	rnext    uint64 // next expected sequence number
	rbuf     map[uint64]*inFrame
	rq       []*inFrame
	held     int64  // cost of the frames in rbuf and rq
	consumed uint64 // all frames <= consumed are consumed (cumulative ack value)
	rfin     bool   // peer's fin consumed
	rerr     error  // peer reset the channel
	closed   bool   // closed locally

	sig chan struct{} // closed and replaced on every state change

	skip atomic.Int32 // frames left to send uncompressed (auto compression)

	conn *Conn
	sink *BlockSink
}

func newChannel(s *Session, id uint32, kind chanKind) *channel {
	return &channel{s: s, id: id, kind: kind, rnext: 1, rbuf: map[uint64]*inFrame{}, sig: make(chan struct{})}
}

// popRQ removes and returns the first frame of the read queue. Caller
// holds s.mu.
func (c *channel) popRQ() *inFrame {
	f := c.rq[0]
	c.rq[0] = nil
	c.rq = c.rq[1:]
	c.held -= f.cost()
	return f
}

// dropRQ empties the read queue. Caller holds s.mu.
func (c *channel) dropRQ() {
	for _, f := range c.rq {
		c.held -= f.cost()
	}
	c.rq = nil
}

// signal wakes everyone waiting on the channel. Caller holds s.mu.
func (c *channel) signal() {
	close(c.sig)
	c.sig = make(chan struct{})
}

func (c *channel) hasWork() bool {
	for len(c.retx) > 0 && c.retx[0].acked {
		c.retx = c.retx[1:]
	}
	return len(c.retx) > 0 || c.nextSend < len(c.unacked)
}

// pick returns the next frame to transmit: retransmissions first.
func (c *channel) pick() *outFrame {
	for len(c.retx) > 0 {
		f := c.retx[0]
		c.retx = c.retx[1:]
		if !f.acked {
			return f
		}
	}
	if c.nextSend < len(c.unacked) {
		f := c.unacked[c.nextSend]
		c.nextSend++
		return f
	}
	return nil
}

// requeue moves frames carried by a failed stream back to the send queue.
func (c *channel) requeue(st *stream) int {
	n := 0
	for _, f := range c.unacked[:c.nextSend] {
		if f.sentOn == st {
			f.sentOn = nil
			c.retx = append(c.retx, f)
			n++
		}
	}
	if n > 0 {
		sort.Slice(c.retx, func(i, j int) bool { return c.retx[i].seq < c.retx[j].seq })
	}
	return n
}

// ack drops acknowledged frames and returns block extents newly acknowledged.
func (c *channel) ack(seq uint64) (acked []*outFrame) {
	for len(c.unacked) > 0 && c.unacked[0].seq <= seq {
		f := c.unacked[0]
		c.unacked[0] = nil
		c.unacked = c.unacked[1:]
		if c.nextSend > 0 {
			c.nextSend--
		}
		f.acked = true
		c.inflight -= f.win
		if f.kind == kindFin || f.kind == kindReset {
			c.finAcked = true
		}
		if f.kind == kindBlock || f.kind == kindData {
			c.ackedBytes += int64(f.n)
		}
		if f.kind == kindBlock {
			acked = append(acked, f)
		}
	}
	if len(acked) > 0 || len(c.unacked) == 0 {
		c.signal()
	}
	return acked
}
