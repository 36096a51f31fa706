package nbd

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

const benchSize = 1 << 30

// benchImage writes a 1 GiB sparse image, about half allocated: in every
// 4 MiB group the first 2 MiB hold data (random in odd groups, repetitive
// text in even ones) and the rest is a hole.
func benchImage(b *testing.B, dir string) string {
	b.Helper()
	f, err := os.CreateTemp(dir, "bench-src-*.img")
	require.NoError(b, err)
	defer f.Close()
	require.NoError(b, f.Truncate(benchSize))
	random := randomData(2<<20, 11)
	text := make([]byte, 2<<20)
	line := []byte("wanmotion nbd benchmark: the quick brown fox jumps over the lazy dog 0123456789\n")
	for i := range text {
		text[i] = line[i%len(line)]
	}
	for g := int64(0); g < benchSize/(4<<20); g++ {
		blk := text
		if g%2 == 1 {
			random[0] = byte(g) // distinct blocks
			blk = random
		}
		_, err := f.WriteAt(blk, g*(4<<20))
		require.NoError(b, err)
	}
	require.NoError(b, f.Sync())
	return f.Name()
}

// BenchmarkCopy1GiB copies a 1 GiB, half-allocated sparse image from one
// export of our server to another over loopback TCP, with our client (Copy,
// 4 connections) and with nbdcopy (its defaults), in the same run, and
// reports the seconds of each and their ratio (both include connecting and
// the final flush; neither includes the byte-for-byte check that follows
// each copy). Set NBD_BENCH_DIR to place the images (default: a temporary
// directory), NBD_BENCH_CHUNK / NBD_BENCH_WORKERS to override CopyOptions.
func BenchmarkCopy1GiB(b *testing.B) {
	nbdcopy := testutil.RequireTool(b, "nbdcopy", "libnbd-bin")
	dir := os.Getenv("NBD_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	} else {
		var err error
		dir, err = os.MkdirTemp(dir, "nbd-bench-")
		require.NoError(b, err)
		b.Cleanup(func() { _ = os.RemoveAll(dir) })
	}
	src := benchImage(b, dir)
	dst := filepath.Join(dir, "bench-dst.img")
	require.NoError(b, os.WriteFile(dst, nil, 0o644))
	require.NoError(b, os.Truncate(dst, benchSize))
	srcB, err := OpenFile(src, true)
	require.NoError(b, err)
	defer srcB.Close()
	dstB, err := OpenFile(dst, false)
	require.NoError(b, err)
	defer dstB.Close()
	look, list := StaticExports(
		&Export{Name: "src", Backend: srcB, MultiConn: true},
		&Export{Name: "dst", Backend: dstB, MultiConn: true},
	)
	ts := startServer(b, ServerOptions{Exports: look, List: list, Logger: nullLogger()})
	ctx := context.Background()

	reset := func() {
		require.NoError(b, os.Truncate(dst, 0))
		require.NoError(b, os.Truncate(dst, benchSize))
	}
	ours := func() time.Duration {
		reset()
		start := time.Now()
		from, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "src"}, 4)
		require.NoError(b, err)
		to, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "dst"}, 4)
		require.NoError(b, err)
		_, err = Copy(ctx, to, from, CopyOptions{ChunkSize: benchChunk, Workers: benchWorkers})
		require.NoError(b, err)
		_ = from.Close()
		_ = to.Close()
		d := time.Since(start)
		requireSameFile(b, src, dst)
		return d
	}
	theirs := func() time.Duration {
		reset()
		start := time.Now()
		out, err := exec.Command(nbdcopy, "--flush",
			fmt.Sprintf("nbd://%s/src", ts.addr), fmt.Sprintf("nbd://%s/dst", ts.addr)).CombinedOutput()
		require.NoError(b, err, "%s", out)
		d := time.Since(start)
		requireSameFile(b, src, dst)
		return d
	}
	b.ResetTimer()
	var o, n time.Duration
	for i := 0; i < b.N; i++ { // alternate the order to spread cache effects
		if i%2 == 0 {
			o += ours()
			n += theirs()
		} else {
			n += theirs()
			o += ours()
		}
	}
	b.StopTimer()
	oursS := o.Seconds() / float64(b.N)
	theirS := n.Seconds() / float64(b.N)
	b.ReportMetric(oursS, "ours_s")
	b.ReportMetric(theirS, "nbdcopy_s")
	b.ReportMetric(oursS/theirS, "ours/nbdcopy")
	b.ReportMetric(float64(benchSize)/(1<<20)/oursS, "ours_MiB/s")
}

var benchChunk, benchWorkers = envInt("NBD_BENCH_CHUNK", 0), envInt("NBD_BENCH_WORKERS", 0)

func envInt(name string, def int) int {
	var v int
	if _, err := fmt.Sscan(os.Getenv(name), &v); err != nil {
		return def
	}
	return v
}

// BenchmarkFileBackendWrite writes 512 MiB into a fresh 1 GiB sparse file
// in 4 MiB WriteAt calls, through FileBackend (which issues 256 KiB pwrites)
// and as plain 4 MiB pwrites, alternating, and reports the seconds of each
// and their ratio. Each write starts one second after the file was emptied,
// so the page cache is refilled from memory that was freed a while ago (the
// situation between two copies of BenchmarkCopy1GiB). NBD_BENCH_DIR places
// the file (default: a temporary directory).
func BenchmarkFileBackendWrite(b *testing.B) {
	dir := os.Getenv("NBD_BENCH_DIR")
	if dir == "" {
		dir = b.TempDir()
	}
	f, err := os.CreateTemp(dir, "bench-write-*.img")
	require.NoError(b, err)
	b.Cleanup(func() { _ = os.Remove(f.Name()) })
	defer f.Close()
	be, err := NewFileBackend(f, false)
	require.NoError(b, err)
	buf := randomData(4<<20, 5)
	const total = 512 << 20
	run := func(write func(p []byte, off int64) (int, error)) time.Duration {
		b.StopTimer()
		require.NoError(b, f.Truncate(0))
		require.NoError(b, f.Truncate(benchSize))
		time.Sleep(time.Second)
		b.StartTimer()
		start := time.Now()
		for off := int64(0); off < total; off += int64(len(buf)) {
			_, err := write(buf, off)
			require.NoError(b, err)
		}
		return time.Since(start)
	}
	var split, whole time.Duration
	for i := 0; i < b.N; i++ {
		if i%2 == 0 {
			split += run(be.WriteAt)
			whole += run(f.WriteAt)
		} else {
			whole += run(f.WriteAt)
			split += run(be.WriteAt)
		}
	}
	b.StopTimer()
	b.ReportMetric(split.Seconds()/float64(b.N), "backend_s")
	b.ReportMetric(whole.Seconds()/float64(b.N), "pwrite4MiB_s")
	b.ReportMetric(split.Seconds()/whole.Seconds(), "backend/pwrite4MiB")
}
