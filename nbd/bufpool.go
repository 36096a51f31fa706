package nbd

import (
	"math/bits"
	"sync"
)

// Buffers are pooled by power-of-two size classes from 4 KiB to MaxPayload,
// so pipelined 32 MiB requests do not churn the garbage collector.
const minBufShift = 12

const maxBufShift = 25 // log2(MaxPayload)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a buffer of length n (contents undefined).
func getBuf(n int) []byte {
	c := bufClass(n)
	if c >= len(bufPools) {
		return make([]byte, n)
	}
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	return make([]byte, n, 1<<(c+minBufShift))
}

func putBuf(b []byte) {
	c := bufClass(cap(b))
	if c >= len(bufPools) || cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:cap(b)]
	bufPools[c].Put(&b)
}

// budget bounds a connection's requests in flight, by count and by bytes.
type budget struct {
	mu     sync.Mutex
	cond   sync.Cond
	slots  int
	bytes  int64
	closed bool
}

func newBudget(slots int, bytes int64) *budget {
	b := &budget{slots: slots, bytes: bytes}
	b.cond.L = &b.mu
	return b
}

// acquire waits for one slot and n bytes; false once closed.
func (b *budget) acquire(n int64) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for !b.closed && (b.slots < 1 || b.bytes < n) {
		b.cond.Wait()
	}
	if b.closed {
		return false
	}
	b.slots--
	b.bytes -= n
	return true
}

func (b *budget) release(n int64) {
	b.mu.Lock()
	b.slots++
	b.bytes += n
	b.mu.Unlock()
	b.cond.Broadcast()
}

func (b *budget) close() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}
