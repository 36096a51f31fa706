package nbdstore

import (
	"context"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan/wanemu"
	"github.com/wanmotion/wanmotion/xapi"
)

// waitCopied waits until the source handle has copied at least frac of
// the round.
func waitCopied(t *testing.T, b *Backend, handle string, frac float64) contract.StorageStatus {
	t.Helper()
	var st contract.StorageStatus
	require.Eventually(t, func() bool {
		var err error
		st, err = b.Status(context.Background(), contract.StatusRequest{Handle: handle})
		return err == nil && st.State == contract.StateSyncing && st.BytesToCopy > 0 &&
			float64(st.BytesCopied) >= frac*float64(st.BytesToCopy)
	}, 60*time.Second, 5*time.Millisecond)
	return st
}

// TestSeedOverCutLink seeds a VDI in several rounds while the guest keeps
// writing, through an emulated WAN link that is cut (and blackholed) in the
// middle of rounds; at the end the replica equals the last snapshot.
func TestSeedOverCutLink(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f := newSimFixture(t)
	cfg := Config{ChunkSize: 256 << 10, CheckpointBytes: 2 << 20, StallTimeoutSec: 3}
	src, dst := configured(t, f.src.stateDir, cfg), configured(t, f.dst.stateDir, cfg)
	d := f.newDisk(t, "cut", 32<<20, 300)
	d.writes = 40

	recv, err := dst.PrepareReceiver(ctx, d.receiverRequest(""))
	require.NoError(t, err)
	link, err := wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: recv.Endpoint.Address, RTT: 10 * time.Millisecond,
		Bandwidth: 100e6})
	require.NoError(t, err)
	defer func() { _ = link.Close() }()
	peer := recv.Endpoint
	peer.Address = link.Addr()
	sreq := d.senderRequest(recv, nil)
	sreq.Peer = peer
	send, err := src.PrepareSender(ctx, sreq)
	require.NoError(t, err)

	// The guest keeps writing to the live VDI all along.
	gctx, gstop := context.WithCancel(ctx)
	var gwg sync.WaitGroup
	gwg.Add(1)
	go func() {
		defer gwg.Done()
		for gctx.Err() == nil {
			d.guestWrite(t, 1)
			time.Sleep(20 * time.Millisecond)
		}
	}()

	type result struct {
		resp contract.SyncRoundResponse
		err  error
	}
	runRound := func(k int, verify bool, disrupt func()) contract.RoundStats {
		req := d.snapshot(t, k)
		req.Handle, req.Verify = send.Handle.ID, verify
		res := make(chan result, 1)
		go func() {
			resp, err := src.SyncRound(ctx, req)
			res <- result{resp, err}
		}()
		if disrupt != nil {
			disrupt()
		}
		r := <-res
		require.NoError(t, r.err, "round %d", k)
		t.Logf("round %d: %+v", k, r.resp.Stats)
		d.equal(t, k)
		return r.resp.Stats
	}
	cut := func() {
		waitCopied(t, src, send.Handle.ID, 0.3)
		link.Cut()
		time.Sleep(200 * time.Millisecond)
		require.NoError(t, link.Restore())
	}
	r0 := runRound(0, false, cut)
	assert.Equal(t, r0.BytesToCopy, r0.BytesCopied)
	inFlight := int64(32 * (256 << 10))
	assert.Less(t, r0.BytesOnWire, r0.BytesToCopy+inFlight+(1<<20),
		"after a cut only what was in flight is sent again")
	assert.Less(t, r0.BytesToCopy, int64(25<<20), "round 0 is sparse: holes are not copied")

	r1 := runRound(1, false, nil)
	assert.Less(t, r1.BytesToCopy, r0.BytesToCopy, "round 1 copies only changed blocks")

	blackhole := func() {
		waitCopied(t, src, send.Handle.ID, 0.2)
		link.Blackhole()
		time.Sleep(300 * time.Millisecond)
		require.NoError(t, link.Restore())
	}
	d.writes = 400 // a bigger delta, so the round lasts long enough to disrupt
	runRound(2, false, blackhole)
	d.writes = 40
	r3 := runRound(3, true, nil)
	assert.Zero(t, r3.Repaired, "nothing to repair after a clean round")

	// Damage the replica behind the backend's back, in a block round 4
	// does not copy: Verify finds and repairs it.
	gstop()
	gwg.Wait()
	req4 := d.snapshot(t, 4)
	victim := int64(-1)
	for i := int64(0); i < d.size/blockSize; i++ {
		if req4.ChangedBlocks[i/8]&(0x80>>(i%8)) == 0 {
			victim = i
			break
		}
	}
	require.GreaterOrEqual(t, victim, int64(0))
	rp, err := f.sim.VDIPath(d.replica)
	require.NoError(t, err)
	fh, err := os.OpenFile(rp, os.O_WRONLY, 0)
	require.NoError(t, err)
	_, err = fh.WriteAt([]byte("corruption"), victim*blockSize+100)
	require.NoError(t, err)
	require.NoError(t, fh.Close())
	r4 := runRound(4, true, nil)
	assert.Equal(t, int64(blockSize), r4.Repaired, "the damaged block was repaired")
	assert.GreaterOrEqual(t, link.Counters().Cuts, 2)

	fin, err := dst.Finalize(ctx, contract.FinalizeRequest{Handle: recv.Handle.ID})
	require.NoError(t, err)
	assert.Equal(t, d.replica, fin.ReplicaVDIUUID)
	d.equal(t, 4)
	vbds, err := f.dst.x.VBDGetAllRecords(ctx)
	require.NoError(t, err)
	for _, v := range vbds {
		assert.NotEqual(t, xapi.VDIRef(recv.ReplicaVDIRef), v.VDI, "Finalize detached the replica from dom0")
	}
}

