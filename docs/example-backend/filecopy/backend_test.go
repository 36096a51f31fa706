package main

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

	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/conformance"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

// TestMain runs the test binary as the real backend when it is started
// through a symlink named like the backend (go-plugin's helper-process
// pattern; no build step).
func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == "wanmotion-storage-filecopy" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

const blockSize = contract.DefaultBlockSize

// site is one side's directories.
type site struct {
	stateDir string
	config   []byte
}

type fixture struct {
	srcDir   string
	src, dst site
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{srcDir: t.TempDir()}
	cfg, err := contract.EncodeOpaque(Config{SourceDir: f.srcDir})
	require.NoError(t, err)
	f.src = site{stateDir: t.TempDir(), config: cfg}
	f.dst = site{stateDir: t.TempDir(), config: cfg}
	return f
}

// disk builds a conformance disk: snapshots are files in srcDir, the
// replica is a file in the destination state dir.
func (f *fixture) disk(t *testing.T, name string, size int64, rateLimit int64) *conformance.Disk {
	t.Helper()
	var opts []byte
	if rateLimit > 0 {
		var err error
		opts, err = contract.EncodeOpaque(Options{RateLimit: rateLimit})
		require.NoError(t, err)
	}
	migration := "mig-" + name
	vdi := "vdi-" + name
	replica := "replica-" + name
	d := contract.DiskInfo{VDIUUID: vdi, VirtualSize: size, Name: name}
	var mu sync.Mutex
	snaps := map[int][]byte{}
	bitmaps := map[int][]byte{}
	rng := rand.New(rand.NewPCG(uint64(size), 7))
	snapshot := func(t *testing.T, k int) {
		mu.Lock()
		defer mu.Unlock()
		if _, ok := snaps[k]; ok {
			return
		}
		nblocks := (size + blockSize - 1) / blockSize
		var data []byte
		bitmap := make([]byte, (nblocks+7)/8)
		if k == 0 {
			data = make([]byte, size)
			for i := int64(0); i < nblocks; i++ {
				if i%3 == 1 {
					continue // leave some blocks zero (sparse)
				}
				end := min(size, (i+1)*blockSize)
				for j := i * blockSize; j < end; j++ {
					data[j] = byte(rng.Uint32())
				}
			}
		} else {
			require.Contains(t, snaps, k-1, "snapshots are taken in order")
			data = bytes.Clone(snaps[k-1])
			for c := 0; c < 3; c++ {
				i := rng.Int64N(nblocks)
				bitmap[i/8] |= 0x80 >> (i % 8)
				off := i*blockSize + rng.Int64N(min(blockSize, size-i*blockSize))
				data[off] ^= 0xff
			}
		}
		require.NoError(t, os.WriteFile(filepath.Join(f.srcDir, fmt.Sprintf("%s-snap%d.img", vdi, k)), data, 0o600))
		snaps[k], bitmaps[k] = data, bitmap
	}
	return &conformance.Disk{
		Receiver: contract.PrepareReceiverRequest{MigrationID: migration, Disk: d, DestSRUUID: "sr-dst", ReplicaVDIUUID: replica},
		Sender: func(recv contract.PrepareReceiverResponse) contract.PrepareSenderRequest {
			return contract.PrepareSenderRequest{MigrationID: migration, Disk: d, Peer: recv.Endpoint, Options: opts}
		},
		Round: func(t *testing.T, k int) contract.SyncRoundRequest {
			snapshot(t, k)
			mu.Lock()
			defer mu.Unlock()
			return contract.SyncRoundRequest{Round: k, Snapshot: contract.SnapshotRef{UUID: fmt.Sprintf("%s-snap%d", vdi, k)},
				Full: k == 0, ChangedBlocks: bitmaps[k], BlockSize: blockSize}
		},
		Verify: func(t *testing.T, k int) {
			got, err := os.ReadFile(filepath.Join(f.dst.stateDir, "replica-"+replica+".img"))
			require.NoError(t, err)
			mu.Lock()
			want := snaps[k]
			mu.Unlock()
			require.True(t, bytes.Equal(want, got), "replica differs from snapshot %d", k)
		},
	}
}

func (f *fixture) setup(src, dst contract.Storage, restart func(t *testing.T) (contract.Storage, contract.Storage)) conformance.StorageSetup {
	return conformance.StorageSetup{
		Source: src, Destination: dst,
		NewDisk: func(t *testing.T, i int) *conformance.Disk {
			return f.disk(t, fmt.Sprintf("d%d", i), 1<<20+1000, 0)
		},
		NewSlowDisk: func(t *testing.T, i int) *conformance.Disk {
			return f.disk(t, fmt.Sprintf("slow%d", i), 4<<20, 2<<20) // about 2 s per full round
		},
		Restart: restart,
	}
}

func configured(t *testing.T, s site) *Backend {
	t.Helper()
	b := New(testutil.Logger(t))
	_, err := b.Configure(context.Background(), contract.ConfigureRequest{APIVersion: contract.APIVersion, Config: s.config, StateDir: s.stateDir})
	require.NoError(t, err)
	t.Cleanup(b.close)
	return b
}

// close stops every receiver without deleting anything, as a process exit would.
func (b *Backend) close() {
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
		h.mu.Unlock()
		h.stopReceiving()
	}
}

func TestConformanceInProcessRPC(t *testing.T) {
	conformance.RunStorageSuite(t, func(t *testing.T) conformance.StorageSetup {
		f := newFixture(t)
		src, dst := configured(t, f.src), configured(t, f.dst)
		return f.setup(conformance.StorageOverRPC(t, src), conformance.StorageOverRPC(t, dst),
			func(t *testing.T) (contract.Storage, contract.Storage) {
				src.close()
				dst.close()
				return conformance.StorageOverRPC(t, configured(t, f.src)), conformance.StorageOverRPC(t, configured(t, f.dst))
			})
	})
}

func TestConformanceSubprocess(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.Symlink(exe, filepath.Join(dir, "wanmotion-storage-filecopy")))
	h := host.New([]string{dir}, host.Options{Logger: testutil.Logger(t), StartTimeout: 30 * time.Second,
		Env: []string{"GORACE=atexit_sleep_ms=0"}}) // a -race child otherwise lingers 1 s at exit
	launch := func(t *testing.T, s site) *host.Instance {
		inst, err := h.LaunchStorage(context.Background(), "filecopy", s.config, s.stateDir)
		require.NoError(t, err)
		t.Cleanup(inst.Close)
		require.Equal(t, contract.APIVersion, inst.APIVersion)
		return inst
	}
	conformance.RunStorageSuite(t, func(t *testing.T) conformance.StorageSetup {
		f := newFixture(t)
		src, dst := launch(t, f.src), launch(t, f.dst)
		return f.setup(src.Storage(), dst.Storage(), func(t *testing.T) (contract.Storage, contract.Storage) {
			src.Close()
			dst.Close()
			return launch(t, f.src).Storage(), launch(t, f.dst).Storage()
		})
	})
}

func TestChangedBlocks(t *testing.T) {
	req := contract.SyncRoundRequest{ChangedBlocks: []byte{0b1000_0001, 0b0100_0000}}
	require.Equal(t, []int64{0, 7, 9}, changed(req, 16*blockSize, blockSize))
	require.Equal(t, []int64{0}, changed(req, blockSize/2, blockSize), "blocks past the end are ignored")
	req.Full = true
	require.Equal(t, []int64{0, 1, 2}, changed(req, 2*blockSize+1, blockSize))
}
