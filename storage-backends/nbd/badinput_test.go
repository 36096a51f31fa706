package nbdstore

import (
	"bytes"
	"context"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

func TestReceiverRefusesBadTargets(t *testing.T) {
	ctx := context.Background()
	f := newSimFixture(t)
	dst := configured(t, f.dst.stateDir, Config{})
	d := f.newDisk(t, "bad", 4<<20, 8)

	small, err := f.dst.x.VDICreate(ctx, xapi.VDICreateSpec{NameLabel: "small", SR: f.dst.srRef, VirtualSize: d.size - blockSize})
	require.NoError(t, err)
	smallRec, err := f.dst.x.VDIGetRecord(ctx, small)
	require.NoError(t, err)

	tests := []struct {
		name string
		mod  func(r *contract.PrepareReceiverRequest)
		want error
	}{
		{"replica smaller than the disk", func(r *contract.PrepareReceiverRequest) { r.ReplicaVDIUUID = smallRec.UUID }, contract.ErrFailedPrecondition},
		{"replica does not exist", func(r *contract.PrepareReceiverRequest) { r.ReplicaVDIUUID = "00000000-0000-0000-0000-000000000000" }, contract.ErrNotFound},
		{"SR lacks space", func(r *contract.PrepareReceiverRequest) {
			r.ReplicaVDIUUID, r.Disk.VirtualSize = "", 4<<40 // the simulated SR has 1 TiB
		}, contract.ErrFailedPrecondition},
		{"no xapi access", func(r *contract.PrepareReceiverRequest) { r.XAPI = contract.XAPIAccess{} }, contract.ErrInvalidArgument},
		{"stale session", func(r *contract.PrepareReceiverRequest) { r.XAPI.Session = "OpaqueRef:gone" }, contract.ErrPermissionDenied},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			req := d.receiverRequest("")
			req.MigrationID = "bad-" + string(rune('a'+i))
			tc.mod(&req)
			_, err := dst.PrepareReceiver(ctx, req)
			require.ErrorIs(t, err, tc.want)
			t.Log(err)
		})
	}
	vbds, err := f.dst.x.VBDGetAllRecords(ctx)
	require.NoError(t, err)
	assert.Empty(t, vbds, "failed prepares leave no dom0 VBD behind")

	// Without a named replica the backend creates one, and DeleteReplica removes it.
	req := d.receiverRequest("")
	req.MigrationID, req.ReplicaVDIUUID = "create", ""
	resp, err := dst.PrepareReceiver(ctx, req)
	require.NoError(t, err)
	rec, err := f.dst.x.VDIGetRecord(ctx, xapi.VDIRef(resp.ReplicaVDIRef))
	require.NoError(t, err)
	assert.Equal(t, d.size, rec.VirtualSize)
	assert.Equal(t, "create", rec.OtherConfig["wanmotion:migration_id"])
	_, err = dst.Cleanup(ctx, contract.CleanupRequest{Handle: resp.Handle, DeleteReplica: true})
	require.NoError(t, err)
	_, err = f.dst.x.VDIGetRecord(ctx, xapi.VDIRef(resp.ReplicaVDIRef))
	assert.True(t, xapi.IsCode(err, "HANDLE_INVALID"), "the created replica is destroyed: %v", err)
	vbds, err = f.dst.x.VBDGetAllRecords(ctx)
	require.NoError(t, err)
	assert.Empty(t, vbds, "cleanup detached the replica")
}

// fileBytes reads a VDI's backing file.
func fileBytes(t *testing.T, f *simFixture, uuid string) []byte {
	t.Helper()
	p, err := f.sim.VDIPath(uuid)
	require.NoError(t, err)
	b, err := os.ReadFile(p)
	require.NoError(t, err)
	return b
}

