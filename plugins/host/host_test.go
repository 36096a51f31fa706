package host_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/plugins/sdk"
)

// TestMain turns the test binary into a fake backend when it is run
// through a symlink named wanmotion-<kind>-<name> (go-plugin's helper
// process pattern, without a build step).
func TestMain(m *testing.M) {
	if base := filepath.Base(os.Args[0]); strings.HasPrefix(base, host.BinaryPrefix) {
		runFake(base)
		os.Exit(0)
	}
	if dir := os.Getenv(envParentDir); dir != "" {
		runParent(dir)
	}
	os.Exit(m.Run())
}

type fakeStorage struct {
	contract.UnimplementedStorage
	name string
	api  []string
	log  hclog.Logger
}

func (f *fakeStorage) Info(context.Context) (contract.Info, error) {
	f.log.Info("hello from the backend", "name", f.name)
	return contract.Info{Kind: contract.KindStorage, Name: f.name, Version: "9.9.9", APIVersions: f.api,
		Capabilities: contract.CapSource | contract.CapDestination}, nil
}

func (f *fakeStorage) Configure(_ context.Context, r contract.ConfigureRequest) (contract.ConfigureResponse, error) {
	if err := contract.CheckAPIVersion(r.APIVersion, f.api); err != nil {
		return contract.ConfigureResponse{}, err
	}
	return contract.ConfigureResponse{Warnings: []string{"api " + r.APIVersion}}, nil
}

func (f *fakeStorage) Status(_ context.Context, r contract.StatusRequest) (contract.StorageStatus, error) {
	if r.Handle == "env" {
		return contract.StorageStatus{Handle: r.Handle, LastError: strings.Join(os.Environ(), "\n")}, nil
	}
	return contract.StorageStatus{}, contract.ErrNotFound
}

func (f *fakeStorage) SyncRound(ctx context.Context, r contract.SyncRoundRequest) (contract.SyncRoundResponse, error) {
	switch r.Handle {
	case "crash":
		os.Exit(3)
	case "block":
		<-ctx.Done()
		return contract.SyncRoundResponse{}, ctx.Err()
	}
	return contract.SyncRoundResponse{Stats: contract.RoundStats{Round: r.Round}}, nil
}

type fakeNetwork struct {
	contract.UnimplementedNetwork
}

func (fakeNetwork) Info(context.Context) (contract.Info, error) {
	return contract.Info{Kind: contract.KindNetwork, Name: "good", APIVersions: []string{contract.APIVersion},
		Capabilities: contract.CapKeepAddress}, nil
}

func (fakeNetwork) Configure(context.Context, contract.ConfigureRequest) (contract.ConfigureResponse, error) {
	return contract.ConfigureResponse{}, nil
}

func runFake(base string) {
	log := sdk.Logger(base)
	s := &fakeStorage{name: strings.TrimPrefix(base, "wanmotion-storage-"), api: []string{contract.APIVersion}, log: log}
	switch base {
	case "wanmotion-network-good":
		sdk.ServeNetwork(fakeNetwork{})
	case "wanmotion-storage-slow":
		time.Sleep(time.Minute)
	case "wanmotion-storage-dies":
		os.Exit(1)
	case "wanmotion-storage-liar":
		s.name = "somebody-else"
		sdk.ServeStorage(s)
	case "wanmotion-storage-oldapi":
		s.api = []string{"0.9"}
		sdk.ServeStorage(s)
	case "wanmotion-storage-multiapi":
		s.api = []string{"0.9", "1.0", "1.1"}
		sdk.ServeStorage(s)
	case "wanmotion-storage-v2only", "wanmotion-storage-v1v2":
		sets := map[int]plugin.PluginSet{2: {"storage": &contract.StoragePlugin{Impl: s}}}
		if base == "wanmotion-storage-v1v2" {
			sets[1] = plugin.PluginSet{"storage": &contract.StoragePlugin{Impl: s}}
		}
		plugin.Serve(&plugin.ServeConfig{HandshakeConfig: contract.Handshake, VersionedPlugins: sets, Logger: log})
	default:
		sdk.ServeStorage(s)
	}
}

// pluginDir makes a directory of symlinks to the test binary.
func pluginDir(t *testing.T, names ...string) string {
	t.Helper()
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := t.TempDir()
	for _, n := range names {
		require.NoError(t, os.Symlink(exe, filepath.Join(dir, n)))
	}
	return dir
}

