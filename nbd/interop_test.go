package nbd

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

// Interoperability with the reference implementations: libnbd's nbdinfo and
// nbdcopy, qemu-img, qemu-nbd and nbdkit.

const interopSize = 16 << 20

// interopLayout: 1 MiB data blocks at these offsets, holes elsewhere.
var interopLayout = []int64{0, 5 << 20, 6 << 20, 12 << 20}

// wantMap is the allocation map of interopLayout, adjacent runs merged.
func wantMap() []Extent {
	return []Extent{
		{0, 1 << 20, 0},
		{1 << 20, 4 << 20, ExtentHole | ExtentZero},
		{5 << 20, 2 << 20, 0},
		{7 << 20, 5 << 20, ExtentHole | ExtentZero},
		{12 << 20, 1 << 20, 0},
		{13 << 20, 3 << 20, ExtentHole | ExtentZero},
	}
}

func runTool(t *testing.T, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s:\n%s", name, strings.Join(args, " "), out)
	return string(out)
}

// startTool runs a server process until the test ends and waits until it
// accepts connections on network/addr.
func startTool(t *testing.T, network, addr string, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	require.NoError(t, cmd.Start())
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-waited
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	deadline := time.Now().Add(15 * time.Second)
	for {
		c, err := net.Dial(network, addr)
		if err == nil {
			_ = c.Close()
			return
		}
		select {
		case <-waited:
			t.Fatalf("%s exited early:\n%s", name, out.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s does not listen on %s: %v", name, addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// freePort returns a TCP port on 127.0.0.1 that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer ln.Close()
	return port(ln.Addr().String())
}

type interopServer struct {
	ts       *testServer
	src, dst string // backing files of exports "src" (read-only) and "dst"
	pki      *pki
}

func (s *interopServer) uri(export string) string {
	if s.pki != nil {
		return fmt.Sprintf("nbds://localhost:%s/%s?tls-certificates=%s", port(s.ts.addr), export, s.pki.dir)
	}
	return fmt.Sprintf("nbd://127.0.0.1:%s/%s", port(s.ts.addr), export)
}

// qemuImage returns qemu-img arguments naming export as an image.
func (s *interopServer) qemuImage(export string) []string {
	if s.pki == nil {
		return []string{fmt.Sprintf("nbd://127.0.0.1:%s/%s", port(s.ts.addr), export)}
	}
	return []string{fmt.Sprintf("driver=nbd,host=localhost,port=%s,export=%s,tls-creds=tls0", port(s.ts.addr), export)}
}

func (s *interopServer) qemuObject() []string {
	if s.pki == nil {
		return nil
	}
	return []string{"--object", "tls-creds-x509,id=tls0,dir=" + s.pki.dir + ",endpoint=client"}
}

func newInteropServer(t *testing.T, withTLS bool) *interopServer {
	dir := t.TempDir()
	s := &interopServer{
		src: sparseFile(t, dir, interopSize, 1<<20, interopLayout...),
		dst: emptyFile(t, dir, interopSize),
	}
	var tlsCfg *tls.Config
	if withTLS {
		s.pki = newPKI(t)
		tlsCfg = s.pki.serverTLS()
	}
	exps := []*Export{
		{Name: "src", Description: "sparse source", Backend: fileBackend(t, s.src, true), MultiConn: true},
		{Name: "dst", Backend: fileBackend(t, s.dst, false), MultiConn: true},
	}
	s.ts = startStatic(t, tlsCfg, withTLS, exps...)
	return s
}

func resetFile(t *testing.T, path string) {
	t.Helper()
	require.NoError(t, os.Truncate(path, 0))
	require.NoError(t, os.Truncate(path, interopSize))
}

func TestOurServerWithRealClients(t *testing.T) {
	testutil.RequireTool(t, "nbdinfo", "libnbd-bin")
	testutil.RequireTool(t, "nbdcopy", "libnbd-bin")
	testutil.RequireTool(t, "qemu-img", "qemu-utils")
	for _, withTLS := range []bool{false, true} {
		t.Run(fmt.Sprint("tls=", withTLS), func(t *testing.T) {
			s := newInteropServer(t, withTLS)
			out := t.TempDir()

			t.Run("nbdinfo size", func(t *testing.T) {
				var info struct {
					Exports []struct {
						Name string `json:"export-name"`
						Size int64  `json:"export-size"`
						RO   bool   `json:"is_read_only"`
					} `json:"exports"`
				}
				require.NoError(t, json.Unmarshal([]byte(runTool(t, "nbdinfo", "--json", s.uri("src"))), &info))
				require.Len(t, info.Exports, 1)
				assert.Equal(t, int64(interopSize), info.Exports[0].Size)
				assert.True(t, info.Exports[0].RO)
				assert.Equal(t, fmt.Sprint(interopSize), strings.TrimSpace(runTool(t, "nbdinfo", "--size", s.uri("dst"))))
			})
			t.Run("nbdinfo map", func(t *testing.T) {
				assert.Equal(t, wantMap(), parseNbdinfoMap(t, runTool(t, "nbdinfo", "--map", s.uri("src"))))
			})
			t.Run("nbdinfo list", func(t *testing.T) {
				l := runTool(t, "nbdinfo", "--list", "--json", s.uri(""))
				assert.Contains(t, l, `"export-name": "src"`)
				assert.Contains(t, l, `"export-name": "dst"`)
			})
			t.Run("nbdcopy from our server", func(t *testing.T) {
				f := filepath.Join(out, "nbdcopy-out.img")
				runTool(t, "nbdcopy", s.uri("src"), f)
				requireSameFile(t, s.src, f)
			})
			t.Run("nbdcopy to our server", func(t *testing.T) {
				resetFile(t, s.dst)
				runTool(t, "nbdcopy", "--flush", s.src, s.uri("dst"))
				requireSameFile(t, s.src, s.dst)
			})
			t.Run("nbdcopy our server to our server", func(t *testing.T) {
				resetFile(t, s.dst)
				runTool(t, "nbdcopy", "--flush", s.uri("src"), s.uri("dst"))
				requireSameFile(t, s.src, s.dst)
			})
			t.Run("qemu-img convert from our server", func(t *testing.T) {
				f := filepath.Join(out, "qemu-out.img")
				args := append([]string{"convert"}, s.qemuObject()...)
				if s.pki != nil {
					args = append(args, "--image-opts")
				} else {
					args = append(args, "-f", "raw")
				}
				args = append(args, s.qemuImage("src")...)
				args = append(args, "-O", "raw", f)
				runTool(t, "qemu-img", args...)
				requireSameFile(t, s.src, f)
			})
			t.Run("qemu-img convert to our server", func(t *testing.T) {
				resetFile(t, s.dst)
				args := append([]string{"convert", "-n"}, s.qemuObject()...)
				args = append(args, "-f", "raw", s.src)
				if s.pki != nil {
					args = append(args, "--target-image-opts")
				} else {
					args = append(args, "-O", "raw")
				}
				args = append(args, s.qemuImage("dst")...)
				runTool(t, "qemu-img", args...)
				requireSameFile(t, s.src, s.dst)
			})
		})
	}
}

// parseNbdinfoMap parses `nbdinfo --map` lines: offset length type description.
func parseNbdinfoMap(t *testing.T, out string) []Extent {
	t.Helper()
	var exts []Extent
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 3, "map line %q", line)
		off, err := strconv.ParseInt(f[0], 10, 64)
		require.NoError(t, err)
		n, err := strconv.ParseInt(f[1], 10, 64)
		require.NoError(t, err)
		ty, err := strconv.ParseUint(f[2], 10, 32)
		require.NoError(t, err)
		exts = append(exts, Extent{Offset: off, Length: n, Flags: uint32(ty)})
	}
	return exts
}

// mergeExtents merges adjacent extents with equal flags.
func mergeExtents(in []Extent) []Extent {
	var out []Extent
	for _, e := range in {
		if n := len(out); n > 0 && out[n-1].Flags == e.Flags && out[n-1].Offset+out[n-1].Length == e.Offset {
			out[n-1].Length += e.Length
			continue
		}
		out = append(out, e)
	}
	return out
}

// fullMap asks for block status until the whole export is described.
func fullMap(t *testing.T, ctx context.Context, c *Client) []Extent {
	t.Helper()
	var all []Extent
	for pos := int64(0); pos < c.Size(); {
		exts, err := c.BlockStatus(ctx, pos, c.Size()-pos)
		require.NoError(t, err)
		require.NotEmpty(t, exts)
		for _, e := range exts {
			require.Equal(t, pos, e.Offset)
			pos += e.Length
		}
		all = append(all, exts...)
	}
	return mergeExtents(all)
}

// exerciseClient checks our client against a server exporting a copy of
// the interop layout (writable when rw).
func exerciseClient(t *testing.T, c *Client, file string, rw bool) {
	ctx := context.Background()
	require.Equal(t, int64(interopSize), c.Size())
	require.True(t, c.CanBlockStatus(), "block status negotiated")
	assert.Equal(t, wantMap(), fullMap(t, ctx, c))

	want, err := os.ReadFile(file)
	require.NoError(t, err)
	got := make([]byte, interopSize)
	require.NoError(t, c.ReadAt(ctx, got, 0))
	require.True(t, bytesEqual(want, got), "export content differs from the file")
	if !rw {
		return
	}
	data := randomData(3<<20, 42)
	require.NoError(t, c.WriteAt(ctx, data, 2<<20, false))
	require.NoError(t, c.WriteAt(ctx, data[:4096], 15<<20, true))
	require.NoError(t, c.WriteZeroes(ctx, 5<<20, 1<<20, 0))
	require.NoError(t, c.Flush(ctx))
	copy(want[2<<20:], data)
	copy(want[15<<20:], data[:4096])
	clear(want[5<<20 : 6<<20])
	require.NoError(t, c.ReadAt(ctx, got, 0))
	require.True(t, bytesEqual(want, got), "export content after writes")
	onDisk, err := os.ReadFile(file)
	require.NoError(t, err)
	require.True(t, bytesEqual(want, onDisk), "file content after writes and flush")
	if c.Flags()&FlagSendTrim != 0 {
		require.NoError(t, c.Trim(ctx, 12<<20, 1<<20))
	}
}

func copyOfLayout(t *testing.T) string {
	return sparseFile(t, t.TempDir(), interopSize, 1<<20, interopLayout...)
}

func TestOurClientWithQemuNbd(t *testing.T) {
	testutil.RequireTool(t, "qemu-nbd", "qemu-utils")
	checkNoLeak(t)
	for _, withTLS := range []bool{false, true} {
		t.Run(fmt.Sprint("tls=", withTLS), func(t *testing.T) {
			file := copyOfLayout(t)
			sock := filepath.Join(t.TempDir(), "qemu.sock")
			args := []string{"-f", "raw", "-t", "-k", sock, "-x", "disk", "--shared=4", "--cache=none", "--discard=unmap"}
			var opts DialOptions
			if withTLS {
				p := newPKI(t)
				args = append(args, "--object", "tls-creds-x509,id=tls0,dir="+p.dir+",endpoint=server", "--tls-creds", "tls0")
				opts.TLS = p.clientTLS() // qemu-nbd verifies client certificates too
				opts.TLS.Certificates = []tls.Certificate{p.clientCert}
			}
			args = append(args, file)
			startTool(t, "unix", sock, "qemu-nbd", args...)
			opts.Export = "disk"
			c, err := Dial(context.Background(), "unix", sock, opts)
			require.NoError(t, err)
			defer c.Close()
			exerciseClient(t, c, file, true)
		})
	}
}

func TestOurClientWithNbdkit(t *testing.T) {
	testutil.RequireTool(t, "nbdkit", "nbdkit")
	checkNoLeak(t)
	t.Run("file", func(t *testing.T) {
		file := copyOfLayout(t)
		sock := filepath.Join(t.TempDir(), "kit.sock")
		startTool(t, "unix", sock, "nbdkit", "-f", "-U", sock, "file", file)
		c, err := Dial(context.Background(), "unix", sock, DialOptions{})
		require.NoError(t, err)
		defer c.Close()
		exerciseClient(t, c, file, true)
	})
	t.Run("file tls required", func(t *testing.T) {
		p := newPKI(t)
		file := copyOfLayout(t)
		addr := "127.0.0.1:" + freePort(t)
		startTool(t, "tcp", addr, "nbdkit", "-f", "-i", "127.0.0.1", "-p", port(addr),
			"--tls=require", "--tls-certificates="+p.dir, "file", file)
		_, err := Dial(context.Background(), "tcp", addr, DialOptions{})
		require.ErrorIs(t, err, ErrTLSRequired)
		pinned, err := Dial(context.Background(), "tcp", addr, DialOptions{PinnedCertPEM: p.serverPEM})
		require.NoError(t, err)
		exerciseClient(t, pinned, file, false)
		require.NoError(t, pinned.Close())
		c, err := Dial(context.Background(), "tcp", addr, DialOptions{TLS: p.clientTLS()})
		require.NoError(t, err)
		defer c.Close()
		exerciseClient(t, c, file, true)
	})
	t.Run("memory", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "mem.sock")
		startTool(t, "unix", sock, "nbdkit", "-f", "-U", sock, "memory", "64M")
		ctx := context.Background()
		pool, err := DialPool(ctx, "unix", sock, DialOptions{}, 4)
		require.NoError(t, err)
		defer pool.Close()
		assert.Len(t, pool.Clients(), 4, "nbdkit memory advertises multi-conn")
		src := NewMemBackend(64 << 20)
		_, err = src.WriteAt(randomData(8<<20, 5), 10<<20)
		require.NoError(t, err)
		ts := startStatic(t, nil, false, &Export{Name: "m", Backend: src})
		from, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "m"})
		require.NoError(t, err)
		defer from.Close()
		st, err := Copy(ctx, pool, from, CopyOptions{})
		require.NoError(t, err)
		assert.Equal(t, int64(8<<20), st.DataBytes)
		got := make([]byte, 64<<20)
		require.NoError(t, pool.ReadAt(ctx, got, 0))
		assert.True(t, bytesEqual(src.Bytes(), got))
		m := fullMap(t, ctx, pool.Clients()[0])
		assert.Equal(t, Extent{10 << 20, 8 << 20, 0}, m[1], "nbdkit memory allocated only the data")
	})
}
