package nbdstore

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/nbd"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
	"github.com/wanmotion/wanmotion/wan/wanemu"
	"github.com/wanmotion/wanmotion/xapi"
)

type benchImage struct {
	name string
	path string
	size int64
}

// makeBenchImages builds, in dir, an ext4 image about half full of real
// files (mke2fs -d /usr/bin, no mount) and an incompressible (random) one.
func makeBenchImages(benchDir string) (benchImages []benchImage, benchErr error) {
	ext4 := filepath.Join(benchDir, "ext4.img")
	out, err := exec.Command("mke2fs", "-q", "-F", "-t", "ext4", "-d", "/usr/bin", ext4, "512M").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("mke2fs: %v: %s", err, out)
	}
	rnd := filepath.Join(benchDir, "random.img")
	f, err := os.Create(rnd)
	if err != nil {
		return nil, err
	}
	_, err = io.CopyN(f, rand.Reader, 256<<20)
	_ = f.Close()
	if err != nil {
		return nil, err
	}
	for _, im := range []benchImage{{name: "ext4-50pct", path: ext4}, {name: "random", path: rnd}} {
		st, err := os.Stat(im.path)
		if err != nil {
			return nil, err
		}
		im.size = st.Size()
		benchImages = append(benchImages, im)
	}
	return benchImages, nil
}

// allocated returns the bytes of path that are not holes.
func allocated(t testing.TB, path string) int64 {
	be, err := nbd.OpenFile(path, true)
	require.NoError(t, err)
	defer func() { _ = be.Close() }()
	size, _ := be.Size()
	var n int64
	for pos := int64(0); pos < size; {
		exts, err := be.Extents(pos, size-pos)
		require.NoError(t, err)
		for _, e := range exts {
			if e.Flags&nbd.ExtentHole == 0 {
				n += e.Length
			}
			pos = e.Offset + e.Length
		}
	}
	return n
}

// nbdTarget is a writable NBD server on a fresh sparse file (the peers'
// destination, same server code as our receiver).
func nbdTarget(b *testing.B, size int64) (addr string, path string) {
	path = filepath.Join(b.TempDir(), "target.img")
	f, err := os.Create(path)
	require.NoError(b, err)
	require.NoError(b, f.Truncate(size))
	require.NoError(b, f.Close())
	be, err := nbd.OpenFile(path, false)
	require.NoError(b, err)
	exports, list := nbd.StaticExports(&nbd.Export{Name: "", Backend: be, MultiConn: true})
	srv, err := nbd.NewServer(nbd.ServerOptions{Exports: exports, List: list, MaxInFlight: 64, MaxBufferBytes: 128 << 20})
	require.NoError(b, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(ctx, ln) }()
	b.Cleanup(func() { cancel(); <-done; _ = be.Close() })
	return ln.Addr().String(), path
}

type benchLink struct {
	name string
	bps  int64
	rtt  time.Duration
}