func find(t *testing.T, dir string, kind contract.Kind, name string) host.Binary {
	t.Helper()
	bins, err := host.Discover([]string{dir})
	require.NoError(t, err)
	b, err := host.Resolve(bins, kind, name)
	require.NoError(t, err)
	return b
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func launch(t *testing.T, b host.Binary, opts host.Options) (*host.Instance, error) {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = hclog.New(&hclog.LoggerOptions{Output: hclog.DefaultOutput, Level: hclog.Error})
	}
	if opts.StartTimeout == 0 {
		opts.StartTimeout = 30 * time.Second
	}
	opts.Env = append(opts.Env, "GORACE=atexit_sleep_ms=0") // a -race child otherwise lingers 1 s at exit
	inst, err := host.Launch(context.Background(), b, opts)
	if inst != nil {
		t.Cleanup(inst.Close)
	}
	return inst, err
}

func TestDiscoverAndResolve(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-good", "wanmotion-network-good", "wanmotion-storage-nbd")
	other := pluginDir(t, "wanmotion-storage-good", "wanmotion-storage-extra")
	require.NoError(t, os.WriteFile(filepath.Join(dir, "wanmotion-storage-notexec"), []byte("x"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "wanmotion-bogus-kind"), []byte("x"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "README"), []byte("x"), 0o755))

	bins, err := host.Discover([]string{dir, other, filepath.Join(dir, "missing")})
	require.NoError(t, err)
	var ids []string
	for _, b := range bins {
		ids = append(ids, b.ID())
		assert.Len(t, b.SHA256, 64)
		assert.True(t, filepath.IsAbs(b.Path))
	}
	assert.Equal(t, []string{"network/good", "storage/extra", "storage/good", "storage/nbd"}, ids)
	good, err := host.Resolve(bins, contract.KindStorage, "good")
	require.NoError(t, err)
	assert.Equal(t, dir, filepath.Dir(good.Path), "the first directory wins")

	_, err = host.Resolve(bins, contract.KindStorage, "drbd")
	require.ErrorIs(t, err, host.ErrBackendNotFound)
	require.ErrorIs(t, err, contract.ErrNotFound)
	assert.Contains(t, err.Error(), "extra, good, nbd")
	_, err = host.Resolve(bins, contract.KindNetwork, "l2tunnel")
	assert.Contains(t, err.Error(), "installed network backends: good")
}

func TestParseBinaryName(t *testing.T) {
	t.Parallel()
	cases := []struct {
		in   string
		kind contract.Kind
		name string
		ok   bool
	}{
		{"wanmotion-storage-nbd", contract.KindStorage, "nbd", true},
		{"wanmotion-network-l2-tunnel", contract.KindNetwork, "l2-tunnel", true},
		{"wanmotion-storage-", "", "", false},
		{"wanmotion-disk-nbd", "", "", false},
		{"wanmotion", "", "", false},
		{"wanmotion-storage-NBD", "", "", false},
		{"wanmotion-storage--x", "", "", false},
	}
	for _, tc := range cases {
		k, n, ok := host.ParseBinaryName(tc.in)
		assert.Equal(t, tc.ok, ok, tc.in)
		assert.Equal(t, tc.kind, k, tc.in)
		assert.Equal(t, tc.name, n, tc.in)
	}
}

func TestInstallDir(t *testing.T) {
	t.Setenv(host.EnvPluginDir, "/from/env")
	assert.Equal(t, "/flag", host.InstallDir("/flag"))
	assert.Equal(t, "/from/env", host.InstallDir(""))
	t.Setenv(host.EnvPluginDir, "")
	assert.Equal(t, host.DefaultInstallDir, host.InstallDir(""))
	assert.Equal(t, "/flag", host.SearchDirs("/flag")[0])
}

func TestLaunchNegotiatesAndRelaysLogs(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-good")
	var logs syncBuffer
	logger := hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Trace})
	inst, err := launch(t, find(t, dir, contract.KindStorage, "good"), host.Options{Logger: logger})
	require.NoError(t, err)
	assert.Equal(t, "good", inst.Info.Name)
	assert.Equal(t, "9.9.9", inst.Info.Version)
	assert.Equal(t, contract.APIVersion, inst.APIVersion)
	assert.Equal(t, contract.ProtocolVersion, inst.ProtocolVersion)
	assert.Equal(t, []string{"api " + contract.APIVersion}, inst.Warnings)
	assert.NotZero(t, inst.Pid())
	require.NotNil(t, inst.Storage())
	assert.Nil(t, inst.Network())

	resp, err := inst.Storage().SyncRound(context.Background(), contract.SyncRoundRequest{Handle: "h", Round: 4})
	require.NoError(t, err)
	assert.Equal(t, 4, resp.Stats.Round)
	_, err = inst.Storage().Status(context.Background(), contract.StatusRequest{Handle: "nope"})
	require.ErrorIs(t, err, contract.ErrNotFound)

	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "hello from the backend") },
		10*time.Second, 20*time.Millisecond, "backend stderr must be relayed to the host logger")
	inst.Close()
	assert.True(t, inst.Exited())
}

