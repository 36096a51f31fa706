package conformance

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// StorageSetup is what a backend's test hands the storage suite.
type StorageSetup struct {
	// Source and Destination are configured backends (Configure already
	// called) for the two sites; they may be the same instance.
	Source, Destination contract.Storage
	// NewDisk returns a fresh disk scenario; i distinguishes disks within
	// one test (each must have its own VDI and migration key).
	NewDisk func(t *testing.T, i int) *Disk
	// NewSlowDisk, optional, returns a disk whose round 0 takes at least
	// about a second (e.g. a rate-limited or large one), for the
	// cancellation, abort and concurrent-status tests. Without it those
	// tests are skipped with a message.
	NewSlowDisk func(t *testing.T, i int) *Disk
	// Restart, optional, stops the current backends of both sites and
	// returns new ones as after a restart of the backend processes (same
	// state directories, same config), for the recovery test. Without it
	// Recover is exercised on the running backends.
	Restart func(t *testing.T) (source, destination contract.Storage)
}

// Disk is one disk scenario of a backend's test fixture.
type Disk struct {
	Receiver contract.PrepareReceiverRequest
	// Sender builds the source's request from the receiver's response, as
	// the engine does (Peer = the receiver's endpoint, reachable from the
	// source; in tests usually unchanged).
	Sender func(recv contract.PrepareReceiverResponse) contract.PrepareSenderRequest
	// Round returns the request of round k (Handle left empty): it takes
	// or creates snapshot k of the source disk (writing new data for k>0).
	// Round(t, 0) must be Full.
	Round func(t *testing.T, k int) contract.SyncRoundRequest
	// Verify fails the test unless the replica equals snapshot k.
	Verify func(t *testing.T, k int)
}

// StorageFactory builds a fresh setup for one subtest.
type StorageFactory func(t *testing.T) StorageSetup

// pair is a prepared sender/receiver.
type pair struct {
	src, dst   contract.Storage
	disk       *Disk
	recv       contract.PrepareReceiverResponse
	send       contract.PrepareSenderResponse
	srcState   contract.State
	dstState   contract.State
	srcHandle  contract.Handle
	dstHandle  contract.Handle
	migration  string
	lastRound  int
	roundStats []contract.RoundStats
	mu         sync.Mutex
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func prepare(t *testing.T, s StorageSetup, d *Disk) *pair {
	t.Helper()
	ctx := ctxT(t)
	recv, err := s.Destination.PrepareReceiver(ctx, d.Receiver)
	require.NoError(t, err, "PrepareReceiver")
	require.NotEmpty(t, recv.Handle.ID, "receiver handle id")
	assert.Equal(t, contract.RoleDestination, recv.Handle.Role)
	assert.Equal(t, d.Receiver.MigrationID, recv.Handle.MigrationID)
	assert.False(t, recv.Existing)
	send, err := s.Source.PrepareSender(ctx, d.Sender(recv))
	require.NoError(t, err, "PrepareSender")
	require.NotEmpty(t, send.Handle.ID, "sender handle id")
	assert.Equal(t, contract.RoleSource, send.Handle.Role)
	p := &pair{src: s.Source, dst: s.Destination, disk: d, recv: recv, send: send,
		srcHandle: send.Handle, dstHandle: recv.Handle, migration: d.Receiver.MigrationID, lastRound: -1}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = p.src.Cleanup(ctx, contract.CleanupRequest{Handle: p.srcHandle, DeleteReplica: true})
		_, _ = p.dst.Cleanup(ctx, contract.CleanupRequest{Handle: p.dstHandle, DeleteReplica: true})
	})
	return p
}

func (p *pair) round(t *testing.T, ctx context.Context, k int) (contract.SyncRoundResponse, error) {
	t.Helper()
	return p.sync(ctx, p.request(t, k))
}

// request builds round k's request (in the test goroutine: fixtures may FailNow).
func (p *pair) request(t *testing.T, k int) contract.SyncRoundRequest {
	t.Helper()
	req := p.disk.Round(t, k)
	req.Handle = p.srcHandle.ID
	return req
}

// sync runs a round; safe to call from any goroutine.
func (p *pair) sync(ctx context.Context, req contract.SyncRoundRequest) (contract.SyncRoundResponse, error) {
	resp, err := p.src.SyncRound(ctx, req)
	if err == nil {
		p.mu.Lock()
		p.srcHandle.State = resp.State
		p.lastRound = req.Round
		p.roundStats = append(p.roundStats, resp.Stats)
		p.mu.Unlock()
	}
	return resp, err
}

func info(t *testing.T, s contract.Storage) contract.Info {
	t.Helper()
	in, err := s.Info(ctxT(t))
	require.NoError(t, err)
	return in
}