func TestSenderBadPeersAndSnapshots(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f := newSimFixture(t)
	src, dst := configured(t, f.src.stateDir, Config{ReconnectTimeoutSec: 2}), configured(t, f.dst.stateDir, Config{})
	d := f.newDisk(t, "peers", 4<<20, 16)
	recv, err := dst.PrepareReceiver(ctx, d.receiverRequest(""))
	require.NoError(t, err)
	req := d.snapshot(t, 0)
	before := fileBytes(t, f, d.vdiUUID)

	// A peer speaking another protocol.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer func() { _ = ln.Close() }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"))
			_ = c.Close()
		}
	}()
	// A port where nobody listens.
	dead, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	deadAddr := dead.Addr().String()
	require.NoError(t, dead.Close())

	tests := []struct {
		name string
		peer func(e contract.Endpoint) contract.Endpoint
		want error
	}{
		{"wrong protocol", func(e contract.Endpoint) contract.Endpoint { e.Address = ln.Addr().String(); return e }, contract.ErrFailedPrecondition},
		{"wrong token", func(e contract.Endpoint) contract.Endpoint { e.Token = "not-the-token"; return e }, contract.ErrPermissionDenied},
		{"unreachable", func(e contract.Endpoint) contract.Endpoint { e.Address = deadAddr; return e }, contract.ErrUnavailable},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sreq := d.senderRequest(recv, nil)
			sreq.MigrationID = "peer-" + string(rune('a'+i))
			sreq.Peer = tc.peer(recv.Endpoint)
			send, err := src.PrepareSender(ctx, sreq)
			require.NoError(t, err)
			r := req
			r.Handle = send.Handle.ID
			_, err = src.SyncRound(ctx, r)
			require.ErrorIs(t, err, tc.want)
			assert.NotContains(t, err.Error(), string(sreq.Peer.Token), "the token is never printed")
			t.Log(err)
		})
	}

	// The peer announces another protocol version.
	sreq := d.senderRequest(recv, nil)
	sreq.MigrationID = "proto"
	sreq.Peer.Params, err = contract.EncodeOpaque(EndpointParams{Protocol: "something-else/9"})
	require.NoError(t, err)
	_, err = src.PrepareSender(ctx, sreq)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)

	// The snapshot is deleted under us.
	send, err := src.PrepareSender(ctx, d.senderRequest(recv, nil))
	require.NoError(t, err)
	require.NoError(t, f.src.x.VDIDestroy(ctx, xapi.VDIRef(req.Snapshot.Ref)))
	r := req
	r.Handle = send.Handle.ID
	_, err = src.SyncRound(ctx, r)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "no longer exists")
	r.Snapshot.Ref = "" // by uuid only
	_, err = src.SyncRound(ctx, r)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)

	assert.True(t, bytes.Equal(before, fileBytes(t, f, d.vdiUUID)), "the source VDI is never modified")
}

// TestDom0Fallback reads the snapshot through a read-only dom0 attach when
// no network has an NBD purpose, and detaches it after the round.
func TestDom0Fallback(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f := newSimFixture(t)
	nets, err := f.src.x.NetworkGetAllRecords(ctx)
	require.NoError(t, err)
	for ref, n := range nets {
		for _, p := range n.Purpose {
			_, err := f.src.x.Call(ctx, "network.remove_purpose", string(ref), string(p))
			require.NoError(t, err)
		}
	}
	src, dst := configured(t, f.src.stateDir, Config{}), configured(t, f.dst.stateDir, Config{})
	d := f.newDisk(t, "dom0", 8<<20, 40)
	recv, err := dst.PrepareReceiver(ctx, d.receiverRequest(""))
	require.NoError(t, err)
	send, err := src.PrepareSender(ctx, d.senderRequest(recv, nil))
	require.NoError(t, err)
	for k := 0; k < 2; k++ {
		req := d.snapshot(t, k)
		req.Handle = send.Handle.ID
		_, err := src.SyncRound(ctx, req)
		require.NoError(t, err)
		d.equal(t, k)
	}
	vbds, err := f.src.x.VBDGetAllRecords(ctx)
	require.NoError(t, err)
	assert.Empty(t, vbds, "the snapshot is detached from dom0 after each round")

	// With source_access "nbd" and no NBD network, the round fails clearly.
	strict := configured(t, t.TempDir(), Config{SourceAccess: "nbd"})
	sreq := d.senderRequest(recv, nil)
	sreq.MigrationID = "strict"
	s2, err := strict.PrepareSender(ctx, sreq)
	require.NoError(t, err)
	req := d.snapshot(t, 1)
	req.Handle = s2.Handle.ID
	req.Full, req.ChangedBlocks = true, nil
	_, err = strict.SyncRound(ctx, req)
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
}