// TestResumeAfterRestart restarts both backends in the middle of a round:
// the round resumes from the receiver's journal and re-sends only what
// was not flushed.
func TestResumeAfterRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	f := newSimFixture(t)
	cfg := Config{ChunkSize: 256 << 10, CheckpointBytes: 1 << 20, RateLimit: 8 << 20}
	src, dst := configured(t, f.src.stateDir, cfg), configured(t, f.dst.stateDir, cfg)
	d := f.newDisk(t, "restart", 32<<20, 400)

	recv, err := dst.PrepareReceiver(ctx, d.receiverRequest(""))
	require.NoError(t, err)
	send, err := src.PrepareSender(ctx, d.senderRequest(recv, nil))
	require.NoError(t, err)
	req := d.snapshot(t, 0)
	req.Handle = send.Handle.ID
	rctx, rcancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { _, err := src.SyncRound(rctx, req); done <- err }()
	before := waitCopied(t, src, send.Handle.ID, 0.6)
	rcancel() // the agent goes away mid-round
	require.ErrorIs(t, <-done, contract.ErrCancelled)
	src.shutdown()
	dst.shutdown()

	src2, dst2 := configured(t, f.src.stateDir, cfg), configured(t, f.dst.stateDir, cfg)
	rd, err := dst2.Recover(ctx, contract.RecoverRequest{Handle: recv.Handle, XAPI: f.dst.access})
	require.NoError(t, err)
	_, err = src2.Recover(ctx, contract.RecoverRequest{Handle: send.Handle, XAPI: f.src.access, Peer: rd.Endpoint})
	require.NoError(t, err)
	resp, err := src2.SyncRound(ctx, req)
	require.NoError(t, err)
	d.equal(t, 0)
	resent := resp.Stats.BytesOnWire
	t.Logf("to copy %d, copied before the restart %d, on the wire after it %d", resp.Stats.BytesToCopy, before.BytesCopied, resent)
	assert.Less(t, resent, resp.Stats.BytesToCopy-before.BytesCopied+int64(2<<20)+int64(32*(256<<10)),
		"only blocks not flushed before the restart are sent again")
	assert.Equal(t, resp.Stats.BytesToCopy, resp.Stats.BytesCopied)
}

// freezeProxy forwards TCP to upstream; the first connection that carries
// more than limit bytes from the client goes silent (stays open, moves
// nothing more).
type freezeProxy struct {
	ln     net.Listener
	conns  atomic.Int32
	frozen atomic.Bool
	wg     sync.WaitGroup
	mu     sync.Mutex
	open   []net.Conn
}

func newFreezeProxy(t *testing.T, upstream string, limit int64) *freezeProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	p := &freezeProxy{ln: ln}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u, err := net.Dial("tcp", upstream)
			if err != nil {
				_ = c.Close()
				continue
			}
			p.mu.Lock()
			p.open = append(p.open, c, u)
			p.mu.Unlock()
			p.conns.Add(1)
			up := &freezeWriter{w: u, left: limit, frozen: &p.frozen}
			p.wg.Add(2)
			go func() { defer p.wg.Done(); _, _ = io.Copy(up, c) }()
			go func() { defer p.wg.Done(); _, _ = io.Copy(c, u) }()
		}
	}()
	t.Cleanup(func() {
		_ = ln.Close()
		p.mu.Lock()
		for _, c := range p.open {
			_ = c.Close()
		}
		p.mu.Unlock()
		p.wg.Wait()
	})
	return p
}

// freezeWriter passes limit bytes; then, if no other connection froze
// yet, it swallows everything.
type freezeWriter struct {
	w      io.Writer
	left   int64
	frozen *atomic.Bool
	mine   bool
}

func (f *freezeWriter) Write(b []byte) (int, error) {
	if f.mine {
		return len(b), nil
	}
	if f.left <= 0 && f.frozen.CompareAndSwap(false, true) {
		f.mine = true
		return len(b), nil
	}
	f.left -= int64(len(b))
	return f.w.Write(b)
}

// TestStalledPathReconnects: a path that goes silent without closing is
// detected by the stall watchdog and the round goes on over a new
// connection.
func TestStalledPathReconnects(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f := newSimFixture(t)
	cfg := Config{Connections: 1, ChunkSize: 256 << 10, StallTimeoutSec: 1}
	src, dst := configured(t, f.src.stateDir, cfg), configured(t, f.dst.stateDir, cfg)
	d := f.newDisk(t, "stall", 8<<20, 80)
	recv, err := dst.PrepareReceiver(ctx, d.receiverRequest(""))
	require.NoError(t, err)
	proxy := newFreezeProxy(t, recv.Endpoint.Address, 1<<20)
	sreq := d.senderRequest(recv, nil)
	sreq.Peer.Address = proxy.ln.Addr().String()
	send, err := src.PrepareSender(ctx, sreq)
	require.NoError(t, err)
	req := d.snapshot(t, 0)
	req.Handle = send.Handle.ID
	_, err = src.SyncRound(ctx, req)
	require.NoError(t, err)
	d.equal(t, 0)
	assert.True(t, proxy.frozen.Load(), "a connection went silent")
	assert.GreaterOrEqual(t, proxy.conns.Load(), int32(3), "the silent connection was replaced (journal, data, data)")
}
