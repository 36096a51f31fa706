package wan

import (
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Acks of one block channel arrive on several streams, each read by its
// own goroutine: onAck must still run one call at a time, in order.
func TestOnAckSerialisedAcrossStreamReaders(t *testing.T) {
	s := newSession(Config{Logger: hclog.NewNullLogger()}.withDefaults(), true, make([]byte, 16))
	var mu sync.Mutex
	var got []int64
	inCB, overlap := 0, false
	first, release := make(chan struct{}), make(chan struct{})
	ch := newChannel(s, 1, chBlockSend)
	ch.onAck = func(off, _ int64) {
		mu.Lock()
		inCB++
		overlap = overlap || inCB > 1
		got = append(got, off)
		mu.Unlock()
		if off == 0 {
			close(first)
			<-release
		}
		mu.Lock()
		inCB--
		mu.Unlock()
	}
	for i := range 3 {
		ch.sseq++
		f := &outFrame{ch: ch, seq: ch.sseq, kind: kindBlock, off: int64(i) * 100, n: 10, win: 10 + frameOverhead, sent: true}
		ch.unacked = append(ch.unacked, f)
		ch.inflight += f.win
	}
	ch.nextSend = len(ch.unacked)
	s.chans[1] = ch

	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); s.onAck(1, 1) }() // stream 0's reader
	<-first
	go func() { defer wg.Done(); s.onAck(1, 3) }() // stream 1's reader, a later ack
	time.Sleep(50 * time.Millisecond)              // room for a wrong concurrent call
	close(release)
	wg.Wait()
	require.Len(t, got, 3)
	assert.Equal(t, []int64{0, 100, 200}, got)
	assert.False(t, overlap, "onAck ran twice at once")
}