// RunStorageSuite runs the storage conformance suite against the backend
// the factory builds.
func RunStorageSuite(t *testing.T, factory StorageFactory) {
	t.Run("Info", func(t *testing.T) {
		s := factory(t)
		in := info(t, s.Source)
		assert.Equal(t, contract.KindStorage, in.Kind)
		assert.NotEmpty(t, in.Name)
		assert.NotEmpty(t, in.Version)
		require.NotEmpty(t, in.APIVersions)
		for _, v := range in.APIVersions {
			_, _, err := contract.ParseAPIVersion(v)
			assert.NoError(t, err)
		}
		_, err := contract.SelectAPIVersion(contract.HostAPIVersions, in.APIVersions)
		assert.NoError(t, err, "the backend must support an API version this host drives")
		assert.True(t, in.Capabilities.Has(contract.CapSource) || in.Capabilities.Has(contract.CapDestination),
			"a storage backend must have the source or destination capability")
	})

	t.Run("ConfigureRejectsUnknownAPIVersion", func(t *testing.T) {
		s := factory(t)
		_, err := s.Source.Configure(ctxT(t), contract.ConfigureRequest{APIVersion: "999.0"})
		require.ErrorIs(t, err, contract.ErrUnsupported)
	})

	t.Run("UnknownHandleIsNotFound", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		const h = "no-such-handle"
		_, err := s.Source.Status(ctx, contract.StatusRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Status")
		_, err = s.Source.SyncRound(ctx, contract.SyncRoundRequest{Handle: h, Full: true})
		assert.ErrorIs(t, err, contract.ErrNotFound, "SyncRound")
		_, err = s.Source.Converge(ctx, contract.ConvergeRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Converge")
		_, err = s.Destination.Finalize(ctx, contract.FinalizeRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Finalize")
		_, err = s.Source.Abort(ctx, contract.AbortRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Abort")
		_, err = s.Source.Cleanup(ctx, contract.CleanupRequest{Handle: contract.Handle{ID: h, Role: contract.RoleSource}})
		assert.NoError(t, err, "Cleanup of an unknown handle is a no-op")
	})

	t.Run("InvalidRequests", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		d := s.NewDisk(t, 0)
		bad := d.Receiver
		bad.MigrationID = ""
		_, err := s.Destination.PrepareReceiver(ctx, bad)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "PrepareReceiver without MigrationID")
		p := prepare(t, s, d)
		req := d.Round(t, 0)
		req.Handle = p.dstHandle.ID
		_, err = p.dst.SyncRound(ctx, req)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "SyncRound on a destination handle")
		_, err = p.src.Finalize(ctx, contract.FinalizeRequest{Handle: p.srcHandle.ID})
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "Finalize on a source handle")
		req = d.Round(t, 0)
		req.Handle = p.srcHandle.ID
		req.Full = false
		req.ChangedBlocks = nil
		req.Round = 1
		_, err = p.src.SyncRound(ctx, req)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "incremental round without a bitmap before any full round")
	})

	t.Run("PrepareTwice", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		d := s.NewDisk(t, 0)
		p := prepare(t, s, d)
		again, err := s.Destination.PrepareReceiver(ctx, d.Receiver)
		require.NoError(t, err, "the identical request again returns the same handle")
		assert.True(t, again.Existing)
		assert.Equal(t, p.recv.Handle.ID, again.Handle.ID)
		assert.Equal(t, p.recv.Endpoint.Address, again.Endpoint.Address)
		sendAgain, err := s.Source.PrepareSender(ctx, d.Sender(p.recv))
		require.NoError(t, err)
		assert.True(t, sendAgain.Existing)
		assert.Equal(t, p.send.Handle.ID, sendAgain.Handle.ID)

		diff := d.Receiver
		diff.Disk.VirtualSize += contract.DefaultBlockSize
		_, err = s.Destination.PrepareReceiver(ctx, diff)
		assert.ErrorIs(t, err, contract.ErrAlreadyExists, "same key, different request")
		sdiff := d.Sender(p.recv)
		sdiff.Disk.VirtualSize += contract.DefaultBlockSize
		_, err = s.Source.PrepareSender(ctx, sdiff)
		assert.ErrorIs(t, err, contract.ErrAlreadyExists, "same key, different request")
	})

	t.Run("RoundsReplicate", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		in := info(t, s.Source)
		d := s.NewDisk(t, 0)
		p := prepare(t, s, d)

		r0, err := p.round(t, ctx, 0)
		require.NoError(t, err, "round 0")
		assert.Equal(t, 0, r0.Stats.Round)
		assert.Equal(t, r0.Stats.BytesToCopy, r0.Stats.BytesCopied, "a finished round copied what it had to")
		d.Verify(t, 0)

		req := d.Round(t, 1)
		if !in.Capabilities.Has(contract.CapIncremental) {
			req.Full = true
		}
		req.Handle = p.srcHandle.ID
		r1, err := p.src.SyncRound(ctx, req)
		require.NoError(t, err, "round 1")
		assert.Equal(t, 1, r1.Stats.Round)
		d.Verify(t, 1)
		if in.Capabilities.Has(contract.CapIncremental) && !req.Full {
			assert.Less(t, r1.Stats.BytesToCopy, r0.Stats.BytesToCopy+1, "an incremental round moves no more than the full one")
		}

		st, err := p.src.Status(ctx, contract.StatusRequest{Handle: p.srcHandle.ID})
		require.NoError(t, err)
		assert.Equal(t, 1, st.Round)
		assert.Equal(t, contract.RoleSource, st.Role)
		assert.Equal(t, p.srcHandle.ID, st.Handle)
		assert.Contains(t, []contract.HandleState{contract.StateIdle, contract.StateConverged}, st.State)
		dst, err := p.dst.Status(ctx, contract.StatusRequest{Handle: p.dstHandle.ID})
		require.NoError(t, err)
		assert.Equal(t, contract.RoleDestination, dst.Role)

		_, err = p.src.Converge(ctx, contract.ConvergeRequest{Handle: p.srcHandle.ID})
		require.NoError(t, err, "Converge")
		fin, err := p.dst.Finalize(ctx, contract.FinalizeRequest{Handle: p.dstHandle.ID})
		require.NoError(t, err, "Finalize")
		assert.Equal(t, p.recv.ReplicaVDIUUID, fin.ReplicaVDIUUID)
		_, err = p.dst.Finalize(ctx, contract.FinalizeRequest{Handle: p.dstHandle.ID})
		require.NoError(t, err, "Finalize is idempotent")
		d.Verify(t, 1)

		for i := 0; i < 2; i++ {
			_, err = p.src.Cleanup(ctx, contract.CleanupRequest{Handle: p.srcHandle})
			require.NoError(t, err, "source Cleanup #%d", i+1)
			_, err = p.dst.Cleanup(ctx, contract.CleanupRequest{Handle: p.dstHandle})
			require.NoError(t, err, "destination Cleanup #%d", i+1)
		}
		d.Verify(t, 1) // kept: no DeleteReplica
		_, err = p.src.Status(ctx, contract.StatusRequest{Handle: p.srcHandle.ID})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Status after Cleanup")
		_, err = p.dst.Status(ctx, contract.StatusRequest{Handle: p.dstHandle.ID})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Status after Cleanup")
	})

	t.Run("ConcurrentStatus", func(t *testing.T) {
		s := factory(t)
		d := slowOrSkip(t, s, 0)
		ctx := ctxT(t)
		p := prepare(t, s, d)
		done := make(chan struct{})
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				var last int64
				for {
					select {
					case <-done:
						return
					default:
					}
					h := p.srcHandle.ID
					st, err := p.src.Status(ctx, contract.StatusRequest{Handle: h})
					if err == nil && st.BytesCopied < last {
						err = fmt.Errorf("BytesCopied went backwards: %d after %d", st.BytesCopied, last)
					}
					if err != nil {
						errs <- err
						return
					}
					last = st.BytesCopied
					if _, err := p.dst.Status(ctx, contract.StatusRequest{Handle: p.dstHandle.ID}); err != nil {
						errs <- err
						return
					}
					time.Sleep(5 * time.Millisecond)
				}
			}()
		}
		_, err := p.round(t, ctx, 0)
		close(done)
		wg.Wait()
		close(errs)
		require.NoError(t, err)
		for err := range errs {
			t.Errorf("Status during SyncRound: %v", err)
		}
		d.Verify(t, 0)
	})

	t.Run("CancelRound", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)

		// A ctx that is already cancelled never starts the work.
		d0 := s.NewDisk(t, 0)
		p0 := prepare(t, s, d0)
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		_, err := p0.round(t, cctx, 0)
		require.ErrorIs(t, err, contract.ErrCancelled)

		d := slowOrSkip(t, s, 1)
		p := prepare(t, s, d)
		rctx, rcancel := context.WithCancel(ctx)
		res := make(chan error, 1)
		req := p.request(t, 0)
		go func() { _, err := p.sync(rctx, req); res <- err }()
		waitSyncing(t, p)
		rcancel()
		select {
		case err = <-res:
		case <-time.After(30 * time.Second):
			t.Fatal("SyncRound did not return after its ctx was cancelled")
		}
		require.ErrorIs(t, err, contract.ErrCancelled)
		st, err := p.src.Status(ctx, contract.StatusRequest{Handle: p.srcHandle.ID})
		require.NoError(t, err, "the handle survives a cancelled round")
		assert.NotEqual(t, contract.StateSyncing, st.State)
		assert.Less(t, st.BytesCopied, st.BytesToCopy, "the round was cut short")
	})

	t.Run("AbortAfterStart", func(t *testing.T) {
		s := factory(t)
		d := slowOrSkip(t, s, 0)
		ctx := ctxT(t)
		p := prepare(t, s, d)
		res := make(chan error, 1)
		req := p.request(t, 0)
		go func() { _, err := p.sync(ctx, req); res <- err }()
		waitSyncing(t, p)
		_, err := p.src.Abort(ctx, contract.AbortRequest{Handle: p.srcHandle.ID})
		require.NoError(t, err, "Abort")
		select {
		case err = <-res:
			require.Error(t, err, "an aborted round must not report success")
		case <-time.After(30 * time.Second):
			t.Fatal("SyncRound did not return after Abort")
		}
		st, err := p.src.Status(ctx, contract.StatusRequest{Handle: p.srcHandle.ID})
		require.NoError(t, err, "an aborted handle stays known until Cleanup")
		assert.Equal(t, contract.StateAborted, st.State)
		_, err = p.src.Abort(ctx, contract.AbortRequest{Handle: p.srcHandle.ID})
		require.NoError(t, err, "Abort is idempotent")
		_, err = p.dst.Abort(ctx, contract.AbortRequest{Handle: p.dstHandle.ID})
		require.NoError(t, err, "Abort of the receiver")
		for i := 0; i < 2; i++ {
			_, err = p.src.Cleanup(ctx, contract.CleanupRequest{Handle: p.srcHandle, DeleteReplica: true})
			require.NoError(t, err)
			_, err = p.dst.Cleanup(ctx, contract.CleanupRequest{Handle: p.dstHandle, DeleteReplica: true})
			require.NoError(t, err)
		}
		_, err = p.dst.Status(ctx, contract.StatusRequest{Handle: p.dstHandle.ID})
		assert.ErrorIs(t, err, contract.ErrNotFound)
	})

	t.Run("RecoverFromState", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		in := info(t, s.Source)
		d := s.NewDisk(t, 0)
		p := prepare(t, s, d)
		_, err := p.round(t, ctx, 0)
		require.NoError(t, err)
		if !in.Capabilities.Has(contract.CapResume) {
			_, err := p.dst.Recover(ctx, contract.RecoverRequest{Handle: p.dstHandle})
			require.ErrorIs(t, err, contract.ErrUnsupported, "Recover without CapResume must be unsupported")
			return
		}
		src, dst := p.src, p.dst
		if s.Restart != nil {
			src, dst = s.Restart(t)
		}
		rd, err := dst.Recover(ctx, contract.RecoverRequest{Handle: p.dstHandle})
		require.NoError(t, err, "Recover destination")
		assert.Equal(t, p.dstHandle.ID, rd.Handle.ID, "handle ids are stable across Recover")
		assert.Equal(t, contract.RoleDestination, rd.Status.Role)
		recv := p.recv
		recv.Handle = rd.Handle
		if rd.Endpoint.Address != "" {
			recv.Endpoint = rd.Endpoint
		}
		rs, err := src.Recover(ctx, contract.RecoverRequest{Handle: p.srcHandle, Peer: d.Sender(recv).Peer})
		require.NoError(t, err, "Recover source")
		assert.Equal(t, p.srcHandle.ID, rs.Handle.ID)
		assert.Equal(t, 0, rs.Status.Round, "the source remembers the last round")

		again, err := dst.Recover(ctx, contract.RecoverRequest{Handle: p.dstHandle})
		require.NoError(t, err, "Recover of a handle already held is idempotent")
		assert.Equal(t, rd.Handle.ID, again.Handle.ID)

		p.src, p.dst, p.srcHandle, p.dstHandle = src, dst, rs.Handle, rd.Handle
		_, err = p.round(t, ctx, 1)
		require.NoError(t, err, "round 1 after recovery")
		d.Verify(t, 1)

		_, err = dst.Recover(ctx, contract.RecoverRequest{Handle: contract.Handle{ID: "x", Role: contract.RoleDestination,
			MigrationID: "m", State: contract.State{Version: 1, Data: []byte{0xc1, 0xff, 0x00}}}})
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "Recover from garbage state")
	})
}

func slowOrSkip(t *testing.T, s StorageSetup, i int) *Disk {
	t.Helper()
	if s.NewSlowDisk == nil {
		t.Skip("the backend's setup provides no NewSlowDisk; cannot test work in flight")
	}
	return s.NewSlowDisk(t, i)
}

// waitSyncing waits until the source handle reports progress in a round.
func waitSyncing(t *testing.T, p *pair) {
	t.Helper()
	require.Eventually(t, func() bool {
		st, err := p.src.Status(context.Background(), contract.StatusRequest{Handle: p.srcHandle.ID})
		return err == nil && st.State == contract.StateSyncing && st.BytesCopied > 0
	}, 30*time.Second, 10*time.Millisecond, "the round never started")
}