func TestLaunchNetwork(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-network-good")
	inst, err := launch(t, find(t, dir, contract.KindNetwork, "good"), host.Options{})
	require.NoError(t, err)
	require.NotNil(t, inst.Network())
	assert.True(t, inst.Info.Capabilities.Has(contract.CapKeepAddress))
}

func TestEnvironmentNotLeaked(t *testing.T) {
	t.Setenv("WANMOTION_FROM_PASSWORD", "hunter2-secret")
	t.Setenv("XAPI_SESSION", "OpaqueRef:secret-session")
	dir := pluginDir(t, "wanmotion-storage-good")
	inst, err := launch(t, find(t, dir, contract.KindStorage, "good"), host.Options{Env: []string{"BACKEND_OPT=1"}})
	require.NoError(t, err)
	st, err := inst.Storage().Status(context.Background(), contract.StatusRequest{Handle: "env"})
	require.NoError(t, err)
	env := st.LastError
	assert.NotContains(t, env, "hunter2-secret")
	assert.NotContains(t, env, "secret-session")
	assert.NotContains(t, env, "WANMOTION_FROM_PASSWORD")
	assert.Contains(t, env, "BACKEND_OPT=1")
	assert.Contains(t, env, "PATH=")
}

func TestPluginCrashIsPluginExited(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-good")
	inst, err := launch(t, find(t, dir, contract.KindStorage, "good"), host.Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_, err = inst.Storage().SyncRound(ctx, contract.SyncRoundRequest{Handle: "crash"})
	require.ErrorIs(t, err, contract.ErrPluginExited)
	require.NoError(t, ctx.Err(), "a crash must not look like a timeout")
	_, err = inst.Storage().Status(ctx, contract.StatusRequest{Handle: "x"})
	require.ErrorIs(t, err, contract.ErrPluginExited)
	require.Eventually(t, inst.Exited, 10*time.Second, 20*time.Millisecond)
}

func TestCancellationAcrossSubprocess(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-good")
	inst, err := launch(t, find(t, dir, contract.KindStorage, "good"), host.Options{})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(200 * time.Millisecond); cancel() }()
	_, err = inst.Storage().SyncRound(ctx, contract.SyncRoundRequest{Handle: "block"})
	require.ErrorIs(t, err, contract.ErrCancelled)
	require.ErrorIs(t, err, context.Canceled)
	// The backend is still healthy.
	_, err = inst.Storage().SyncRound(context.Background(), contract.SyncRoundRequest{Handle: "h", Round: 1})
	require.NoError(t, err)
}

func TestLaunchFailures(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-slow", "wanmotion-storage-dies", "wanmotion-storage-liar",
		"wanmotion-storage-oldapi", "wanmotion-storage-v2only", "wanmotion-storage-good")
	cases := []struct {
		name    string
		backend string
		kind    contract.Kind
		opts    host.Options
		mutate  func(*host.Binary)
		wantErr error
	}{
		{name: "start timeout", backend: "slow", opts: host.Options{StartTimeout: 500 * time.Millisecond}, wantErr: host.ErrStartTimeout},
		{name: "dies before handshake", backend: "dies", wantErr: contract.ErrPluginExited},
		{name: "wrong identity", backend: "liar", wantErr: host.ErrHandshake},
		{name: "no common api version", backend: "oldapi", wantErr: contract.ErrUnsupported},
		{name: "handshake protocol mismatch", backend: "v2only", wantErr: host.ErrHandshake},
		{name: "checksum mismatch", backend: "good", mutate: func(b *host.Binary) { b.SHA256 = strings.Repeat("0", 64) }, wantErr: host.ErrChecksum},
		{name: "no checksum", backend: "good", mutate: func(b *host.Binary) { b.SHA256 = "" }, wantErr: host.ErrChecksum},
		{name: "wrong kind", backend: "good", kind: contract.KindNetwork, wantErr: host.ErrHandshake},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := find(t, dir, contract.KindStorage, tc.backend)
			if tc.mutate != nil {
				tc.mutate(&b)
			}
			if tc.kind != "" {
				b.Kind = tc.kind
			}
			start := time.Now()
			inst, err := launch(t, b, tc.opts)
			require.ErrorIs(t, err, tc.wantErr)
			assert.Nil(t, inst)
			t.Logf("%s: %v (after %v)", tc.name, err, time.Since(start))
		})
	}
}

