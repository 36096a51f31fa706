package agentclient

import (
	"context"
	"crypto/sha256"
	"fmt"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

const reexecEnv = "WANMOTION_AGENTCLIENT_TEST_AGENT"

// pluginDir holds the example filecopy backend, built once by TestMain.
var pluginDir string

func TestMain(m *testing.M) {
	if os.Getenv(reexecEnv) == "1" && len(os.Args) > 1 && os.Args[1] == "agent" {
		// Re-executed as `wanmotion agent` by LocalLauncher.
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := agent.Command(ctx, os.Args[2:], os.Stdout, os.Stderr)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, "agent:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "agentclient-plugins-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		goBin = "go"
	}
	cmd := exec.Command(goBin, "build", "-buildvcs=false", "-o", dir+string(filepath.Separator),
		"github.com/wanmotion/wanmotion/docs/example-backend/filecopy", "github.com/wanmotion/wanmotion/docs/example-backend/noop")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	err = cmd.Run()
	if err == nil {
		err = os.Rename(filepath.Join(dir, "filecopy"), filepath.Join(dir, "wanmotion-storage-filecopy"))
	}
	if err == nil {
		err = os.Rename(filepath.Join(dir, "noop"), filepath.Join(dir, "wanmotion-network-noop"))
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "build example backends:", err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	pluginDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// inProcLauncher runs agents in this process (goroutines), counting launches.
type inProcLauncher struct {
	t   *testing.T
	log hclog.Logger

	mu       sync.Mutex
	launches int
	agents   map[string]*running
}

type running struct {
	a    *agent.Agent
	done chan struct{}
}

func newInProc(t *testing.T) *inProcLauncher {
	l := &inProcLauncher{t: t, log: testutil.Logger(t), agents: map[string]*running{}}
	t.Cleanup(func() {
		l.mu.Lock()
		all := l.agents
		l.agents = map[string]*running{}
		l.mu.Unlock()
		for _, r := range all {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			_ = r.a.Stop(ctx)
			cancel()
			<-r.done
		}
	})
	return l
}

func (l *inProcLauncher) Launch(ctx context.Context, spec AgentLaunchSpec) (string, error) {
	sd := spec.StateDir
	if sd == "" {
		sd = filepath.Join(l.t.TempDir(), "state")
	}
	a, err := agent.New(ctx, agent.Config{MigrationID: spec.MigrationID, Role: spec.Role, TLS: spec.TLS,
		ControlListen: spec.ControlListen, PluginDirs: []string{pluginDir}, StateDir: sd, IdleTimeout: spec.IdleTimeout, Logger: l.log})
	if err != nil {
		return "", err
	}
	r := &running{a: a, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		_ = a.Serve(context.Background())
	}()
	l.mu.Lock()
	l.launches++
	l.agents[spec.MigrationID+"/"+string(spec.Role)] = r
	l.mu.Unlock()
	return a.Addr(), nil
}

func (l *inProcLauncher) Stop(ctx context.Context, spec AgentLaunchSpec) error {
	l.mu.Lock()
	r := l.agents[spec.MigrationID+"/"+string(spec.Role)]
	delete(l.agents, spec.MigrationID+"/"+string(spec.Role))
	l.mu.Unlock()
	if r == nil {
		return nil
	}
	return r.a.Stop(ctx)
}

func (l *inProcLauncher) count() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.launches
}

// fixture is a source dir of snapshot images for filecopy, and the refs
// the engine would use.
type fixture struct {
	srcDir string
	size   int64
}

// snapRef → uuid: "OpaqueRef:snap-<n>" → "snap-<n>" (filecopy reads <uuid>.img).
func uuidOf(_ context.Context, _ contract.Role, ref string) (string, error) {
	return strings.TrimPrefix(ref, "OpaqueRef:"), nil
}

func newFixture(t *testing.T, size int64) *fixture {
	return &fixture{srcDir: t.TempDir(), size: size}
}

// writeSnapshot writes snapshot n: for n == 0 random data with holes; for
// n > 0 the previous snapshot with the given 64 KiB blocks rewritten.
// It returns the image and the CBT bitmap of the change.
func (f *fixture) writeSnapshot(t *testing.T, n int, blocks []int) ([]byte, []byte) {
	t.Helper()
	const bs = contract.DefaultBlockSize
	var img []byte
	r := rand.New(rand.NewSource(int64(n + 1)))
	if n == 0 {
		img = make([]byte, f.size)
		for off := int64(0); off < f.size; off += bs {
			if (off/bs)%4 != 3 { // every 4th block is a hole
				r.Read(img[off : off+bs])
			}
		}
	} else {
		prev, err := os.ReadFile(filepath.Join(f.srcDir, fmt.Sprintf("snap-%d.img", n-1)))
		require.NoError(t, err)
		img = prev
	}
	bitmap := make([]byte, (f.size/bs+7)/8)
	for _, b := range blocks {
		r.Read(img[int64(b)*bs : int64(b+1)*bs])
		bitmap[b/8] |= 0x80 >> (b % 8)
	}
	require.NoError(t, os.WriteFile(filepath.Join(f.srcDir, fmt.Sprintf("snap-%d.img", n)), img, 0o600))
	return img, bitmap
}

func (f *fixture) config(t *testing.T) map[string][]byte {
	cfg, err := contract.ConfigFromJSON([]byte(fmt.Sprintf(`{"source_dir": %q}`, f.srcDir)))
	require.NoError(t, err)
	return map[string][]byte{"filecopy": cfg}
}

func testDisk(size int64) engine.Disk {
	return engine.Disk{VDIRef: "OpaqueRef:vdi-1", VDIUUID: "vdi-1", SRRef: "OpaqueRef:sr-1", NameLabel: "disk", Device: "0", VirtualSize: size}
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	require.NoError(t, ln.Close())
	return addr
}

func sum(b []byte) [32]byte { return sha256.Sum256(b) }

// replicaPath finds the replica file filecopy keeps in the destination
// agent's state dir.
func replicaPath(t *testing.T, stateDir, replicaUUID string) string {
	t.Helper()
	p := filepath.Join(stateDir, "replica-"+replicaUUID+".img")
	_, err := os.Stat(p)
	require.NoError(t, err)
	return p
}

func stringsReader(s string) *strings.Reader { return strings.NewReader(s) }
