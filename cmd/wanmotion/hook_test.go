package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

func TestParseHookArgs(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		ok   bool
		dom  int
	}{
		{"code order", []string{"vm-pre-migrate", "-vmuuid", "u", "-reason", "source"}, true, -1},
		{"doc order", []string{"vm-post-migrate", "-reason", "destination", "-vmuuid", "u", "-vmdomid", "7"}, true, 7},
		{"script first", []string{"vm-pre-migrate", "-script", "/etc/xapi.d/vm-pre-migrate/50wanmotion", "-reason", "source", "-vmuuid", "u"}, true, -1},
		{"no hook", nil, false, 0},
		{"other hook", []string{"vm-pre-start", "-vmuuid", "u", "-reason", "none"}, false, 0},
		{"no uuid", []string{"vm-pre-migrate", "-reason", "source"}, false, 0},
		{"bad domid", []string{"vm-pre-migrate", "-vmuuid", "u", "-reason", "source", "-vmdomid", "x"}, false, 0},
		{"unknown flag", []string{"vm-pre-migrate", "-vmuuid", "u", "-reason", "source", "-force"}, false, 0},
		{"help", []string{"vm-pre-migrate", "-h"}, false, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := parseHookArgs(tc.args)
			if !tc.ok {
				require.ErrorIs(t, err, errHook)
				require.False(t, errors.Is(err, errUsage), "a hook never exits 2")
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "u", a.vmUUID)
			assert.Equal(t, tc.dom >= 0, a.hasDomid)
			if tc.dom >= 0 {
				assert.Equal(t, tc.dom, a.domid)
			}
		})
	}
}

// hookScript writes the packaged hook wrapper for bin.
func hookScript(t *testing.T, bin, hook string) string {
	t.Helper()
	tmpl, err := os.ReadFile("../../packaging/hook.sh.in")
	require.NoError(t, err)
	s := strings.NewReplacer("@BIN@", bin, "@HOOK@", hook).Replace(string(tmpl))
	p := filepath.Join(t.TempDir(), "50wanmotion")
	require.NoError(t, os.WriteFile(p, []byte(s), 0o755))
	return p
}

// buildNoopNetwork builds the example network backend (docs/example-backend/noop).
func buildNoopNetwork(t *testing.T, dir string) {
	t.Helper()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(dir, "wanmotion-network-noop"),
		"../../docs/example-backend/noop").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
}