// BenchmarkRound0WAN compares our round 0 (xapi NBD export of the
// simulator → our sender → emulated link → our receiver) with nbdcopy,
// qemu-img convert and a one-request-at-a-time copy into an NBD target
// behind the same emulated link. Run with -benchtime 1x.
func BenchmarkRound0WAN(b *testing.B) {
	testutil.RequireTool(b, "mke2fs", "e2fsprogs")
	benchImages, err := makeBenchImages(b.TempDir())
	require.NoError(b, err)
	nbdcopy, nbdcopyErr := exec.LookPath("nbdcopy")
	qemuImg, qemuErr := exec.LookPath("qemu-img")
	f := newSimFixture(b)
	links := []benchLink{{"100Mbit-50ms", 100e6, 50 * time.Millisecond}, {"1Gbit-100ms", 1e9, 100 * time.Millisecond},
		{"unlimited-0ms", 0, 0}}
	for _, im := range benchImages {
		data := allocated(b, im.path)
		// Put the image into a source VDI and snapshot it.
		ctx := context.Background()
		vref, err := f.src.x.VDICreate(ctx, xapi.VDICreateSpec{NameLabel: im.name, SR: f.src.srRef, VirtualSize: im.size})
		require.NoError(b, err)
		vrec, err := f.src.x.VDIGetRecord(ctx, vref)
		require.NoError(b, err)
		vpath, err := f.sim.VDIPath(vrec.UUID)
		require.NoError(b, err)
		require.NoError(b, exec.Command("cp", "--sparse=always", im.path, vpath).Run())
		sref, err := f.src.x.VDISnapshot(ctx, vref, nil)
		require.NoError(b, err)
		srec, err := f.src.x.VDIGetRecord(ctx, sref)
		require.NoError(b, err)
		spath, err := f.sim.VDIPath(srec.UUID)
		require.NoError(b, err)
		snap := contract.SnapshotRef{UUID: srec.UUID, Ref: string(sref)}
		for _, l := range links {
			methods := []struct {
				name string
				run  func(b *testing.B, l benchLink) (wire int64)
			}{
				{"wanmotion-nbd", func(b *testing.B, l benchLink) int64 {
					cfg := Config{} // the shipped defaults
					if v, err := strconv.Atoi(os.Getenv("NBDSTORE_BENCH_CONNS")); err == nil {
						cfg.Connections = v
					}
					if v, err := strconv.Atoi(os.Getenv("NBDSTORE_BENCH_INFLIGHT")); err == nil {
						cfg.InFlight = v
					}
					if v := os.Getenv("NBDSTORE_BENCH_SOURCE"); v != "" {
						cfg.SourceAccess = v
					}
					if v, err := strconv.Atoi(os.Getenv("NBDSTORE_BENCH_CHECKPOINT")); err == nil {
						cfg.CheckpointBytes = int64(v)
					}
					if v, err := strconv.Atoi(os.Getenv("NBDSTORE_BENCH_CHUNK")); err == nil {
						cfg.ChunkSize = int64(v)
					}
					return benchOurs(b, f, vrec.UUID, im, snap, l, cfg, directLink)
				}},
				{"wanmotion-nbd-via-gateway", func(b *testing.B, l benchLink) int64 {
					if l.bps == 0 && os.Getenv("NBDSTORE_BENCH_GATEWAY_UNLIMITED") == "" {
						b.Skip("the gateway's own ceiling is in the WAN gateway section")
					}
					return benchOurs(b, f, vrec.UUID, im, snap, l, Config{}, viaGateway)
				}},
				{"one-request-at-a-time", func(b *testing.B, l benchLink) int64 {
					return benchOurs(b, f, vrec.UUID, im, snap, l, Config{Connections: 1, InFlight: 1}, directLink)
				}},
				{"nbdcopy", func(b *testing.B, l benchLink) int64 {
					if nbdcopyErr != nil {
						b.Skip("nbdcopy not installed")
					}
					return benchTool(b, im.size, l, func(addr string) *exec.Cmd {
						return exec.Command(nbdcopy, "--flush", spath, "nbd://"+addr)
					})
				}},
				{"qemu-img-convert", func(b *testing.B, l benchLink) int64 {
					if qemuErr != nil {
						b.Skip("qemu-img not installed")
					}
					return benchTool(b, im.size, l, func(addr string) *exec.Cmd {
						return exec.Command(qemuImg, "convert", "-n", "-W", "-m", "16", "-f", "raw", "-O", "raw", spath, "nbd://"+addr)
					})
				}},
			}
			for _, m := range methods {
				b.Run(im.name+"/"+l.name+"/"+m.name, func(b *testing.B) {
					for range b.N {
						start := time.Now()
						wire := m.run(b, l)
						secs := time.Since(start).Seconds()
						linkBytesPerSec := float64(l.bps) / 8
						if l.bps == 0 {
							linkBytesPerSec = 1e12
						}
						b.ReportMetric(secs, "seconds")
						b.ReportMetric(float64(wire)/1e6, "wire_MB")
						b.ReportMetric(float64(data)/1e6, "data_MB")
						b.ReportMetric(100*float64(data)/secs/linkBytesPerSec, "eff_%")
						b.Logf("| %s | %s | %s | %.1f | %.1f | %.1f | %.0f%% |", im.name, l.name, m.name, secs,
							float64(data)/1e6, float64(wire)/1e6, 100*float64(data)/secs/linkBytesPerSec)
					}
				})
			}
		}
	}
}

// transport carries the sender's connections to the receiver at upstream:
// it returns the address the sender dials and the bytes that crossed the
// emulated link.
type transport func(b *testing.B, upstream string, l benchLink) (addr string, wire func() int64)

// directLink puts the emulated link between sender and receiver.
func directLink(b *testing.B, upstream string, l benchLink) (string, func() int64) {
	link, err := wanemu.NewLink(context.Background(), wanemu.LinkConfig{Upstream: upstream, RTT: l.rtt, Bandwidth: l.bps})
	require.NoError(b, err)
	b.Cleanup(func() { _ = link.Close() })
	return link.Addr(), func() int64 { return link.Counters().Upstream }
}