func TestProtocolVersionNegotiation(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-v1v2", "wanmotion-storage-v2only")
	cases := []struct {
		name    string
		backend string
		offer   []int
		want    int
	}{
		{"old host, new backend serving N and N-1", "v1v2", []int{1}, 1},
		{"new host, new backend", "v1v2", []int{1, 2}, 2},
		{"new host, backend serving only N", "v2only", []int{1, 2}, 2},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			inst, err := launch(t, find(t, dir, contract.KindStorage, tc.backend), host.Options{ProtocolVersions: tc.offer})
			require.NoError(t, err)
			assert.Equal(t, tc.want, inst.ProtocolVersion)
			_, err = inst.Storage().SyncRound(context.Background(), contract.SyncRoundRequest{Handle: "h"})
			require.NoError(t, err)
		})
	}
}

func TestAPIVersionNegotiation(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-multiapi")
	b := find(t, dir, contract.KindStorage, "multiapi")
	cases := []struct {
		offer []string
		want  string
	}{
		{[]string{"1.0"}, "1.0"},
		{[]string{"1.0", "1.1"}, "1.1"},
		{[]string{"0.9", "2.0"}, "0.9"},
	}
	for _, tc := range cases {
		inst, err := launch(t, b, host.Options{APIVersions: tc.offer})
		require.NoError(t, err)
		assert.Equal(t, tc.want, inst.APIVersion)
		assert.Equal(t, []string{"api " + tc.want}, inst.Warnings, "Configure must receive the chosen version")
		inst.Close()
	}
}

func TestHostLaunchByName(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-good", "wanmotion-network-good")
	h := host.New([]string{dir}, host.Options{StartTimeout: 30 * time.Second, Env: []string{"GORACE=atexit_sleep_ms=0"}})
	inst, err := h.LaunchStorage(context.Background(), "good", nil, t.TempDir())
	require.NoError(t, err)
	defer inst.Close()
	assert.Equal(t, "good", inst.Info.Name)
	_, err = h.LaunchNetwork(context.Background(), "l2tunnel", nil, "")
	require.ErrorIs(t, err, host.ErrBackendNotFound)
	assert.Contains(t, err.Error(), "good")
}

func TestLaunchHonoursCtx(t *testing.T) {
	t.Parallel()
	dir := pluginDir(t, "wanmotion-storage-slow", "wanmotion-storage-good")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := host.Launch(ctx, find(t, dir, contract.KindStorage, "good"), host.Options{})
	require.ErrorIs(t, err, contract.ErrCancelled)

	ctx, cancel = context.WithTimeout(context.Background(), 500*time.Millisecond)
	defer cancel()
	_, err = host.Launch(ctx, find(t, dir, contract.KindStorage, "slow"), host.Options{StartTimeout: time.Minute,
		Env: []string{"GORACE=atexit_sleep_ms=0"}})
	require.ErrorIs(t, err, host.ErrStartTimeout, "a ctx deadline shortens the start timeout")
}

// TestBackendDiesWithItsHost kills a host process with SIGKILL and checks
// that the backend it launched goes away too.
func TestBackendDiesWithItsHost(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("parent-death signal is Linux only")
	}
	dir := pluginDir(t, "wanmotion-storage-good")
	exe, err := os.Executable()
	require.NoError(t, err)
	parent := exec.Command(exe, "-test.run=^$")
	parent.Env = append(os.Environ(), envParentDir+"="+dir, "GORACE=atexit_sleep_ms=0")
	out, err := parent.StdoutPipe()
	require.NoError(t, err)
	require.NoError(t, parent.Start())
	t.Cleanup(func() { _ = parent.Process.Kill(); _ = parent.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	require.NoError(t, err, "the parent prints its backend's pid")
	pid, err := strconv.Atoi(strings.TrimSpace(line))
	require.NoError(t, err, "parent said %q", line)
	require.True(t, alive(pid))

	require.NoError(t, parent.Process.Signal(syscall.SIGKILL))
	_ = parent.Wait()
	require.Eventually(t, func() bool { return !alive(pid) }, 20*time.Second, 20*time.Millisecond,
		"backend %d outlived its host", pid)
}

const envParentDir = "WANMOTION_TEST_PARENT_DIR"

// runParent launches a backend, prints its pid and waits to be killed.
func runParent(dir string) {
	inst, err := host.Launch(context.Background(), mustFind(dir), host.Options{Env: []string{"GORACE=atexit_sleep_ms=0"}})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(inst.Pid())
	time.Sleep(time.Minute)
	os.Exit(0)
}

func mustFind(dir string) host.Binary {
	bins, err := host.Discover([]string{dir})
	if err != nil || len(bins) == 0 {
		fmt.Fprintln(os.Stderr, "no backend in", dir, err)
		os.Exit(1)
	}
	return bins[0]
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}
