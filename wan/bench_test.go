package wan

import (
	"context"
	"crypto/rand"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/wanmotion/wanmotion/wan/wanemu"
)

// compressibleCorpus concatenates real source files from GOROOT (text that
// compresses roughly like a filesystem of code and documents).
func compressibleCorpus(b *testing.B, n int) []byte {
	b.Helper()
	out := make([]byte, 0, n)
	root := filepath.Join(runtime.GOROOT(), "src")
	_ = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || len(out) >= n {
			return fs.SkipAll
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") {
			return nil
		}
		data, err := os.ReadFile(p)
		if err == nil {
			out = append(out, data...)
		}
		return nil
	})
	if len(out) < n {
		b.Fatalf("corpus: only %d bytes of Go source under %s", len(out), root)
	}
	return out[:n]
}

func cpuSeconds() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
}

// BenchmarkThroughput moves a block image through a session over an
// emulated WAN link (wanemu, 4 MiB per-connection window) with 1 stream and
// with the automatic stream count, for compressible and incompressible data.
func BenchmarkThroughput(b *testing.B) {
	links := []struct {
		name string
		rtt  time.Duration
		bps  int64
		size int
	}{
		{"100Mbit_50ms", 50 * time.Millisecond, 100e6, 48 << 20},
		{"1Gbit_100ms", 100 * time.Millisecond, 1e9, 192 << 20},
		// No emulator: the gateway's own ceiling and CPU cost on loopback.
		{"loopback_direct", 0, 0, 192 << 20},
	}
	const chunk = 1 << 20
	corpus := map[string][]byte{}
	for _, lk := range links {
		for _, kind := range []string{"compressible", "incompressible"} {
			for _, streams := range []int{1, 0} {
				name := fmt.Sprintf("%s/%s/streams=%s", lk.name, kind, map[bool]string{true: "1", false: "auto"}[streams == 1])
				b.Run(name, func(b *testing.B) {
					data := corpus[kind]
					if data == nil {
						if kind == "compressible" {
							data = compressibleCorpus(b, 32<<20)
						} else {
							data = make([]byte, 32<<20)
							_, _ = rand.Read(data)
						}
						corpus[kind] = data
					}
					benchOne(b, lk.rtt, lk.bps, lk.size, streams, data, chunk)
				})
			}
		}
	}
}

func benchOne(b *testing.B, rtt time.Duration, bps int64, size, streams int, data []byte, chunk int) {
	pk := newPKI(b)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	srv := Config{CertPEM: pk.server.CertPEM, KeyPEM: pk.server.KeyPEM, CAPEM: pk.ca.CertPEM}
	cli := Config{CertPEM: pk.client.CertPEM, KeyPEM: pk.client.KeyPEM, CAPEM: pk.ca.CertPEM, Streams: streams, Bandwidth: bps / 8, ChannelWindow: benchWindow()}
	l, err := Listen(ctx, "127.0.0.1:0", srv)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	addr := l.Addr().String()
	var link *wanemu.Link
	if bps > 0 {
		link, err = wanemu.NewLink(ctx, wanemu.LinkConfig{Upstream: addr, RTT: rtt, Bandwidth: bps})
		if err != nil {
			b.Fatal(err)
		}
		defer link.Close()
		addr = link.Addr()
	} else if streams == 0 {
		cli.Streams = 4
	}
	src, err := Dial(ctx, addr, cli)
	if err != nil {
		b.Fatal(err)
	}
	defer src.Close()
	dst, err := l.Accept(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer dst.Close()
	// Let the background streams join before timing.
	time.Sleep(2 * rtt)

	b.SetBytes(int64(size))
	b.ResetTimer()
	var elapsed time.Duration
	var cpu float64
	var wire int64
	for i := 0; i < b.N; i++ {
		name := fmt.Sprintf("img%d", i)
		sink, err := dst.AcceptBlockChannel(ctx, name, func(context.Context, Block) error { return nil })
		if err != nil {
			b.Fatal(err)
		}
		w0, c0, t0 := wireBytes(src, link), cpuSeconds(), time.Now()
		bs, err := src.OpenBlockChannel(ctx, name, nil)
		if err != nil {
			b.Fatal(err)
		}
		for off := 0; off < size; off += chunk {
			p := (off % len(data))
			if err := bs.Write(ctx, int64(off), data[p:p+chunk]); err != nil {
				b.Fatal(err)
			}
		}
		if err := bs.Close(ctx); err != nil {
			b.Fatal(err)
		}
		if err := sink.Wait(ctx); err != nil {
			b.Fatal(err)
		}
		elapsed += time.Since(t0)
		cpu += cpuSeconds() - c0
		wire += wireBytes(src, link) - w0
	}
	b.StopTimer()
	sec := elapsed.Seconds()
	logical := float64(size) * float64(b.N)
	linkBytesPerSec := float64(bps) / 8
	b.ReportMetric(float64(len(src.Stats().Streams)), "streams")
	b.ReportMetric(logical*8/sec/1e6, "goodput_Mbit/s")
	b.ReportMetric(float64(wire)*8/sec/1e6, "wire_Mbit/s")
	if bps > 0 {
		b.ReportMetric(float64(wire)*8/sec/float64(bps), "link_util")
		b.ReportMetric(logical/linkBytesPerSec/sec, "efficiency")
	}
	b.ReportMetric(cpu/(logical/(1<<30)), "cpu_s/GiB")
	b.ReportMetric(logical/float64(wire), "wire_ratio")
}

// wireBytes counts what crossed the emulated link, or what the session wrote
// when there is no link.
func wireBytes(s *Session, link *wanemu.Link) int64 {
	if link != nil {
		return link.Counters().Upstream
	}
	return s.Stats().BytesOnWire
}

func benchWindow() int {
	if v := os.Getenv("WAN_BENCH_WINDOW_MIB"); v != "" {
		var n int
		fmt.Sscan(v, &n)
		return n << 20
	}
	return 0
}