// TestHooksThroughSimulator runs the installed hook scripts with the
// simulator's xenopsd hook runner, in both argv orders.
func TestHooksThroughSimulator(t *testing.T) {
	stateDir, pluginDir := t.TempDir(), t.TempDir()
	buildNoopNetwork(t, pluginDir)
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 1, DiskSize: 16 << 20, FillSize: 4 << 20,
		MemorySize: 8 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	pi := s.Info().Pools[0]
	pwFile := filepath.Join(t.TempDir(), "local-password")
	require.NoError(t, os.WriteFile(pwFile, []byte(pi.Password+"\n"), 0o600))
	bin := buildWanmotion(t, fmt.Sprintf("state_dir = %s\nplugin_dir = %s\nlocal_password_file = %s\nlog_level = debug\n", stateDir, pluginDir, pwFile))
	pre, post := hookScript(t, bin, hookPreMigrate), hookScript(t, bin, hookPostMigrate)
	require.NoError(t, s.InstallHook(xapisim.HookVMPreMigrate, "50wanmotion", pre))
	require.NoError(t, s.InstallHook(xapisim.HookVMPostMigrate, "50wanmotion", post))
	require.NoError(t, s.InstallPlugin(hostplugin.PluginName, bin)) // hook-release

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := xapi.New(xapi.Config{URL: pi.URL, Username: pi.Username, Password: pi.Password, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	pools, err := c.PoolGetAll(ctx)
	require.NoError(t, err)
	setNetwork := func(v string) {
		require.NoError(t, c.PoolRemoveFromOtherConfig(ctx, pools[0], "wanmotion:network"))
		if v != "" {
			require.NoError(t, c.PoolAddToOtherConfig(ctx, pools[0], "wanmotion:network", v))
		}
	}
	vms, err := c.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	require.Len(t, vms, 1)
	vm, err := c.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	hosts := s.Pools()[0].Hosts()
	src, dst := hosts[0].Ref, hosts[1].Ref
	records := filepath.Join(stateDir, "hooks", vm.UUID)

	// Direct run: what xenopsd would see as the exit code, and the output.
	directOut := func(host, hook string, args ...string) (int, string) {
		cmd := exec.CommandContext(ctx, filepath.Join(s.HookDir(host, hook), "50wanmotion"), args...)
		cmd.Env = []string{"PATH=/sbin:/usr/sbin:/bin:/usr/bin"}
		cmd.Dir = "/"
		out, err := cmd.CombinedOutput()
		t.Logf("%s %v: %s", hook, args, out)
		if err == nil {
			return 0, string(out)
		}
		var ee *exec.ExitError
		require.ErrorAs(t, err, &ee)
		return ee.ExitCode(), string(out)
	}
	direct := func(host, hook string, args ...string) int {
		code, _ := directOut(host, hook, args...)
		return code
	}
	hostUUID := func(ref string) string {
		r, err := c.HostGetRecord(ctx, xapi.HostRef(ref))
		require.NoError(t, err)
		return r.UUID
	}
	readRecord := func(role string) hookRecord {
		b, err := os.ReadFile(filepath.Join(records, role+".json"))
		require.NoError(t, err, "the %s hook recorded its side (exit 0, not 1)", role)
		var rec hookRecord
		require.NoError(t, json.Unmarshal(b, &rec))
		return rec
	}

	// Strategy none (unset): nothing to do, success.
	assert.Equal(t, 0, direct(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "source"))
	assert.NoDirExists(t, records)

	setNetwork("noop")
	for _, reasonFirst := range []bool{false, true} {
		t.Run(fmt.Sprintf("reason first %v", reasonFirst), func(t *testing.T) {
			require.NoError(t, os.RemoveAll(records))
			s.SetHookReasonFirst(reasonFirst)
			require.NoError(t, s.RunHooks(ctx, string(src), xapisim.HookVMPreMigrate, vm.UUID, "source", "3"))
			rec := readRecord("source")
			assert.Equal(t, "noop", rec.Backend)
			assert.Equal(t, "source", string(rec.Role))
			assert.Equal(t, hostUUID(src), rec.HostUUID)
			assert.NotEmpty(t, rec.Handle.ID)
			// The destination's hook activates, has the source host
			// release its side (hook-release), cleans up both: no record
			// is left.
			require.NoError(t, s.RunHooks(ctx, string(dst), xapisim.HookVMPostMigrate, vm.UUID, "destination", "9"))
			assert.NoDirExists(t, records, "both sides released and cleaned up")
		})
	}
	s.SetHookReasonFirst(false)

	// Who releases the source side: the source host, asked by the destination's hook.
	require.Equal(t, 0, direct(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "source"))
	code, out := directOut(dst, hookPostMigrate, "-reason", "destination", "-vmuuid", vm.UUID, "-vmdomid", "4")
	require.Equal(t, 0, code)
	assert.Contains(t, out, "source released on host "+hostUUID(src))
	assert.Contains(t, out, "cleaned up")
	assert.NoDirExists(t, records)

	// A source side nobody released (the destination's hook did not reach
	// this host) is swept by this host's next hook once the VM has left it.
	require.Equal(t, 0, direct(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "source"))
	readRecord("source")
	vm, err = c.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	setNetwork("") // the move itself runs no hook work
	away := hosts[0].Ref
	if string(vm.ResidentOn) == away {
		away = hosts[1].Ref
	}
	require.NoError(t, c.VMPoolMigrate(ctx, vms[0], xapi.HostRef(away), map[string]string{"live": "true"}))
	if away == src {
		// The VM is on the record's host again: nothing to sweep there.
		assert.Equal(t, 0, direct(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "suspend"))
		readRecord("source")
		require.NoError(t, c.VMPoolMigrate(ctx, vms[0], xapi.HostRef(dst), map[string]string{"live": "true"}))
	}
	code, out = directOut(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "suspend")
	assert.Equal(t, 0, code)
	assert.Contains(t, out, "released earlier hook records")
	assert.NoDirExists(t, records, "swept")
	setNetwork("noop")

	// Our side unavailable: log and continue (1), never another code.
	setNetwork("no-such-backend")
	assert.Equal(t, 1, direct(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "source"))
	require.NoError(t, s.RunHooks(ctx, string(src), xapisim.HookVMPreMigrate, vm.UUID, "source", ""), "exit 1 does not stop xapi")
	assert.Equal(t, 1, direct(src, hookPreMigrate, "-vmuuid"), "bad arguments")
	assert.Equal(t, 1, direct(src, hookPreMigrate, "-reason", "source", "-vmuuid", "00000000-0000-0000-0000-000000000000"), "unknown VM")
	assert.Equal(t, 0, direct(src, hookPreMigrate, "-vmuuid", vm.UUID, "-reason", "suspend"), "other reasons: nothing to do")

	// A migration xapi runs itself (VM.pool_migrate) runs both hooks.
	setNetwork("noop")
	require.NoError(t, os.RemoveAll(records))
	vm, err = c.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	other := hosts[0].Ref
	if string(vm.ResidentOn) == string(other) {
		other = hosts[1].Ref
	}
	require.NoError(t, c.VMPoolMigrate(ctx, vms[0], xapi.HostRef(other), map[string]string{"live": "true"}))
	// Both hooks ran: the source side was prepared, then released and
	// cleaned up with the destination's after the move.
	assert.NoDirExists(t, records, "VM.pool_migrate ran both hooks and nothing is left behind")
	// ... and is not blocked when our side is broken.
	setNetwork("no-such-backend")
	back := hosts[0].Ref
	if back == other {
		back = hosts[1].Ref
	}
	require.NoError(t, c.VMPoolMigrate(ctx, vms[0], xapi.HostRef(back), map[string]string{"live": "true"}), "exit 1 never blocks a migration")
	vm, err = c.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	assert.Equal(t, string(back), string(vm.ResidentOn))

	missing := hookScript(t, filepath.Join(t.TempDir(), "not-installed"), hookPreMigrate)
	cmd := exec.CommandContext(ctx, missing, "-vmuuid", vm.UUID, "-reason", "source")
	err = cmd.Run()
	var ee *exec.ExitError
	require.ErrorAs(t, err, &ee)
	assert.Equal(t, 1, ee.ExitCode(), "a missing binary is log-and-continue")
}