func TestPlanSparseAndIncremental(t *testing.T) {
	const size = 40 * blockSize
	src := &fakeSource{size: size, exts: []fakeExt{{0, 3 * blockSize, false}, {3 * blockSize, 10*blockSize + 4096, true},
		{13*blockSize + 4096, 2 * blockSize, false}, {15*blockSize + 4096, size - 15*blockSize - 4096, true}}}
	jobs, toCopy, skipped, err := plan(context.Background(), src, size, contract.SyncRoundRequest{Full: true}, 2*blockSize, nil)
	require.NoError(t, err)
	assert.Zero(t, skipped)
	assert.Equal(t, int64(3*blockSize+3*blockSize), toCopy, "data rounded out to 64 KiB blocks")
	assert.Equal(t, []job{{0, 2 * blockSize, false}, {2 * blockSize, blockSize, false}, {3 * blockSize, 10 * blockSize, true},
		{13 * blockSize, 2 * blockSize, false}, {15 * blockSize, blockSize, false}, {16 * blockSize, size - 16*blockSize, true}}, jobs)

	bitmap := []byte{0b1100_0000, 0, 0b0000_0001, 0, 0b1000_0000}
	applied := &journalRecord{Applied: make([]byte, 5), BlockSize: blockSize}
	applied.Applied[0] = 0b0100_0000
	jobs, toCopy, skipped, err = plan(context.Background(), src, size, contract.SyncRoundRequest{ChangedBlocks: bitmap, BlockSize: blockSize}, 4*blockSize, applied)
	require.NoError(t, err)
	assert.Equal(t, int64(4*blockSize), toCopy)
	assert.Equal(t, int64(blockSize), skipped, "a block the journal holds is not sent again")
	assert.Equal(t, []job{{0, blockSize, false}, {23 * blockSize, blockSize, false}, {32 * blockSize, blockSize, false}}, jobs)
}

func TestSplitRuns(t *testing.T) {
	buf := make([]byte, 4*blockSize+100)
	buf[blockSize+5] = 1
	buf[2*blockSize] = 1
	buf[4*blockSize+99] = 1
	runs := splitRuns(buf, 1<<20)
	require.Len(t, runs, 4)
	assert.Equal(t, run{off: 1 << 20, n: blockSize}, runs[0])
	assert.Equal(t, int64(1<<20+blockSize), runs[1].off)
	assert.Equal(t, int64(2*blockSize), runs[1].n)
	assert.Len(t, runs[1].data, 2*blockSize)
	assert.Nil(t, runs[2].data)
	assert.Equal(t, int64(100), runs[3].n)
}

type fakeExt struct {
	off, n int64
	zero   bool
}

type fakeSource struct {
	size int64
	exts []fakeExt
}

func (s *fakeSource) Size() int64                                 { return s.size }
func (s *fakeSource) Kind() string                                { return "fake" }
func (s *fakeSource) Close() error                                { return nil }
func (s *fakeSource) ReadAt(context.Context, []byte, int64) error { return nil }
func (s *fakeSource) Extents(_ context.Context, off, n int64) ([]nbdExtent, error) {
	var out []nbdExtent
	for _, e := range s.exts {
		if e.off+e.n <= off || e.off >= off+n {
			continue
		}
		x := nbdExtent{Offset: max(off, e.off), Length: min(off+n, e.off+e.n) - max(off, e.off)}
		if e.zero {
			x.Flags = nbdHoleZero
		}
		out = append(out, x)
	}
	return out, nil
}

// TestInsecureNBD reads xapi's NBD export in clear only when allowed.
func TestInsecureNBD(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f := newSimFixture(t)
	nets, err := f.src.x.NetworkGetAllRecords(ctx)
	require.NoError(t, err)
	for ref, n := range nets {
		for _, p := range n.Purpose {
			_, err := f.src.x.Call(ctx, "network.remove_purpose", string(ref), string(p))
			require.NoError(t, err)
			_, err = f.src.x.Call(ctx, "network.add_purpose", string(ref), "insecure_nbd")
			require.NoError(t, err)
		}
	}
	dst := configured(t, f.dst.stateDir, Config{})
	d := f.newDisk(t, "insecure", 4<<20, 16)
	recv, err := dst.PrepareReceiver(ctx, d.receiverRequest(""))
	require.NoError(t, err)
	for _, allow := range []bool{false, true} {
		src := configured(t, t.TempDir(), Config{SourceAccess: "nbd", AllowInsecureNBD: allow})
		send, err := src.PrepareSender(ctx, d.senderRequest(recv, nil))
		require.NoError(t, err)
		req := d.snapshot(t, 0)
		req.Handle = send.Handle.ID
		_, err = src.SyncRound(ctx, req)
		if !allow {
			require.ErrorIs(t, err, contract.ErrFailedPrecondition, "no clear-text NBD unless allowed")
			t.Log(err)
			continue
		}
		require.NoError(t, err)
		d.equal(t, 0)
	}
}