// viaGateway carries the NBD connections through a WAN gateway session
// (TLS 1.3, zstd auto, its own streams) whose streams cross the link.
func viaGateway(b *testing.B, upstream string, l benchLink) (string, func() int64) {
	ctx, cancel := context.WithCancel(context.Background())
	ca, err := wan.NewCA("bench", time.Hour)
	require.NoError(b, err)
	srvCert, err := ca.IssueServer(time.Hour)
	require.NoError(b, err)
	cliCert, err := ca.IssueClient("source", time.Hour)
	require.NoError(b, err)
	gl, err := wan.Listen(ctx, "127.0.0.1:0", wan.Config{CertPEM: srvCert.CertPEM, KeyPEM: srvCert.KeyPEM, CAPEM: ca.CertPEM})
	require.NoError(b, err)
	link, err := wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: gl.Addr().String(), RTT: l.rtt, Bandwidth: l.bps})
	require.NoError(b, err)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sess, err := gl.Accept(ctx)
		if err != nil {
			return
		}
		defer func() { _ = sess.Close() }()
		_ = sess.ServeForwards(ctx, wan.AllowTargets(upstream))
	}()
	sess, err := wan.Dial(ctx, link.Addr(), wan.Config{CertPEM: cliCert.CertPEM, KeyPEM: cliCert.KeyPEM, CAPEM: ca.CertPEM,
		Bandwidth: l.bps / 8})
	require.NoError(b, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(b, err)
	wg.Add(1)
	go func() { defer wg.Done(); _ = sess.Forward(ctx, ln, upstream) }()
	b.Cleanup(func() {
		cancel()
		_ = sess.Close()
		_ = ln.Close()
		_ = gl.Close()
		wg.Wait()
		_ = link.Close()
	})
	return ln.Addr().String(), func() int64 { return link.Counters().Upstream }
}

// benchOurs runs round 0 of our backend through the link.
func benchOurs(b *testing.B, f *simFixture, vdiUUID string, im benchImage, snap contract.SnapshotRef, l benchLink, cfg Config, via transport) int64 {
	ctx := context.Background()
	log := hclog.NewNullLogger()
	src, dst := New(log), New(log)
	raw, err := contract.EncodeOpaque(cfg)
	require.NoError(b, err)
	for _, s := range []struct {
		b   *Backend
		dir string
	}{{src, b.TempDir()}, {dst, b.TempDir()}} {
		_, err := s.b.Configure(ctx, contract.ConfigureRequest{APIVersion: contract.APIVersion, Config: raw, StateDir: s.dir})
		require.NoError(b, err)
	}
	defer src.shutdown()
	defer dst.shutdown()
	mig := "bench-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	disk := contract.DiskInfo{VDIUUID: vdiUUID, VirtualSize: im.size, Name: im.name}
	recv, err := dst.PrepareReceiver(ctx, contract.PrepareReceiverRequest{MigrationID: mig, Disk: disk,
		DestSRUUID: f.dst.srUUID, XAPI: f.dst.access})
	require.NoError(b, err)
	defer func() {
		_, _ = dst.Cleanup(ctx, contract.CleanupRequest{Handle: recv.Handle, DeleteReplica: true})
	}()
	addr, wire := via(b, recv.Endpoint.Address, l)
	peer := recv.Endpoint
	peer.Address = addr
	send, err := src.PrepareSender(ctx, contract.PrepareSenderRequest{MigrationID: mig, Disk: disk, Peer: peer, XAPI: f.src.access})
	require.NoError(b, err)
	resp, err := src.SyncRound(ctx, contract.SyncRoundRequest{Handle: send.Handle.ID, Round: 0, Snapshot: snap, Full: true})
	require.NoError(b, err)
	require.Equal(b, resp.Stats.BytesToCopy, resp.Stats.BytesCopied)
	return wire()
}

// benchTool runs an external copy into an NBD target behind the link.
func benchTool(b *testing.B, size int64, l benchLink, cmd func(addr string) *exec.Cmd) int64 {
	ctx := context.Background()
	addr, _ := nbdTarget(b, size)
	link, err := wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: addr, RTT: l.rtt, Bandwidth: l.bps})
	require.NoError(b, err)
	defer func() { _ = link.Close() }()
	out, err := cmd(link.Addr()).CombinedOutput()
	require.NoError(b, err, "%s", out)
	return link.Counters().Upstream
}
