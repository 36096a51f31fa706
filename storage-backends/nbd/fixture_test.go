package nbdstore

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/conformance"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/sdk"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// TestMain runs the test binary as the real backend when started through a
// symlink named like the backend (go-plugin's helper-process pattern).
func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == "wanmotion-storage-"+Name {
		sdk.ServeStorage(New(sdk.Logger(Name)))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// poolSite is one simulated pool as the backend sees it.
type poolSite struct {
	x        *xapi.Client
	access   contract.XAPIAccess
	srUUID   string
	srRef    xapi.SRRef
	stateDir string
}

type simFixture struct {
	sim      *xapisim.Sim
	src, dst poolSite
	log      hclog.Logger
}

func startSim(t testing.TB) *xapisim.Sim {
	t.Helper()
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 2, HostsPerPool: 1, NoDemoVM: true,
		Logger: testutil.Logger(t).Named("sim")})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func newPoolSite(t testing.TB, info xapisim.PoolInfo) poolSite {
	t.Helper()
	ctx := context.Background()
	x, err := xapi.New(xapi.Config{URL: info.URL, Username: info.Username, Password: info.Password})
	require.NoError(t, err)
	require.NoError(t, x.Login(ctx))
	t.Cleanup(func() { _ = x.Close(context.Background()) })
	hosts, err := x.HostGetAll(ctx)
	require.NoError(t, err)
	hrec, err := x.HostGetRecord(ctx, hosts[0])
	require.NoError(t, err)
	srs, err := x.SRGetAllRecords(ctx)
	require.NoError(t, err)
	var site poolSite
	for ref, sr := range srs {
		if sr.ContentType != "iso" {
			site.srRef, site.srUUID = ref, sr.UUID
		}
	}
	require.NotEmpty(t, site.srUUID)
	site.x = x
	site.access = contract.XAPIAccess{URL: info.URL, Session: contract.Secret(x.Session()), HostUUID: hrec.UUID}
	site.stateDir = t.TempDir()
	return site
}

func newSimFixture(t testing.TB) *simFixture {
	t.Helper()
	s := startSim(t)
	info := s.Info()
	return &simFixture{sim: s, src: newPoolSite(t, info.Pools[0]), dst: newPoolSite(t, info.Pools[1]), log: testutil.Logger(t)}
}

// simDisk is one source VDI with its snapshots and the replica.
type simDisk struct {
	f        *simFixture
	name     string
	size     int64
	vdi      xapi.VDIRef
	vdiUUID  string
	replica  string // uuid
	mu       sync.Mutex
	snaps    map[int]contract.SnapshotRef
	bitmaps  map[int][]byte
	rng      *rand.Rand
	writes   int // random block writes per round
	verbatim bool
}

// newDisk creates the source VDI (filled with a mix of data, zero blocks
// and holes, CBT enabled) and an empty replica on the destination SR.
func (f *simFixture) newDisk(t *testing.T, name string, size int64, dataBlocks int) *simDisk {
	t.Helper()
	ctx := context.Background()
	ref, err := f.src.x.VDICreate(ctx, xapi.VDICreateSpec{NameLabel: name, SR: f.src.srRef, VirtualSize: size})
	require.NoError(t, err)
	rec, err := f.src.x.VDIGetRecord(ctx, ref)
	require.NoError(t, err)
	d := &simDisk{f: f, name: name, size: size, vdi: ref, vdiUUID: rec.UUID, snaps: map[int]contract.SnapshotRef{},
		bitmaps: map[int][]byte{}, rng: rand.New(rand.NewPCG(uint64(size), uint64(len(name)))), writes: 5}
	nblocks := size / blockSize
	block := make([]byte, blockSize)
	for i := 0; i < dataBlocks && int64(i) < nblocks; i++ {
		b := int64(i*3) % nblocks // spread out, leaving holes
		switch i % 5 {
		case 4:
			clear(block) // an allocated all-zero block
		default:
			for k := range block {
				block[k] = byte(d.rng.Uint32())
			}
		}
		require.NoError(t, f.sim.WriteVDI(d.vdiUUID, b*blockSize, block))
	}
	require.NoError(t, f.src.x.VDIEnableCBT(ctx, ref))
	rref, err := f.dst.x.VDICreate(ctx, xapi.VDICreateSpec{NameLabel: "replica of " + name, SR: f.dst.srRef, VirtualSize: size})
	require.NoError(t, err)
	rrec, err := f.dst.x.VDIGetRecord(ctx, rref)
	require.NoError(t, err)
	d.replica = rrec.UUID
	return d
}

// guestWrite writes n random blocks (some partial, some zero) to the source VDI.
func (d *simDisk) guestWrite(t *testing.T, n int) {
	t.Helper()
	nblocks := d.size / blockSize
	for c := 0; c < n; c++ {
		d.mu.Lock()
		i := d.rng.Int64N(nblocks)
		ln := 1 + d.rng.IntN(blockSize)
		buf := make([]byte, ln)
		if c%4 != 3 {
			for k := range buf {
				buf[k] = byte(d.rng.Uint32())
			}
		}
		off := i*blockSize + d.rng.Int64N(int64(blockSize-ln+1))
		d.mu.Unlock()
		require.NoError(t, d.f.sim.WriteVDI(d.vdiUUID, off, buf))
	}
}

