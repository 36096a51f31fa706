package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// checkInstallTree checks the layout packaging/install.sh promises.
func checkInstallTree(t *testing.T, dest string, backends ...string) {
	t.Helper()
	bin := filepath.Join(dest, "usr/lib/wanmotion/wanmotion")
	require.NoError(t, executable(bin))
	for _, l := range []string{"etc/xapi.d/plugins/wanmotion", "usr/bin/wanmotion"} {
		target, err := os.Readlink(filepath.Join(dest, l))
		require.NoError(t, err, "%s is a symlink (argv[0] stays the plugin path)", l)
		assert.Equal(t, "/usr/lib/wanmotion/wanmotion", target)
	}
	for _, h := range []string{"vm-pre-migrate", "vm-post-migrate"} {
		p := filepath.Join(dest, "etc/xapi.d", h, "50wanmotion")
		require.NoError(t, executable(p))
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		assert.Contains(t, string(b), "BIN='/usr/lib/wanmotion/wanmotion'")
		assert.Contains(t, string(b), `"$BIN" hook `+h+` -script "$0" "$@"`)
		assert.NotContains(t, string(b), "@BIN@")
		assert.NotContains(t, string(b), "@HOOK@")
	}
	for _, b := range backends {
		require.NoError(t, executable(filepath.Join(dest, "opt/wanmotion/plugins", b)))
	}
	cfg, err := hostplugin.ReadConfig(filepath.Join(dest, "etc/wanmotion/wanmotion.conf"))
	require.NoError(t, err, "the default config parses")
	assert.Equal(t, "/opt/wanmotion/plugins", cfg.PluginDir)
	assert.Equal(t, "/var/lib/wanmotion", cfg.StateDir)
	assert.FileExists(t, filepath.Join(dest, "usr/share/wanmotion/xencenter/WanMotion/WanMotion.xcplugin.xml"))
}

func TestInstallScriptAndDoctor(t *testing.T) {
	bindir := t.TempDir()
	bin := buildWanmotion(t, "")
	require.NoError(t, os.Rename(bin, filepath.Join(bindir, "wanmotion")))
	for _, b := range []string{"wanmotion-storage-nbd", "wanmotion-network-noop"} {
		require.NoError(t, os.WriteFile(filepath.Join(bindir, b), []byte("#!/bin/sh\nexit 1\n"), 0o755))
	}
	dest := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "../../packaging/install.sh", bindir, dest).CombinedOutput()
	require.NoError(t, err, "%s", out)
	checkInstallTree(t, dest, "wanmotion-storage-nbd", "wanmotion-network-noop")

	// A changed config survives a reinstall.
	conf := filepath.Join(dest, "etc/wanmotion/wanmotion.conf")
	require.NoError(t, os.WriteFile(conf, []byte("log_level = debug\n"), 0o644))
	out, err = exec.CommandContext(ctx, "../../packaging/install.sh", bindir, dest).CombinedOutput()
	require.NoError(t, err, "%s", out)
	b, err := os.ReadFile(conf)
	require.NoError(t, err)
	assert.Equal(t, "log_level = debug\n", string(b))
	require.NoError(t, os.Remove(conf))
	out, err = exec.CommandContext(ctx, "../../packaging/install.sh", bindir, dest).CombinedOutput()
	require.NoError(t, err, "%s", out)

	// doctor on the tree: everything but xapi (no dom0 here).
	installed := filepath.Join(dest, "usr/lib/wanmotion/wanmotion")
	cmd := exec.CommandContext(ctx, installed, "doctor", "--root", dest, "--json")
	raw, err := cmd.Output()
	require.Error(t, err, "xapi is unreachable here: exit 1")
	rep := oneJSONObject(t, string(raw))
	assert.Equal(t, false, rep["ok"])
	status := map[string]string{}
	fixes := map[string]string{}
	for _, c := range rep["checks"].([]any) {
		m := c.(map[string]any)
		status[m["name"].(string)] = m["status"].(string)
		if f, ok := m["fix"].(string); ok {
			fixes[m["name"].(string)] = f
		}
	}
	for _, n := range []string{"binary", "host plugin", "hook vm-pre-migrate", "hook vm-post-migrate", "config", "backends", "state dir"} {
		assert.Equal(t, "ok", status[n], n)
	}
	assert.Equal(t, "fail", status["xapi"])
	assert.NotEmpty(t, fixes["xapi"], "says what to do")
	assert.Equal(t, "warn", status["xl"], "no xl in the install tree: the throttle policy cannot work there")

	// A missing hook and plugin are reported with what to do.
	require.NoError(t, os.Remove(filepath.Join(dest, "etc/xapi.d/plugins/wanmotion")))
	require.NoError(t, os.Remove(filepath.Join(dest, "etc/xapi.d/vm-pre-migrate/50wanmotion")))
	out2, _, err := run(t, runDoctor, "--root", dest)
	require.ErrorIs(t, err, errDoctor)
	assert.Regexp(t, `fail\s+host plugin`, out2)
	assert.Contains(t, out2, "fix: ln -s /usr/lib/wanmotion/wanmotion")
	assert.Regexp(t, `warn\s+hook vm-pre-migrate`, out2)

	// On a simulated host (its etc holds the inventory), xapi is reachable.
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 1, NoDemoVM: true, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(ctx, "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	require.NoError(t, s.InstallPlugin(hostplugin.PluginName, installed))
	h := s.Pools()[0].Coordinator().Ref
	out3, _, _ := run(t, runDoctor, "--root", dest, "--etc", s.HostEtcDir(string(h)))
	assert.Regexp(t, `ok\s+xapi\s+http://127\.0\.0\.1:\d+/? \(simulator\)`, out3)
	assert.Regexp(t, `ok\s+host plugin`, out3)
	assert.Regexp(t, `ok\s+xl\s+\S+/usr/sbin/xl, scheduler credit`, out3, "the simulated host's xl")
}

// TestMakeInstall runs the Makefile target itself (it builds everything).
func TestMakeInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds all binaries")
	}
	if _, err := exec.LookPath("make"); err != nil {
		testutil.Missing(t, "make", "make")
	}
	dest, bindir := t.TempDir(), t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "make", "-C", "../..", "install", "DESTDIR="+dest, "BIN="+bindir, "VERSION=1.2.3-test")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	checkInstallTree(t, dest, "wanmotion-storage-nbd")
	assert.FileExists(t, filepath.Join(dest, "usr/share/wanmotion/xencenter/wanmotion-xencenter.exe"), "the Windows XenCenter helper")
	v, err := exec.CommandContext(ctx, filepath.Join(dest, "usr/lib/wanmotion/wanmotion"), "version").Output()
	require.NoError(t, err)
	assert.Equal(t, "wanmotion 1.2.3-test", strings.TrimSpace(string(v)))
}