// snapshot takes snapshot k (after guest writes for k>0) and its bitmap.
func (d *simDisk) snapshot(t *testing.T, k int) contract.SyncRoundRequest {
	t.Helper()
	ctx := context.Background()
	d.mu.Lock()
	s, ok := d.snaps[k]
	d.mu.Unlock()
	if !ok {
		if k > 0 {
			d.guestWrite(t, d.writes)
		}
		ref, err := d.f.src.x.VDISnapshot(ctx, d.vdi, nil)
		require.NoError(t, err)
		rec, err := d.f.src.x.VDIGetRecord(ctx, ref)
		require.NoError(t, err)
		s = contract.SnapshotRef{UUID: rec.UUID, Ref: string(ref), ContentID: rec.OtherConfig["content_id"]}
		var bitmap []byte
		if k > 0 {
			d.mu.Lock()
			prev, ok := d.snaps[k-1]
			d.mu.Unlock()
			require.True(t, ok, "snapshots are taken in order")
			cb, err := d.f.src.x.VDIChangedBlocks(ctx, xapi.VDIRef(prev.Ref), ref)
			require.NoError(t, err)
			bitmap = cb.Bytes()
		}
		d.mu.Lock()
		d.snaps[k], d.bitmaps[k] = s, bitmap
		d.mu.Unlock()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return contract.SyncRoundRequest{Round: k, Snapshot: s, Full: k == 0, ChangedBlocks: d.bitmaps[k], BlockSize: blockSize}
}

// equal fails unless the replica equals snapshot k byte for byte.
func (d *simDisk) equal(t *testing.T, k int) {
	t.Helper()
	d.mu.Lock()
	s := d.snaps[k]
	d.mu.Unlock()
	sp, err := d.f.sim.VDIPath(s.UUID)
	require.NoError(t, err)
	rp, err := d.f.sim.VDIPath(d.replica)
	require.NoError(t, err)
	want, err := os.ReadFile(sp)
	require.NoError(t, err)
	got, err := os.ReadFile(rp)
	require.NoError(t, err)
	require.Equal(t, len(want), len(got), "sizes")
	if !bytes.Equal(want, got) {
		for i := 0; i < len(want); i += blockSize {
			e := min(len(want), i+blockSize)
			if !bytes.Equal(want[i:e], got[i:e]) {
				t.Fatalf("replica differs from snapshot %d, first at block %d", k, i/blockSize)
			}
		}
	}
}

func (d *simDisk) receiverRequest(listen string) contract.PrepareReceiverRequest {
	return contract.PrepareReceiverRequest{MigrationID: "mig-" + d.name,
		Disk:       contract.DiskInfo{VDIUUID: d.vdiUUID, VDIRef: string(d.vdi), VirtualSize: d.size, SRUUID: d.f.src.srUUID, Name: d.name},
		DestSRUUID: d.f.dst.srUUID, ReplicaVDIUUID: d.replica, Listen: listen, XAPI: d.f.dst.access}
}

func (d *simDisk) senderRequest(recv contract.PrepareReceiverResponse, opts []byte) contract.PrepareSenderRequest {
	return contract.PrepareSenderRequest{MigrationID: "mig-" + d.name,
		Disk: contract.DiskInfo{VDIUUID: d.vdiUUID, VDIRef: string(d.vdi), VirtualSize: d.size, SRUUID: d.f.src.srUUID, Name: d.name},
		Peer: recv.Endpoint, XAPI: d.f.src.access, Options: opts}
}

func (d *simDisk) conformance(opts []byte) *conformance.Disk {
	return &conformance.Disk{
		Receiver: d.receiverRequest(""),
		Sender: func(recv contract.PrepareReceiverResponse) contract.PrepareSenderRequest {
			return d.senderRequest(recv, opts)
		},
		Round:  func(t *testing.T, k int) contract.SyncRoundRequest { return d.snapshot(t, k) },
		Verify: func(t *testing.T, k int) { d.equal(t, k) },
	}
}

func (f *simFixture) setup(src, dst contract.Storage, restart func(t *testing.T) (contract.Storage, contract.Storage)) conformance.StorageSetup {
	return conformance.StorageSetup{
		Source: src, Destination: dst,
		NewDisk: func(t *testing.T, i int) *conformance.Disk {
			return f.newDisk(t, fmt.Sprintf("d%d", i), 4<<20, 24).conformance(nil)
		},
		NewSlowDisk: func(t *testing.T, i int) *conformance.Disk {
			opts, err := contract.EncodeOpaque(Options{RateLimit: 3 << 20})
			require.NoError(t, err)
			return f.newDisk(t, fmt.Sprintf("slow%d", i), 16<<20, 100).conformance(opts) // ~2 s per full round
		},
		Restart: restart,
	}
}

func configured(t *testing.T, stateDir string, cfg Config) *Backend {
	t.Helper()
	b := New(testutil.Logger(t))
	raw, err := contract.EncodeOpaque(cfg)
	require.NoError(t, err)
	_, err = b.Configure(context.Background(), contract.ConfigureRequest{APIVersion: contract.APIVersion, Config: raw, StateDir: stateDir})
	require.NoError(t, err)
	t.Cleanup(b.shutdown)
	return b
}

// shutdown stops every round and receiver without deleting anything, as a
// process exit would.
func (b *Backend) shutdown() {
	b.mu.Lock()
	hs := make([]*handle, 0, len(b.handles))
	for _, h := range b.handles {
		hs = append(hs, h)
	}
	b.handles = map[string]*handle{}
	b.mu.Unlock()
	for _, h := range hs {
		h.mu.Lock()
		if h.cancel != nil {
			h.cancel()
		}
		r := h.recv
		h.mu.Unlock()
		for {
			h.mu.Lock()
			running := h.running
			h.mu.Unlock()
			if !running {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		if r != nil {
			r.stop()
		}
		h.mu.Lock()
		closeXAPI(h.x)
		h.x = nil
		h.mu.Unlock()
	}
}
