package hostplugin

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/agent/agentclient"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

func TestDiscover(t *testing.T) {
	etc := t.TempDir()
	plugins := filepath.Join(etc, "xapi.d", "plugins")
	require.NoError(t, os.MkdirAll(plugins, 0o755))
	argv0 := filepath.Join(plugins, PluginName)

	e, err := Discover(argv0)
	require.NoError(t, err, "no inventory: a real host without one")
	assert.Equal(t, etc, e.EtcDir)
	assert.False(t, e.Sim)
	assert.Equal(t, xapi.LocalSocket, e.Socket)

	inv := "PRODUCT_BRAND='XCP-ng'\nINSTALLATION_UUID='h-1'\nWANMOTION_SIM='true'\nWANMOTION_SIM_XAPI_SOCKET='/tmp/s'\n" +
		"WANMOTION_SIM_XAPI_URL='http://127.0.0.1:1/'\nWANMOTION_SIM_POOL_URL=\"http://127.0.0.1:2/\"\n# comment\n\n"
	require.NoError(t, os.WriteFile(filepath.Join(etc, "xensource-inventory"), []byte(inv), 0o644))
	e, err = Discover(argv0)
	require.NoError(t, err)
	assert.True(t, e.Sim)
	assert.Equal(t, "h-1", e.HostUUID)
	assert.Equal(t, "/tmp/s", e.Socket)
	assert.Equal(t, "http://127.0.0.1:1/", e.HostURL)
	assert.Equal(t, "http://127.0.0.1:2/", e.PoolURL)
	assert.Equal(t, "XCP-ng", e.Inventory["PRODUCT_BRAND"])

	hook := filepath.Join(etc, "xapi.d", "vm-pre-migrate", "50wanmotion")
	assert.Equal(t, etc, EtcFromScript(hook), "hooks sit at the same depth")

	c, err := e.Client("OpaqueRef:s", nil)
	require.NoError(t, err)
	assert.Equal(t, "http://127.0.0.1:2/", c.URL(), "the simulator's coordinator")
	assert.Equal(t, xapi.SessionRef("OpaqueRef:s"), c.Session())
	c.Forget()
}

func TestConfig(t *testing.T) {
	dir := t.TempDir()
	c, err := LoadConfig(ConfigCandidates(filepath.Join(dir, "etc"), filepath.Join(dir, "bin", "wanmotion")))
	require.NoError(t, err)
	assert.Equal(t, "", c.Path)
	assert.Equal(t, DefaultStateDir, c.StateDir)
	assert.Equal(t, "info", c.LogLevel)
	assert.Equal(t, DefaultTaskLinger, c.TaskLinger)

	next := filepath.Join(dir, "bin", ConfigFileName)
	require.NoError(t, os.MkdirAll(filepath.Dir(next), 0o755))
	require.NoError(t, os.WriteFile(next, []byte("# x\nstate_dir = /srv/wm\nlog_level=debug\n"), 0o644))
	c, err = LoadConfig(ConfigCandidates(filepath.Join(dir, "etc"), filepath.Join(dir, "bin", "wanmotion")))
	require.NoError(t, err)
	assert.Equal(t, next, c.Path, "next to the binary")
	assert.Equal(t, "/srv/wm", c.StateDir)
	assert.Equal(t, "debug", c.LogLevel)

	inEtc := filepath.Join(dir, "etc", "wanmotion", ConfigFileName)
	require.NoError(t, os.MkdirAll(filepath.Dir(inEtc), 0o755))
	require.NoError(t, os.WriteFile(inEtc, []byte("plugin_dir = /opt/p\n"), 0o644))
	c, err = LoadConfig(ConfigCandidates(filepath.Join(dir, "etc"), filepath.Join(dir, "bin", "wanmotion")))
	require.NoError(t, err)
	assert.Equal(t, inEtc, c.Path, "etc first")
	assert.Equal(t, "/opt/p", c.PluginDir)

	for _, bad := range []string{"colour = blue\n", "no equals\n", "state_dir = relative\n",
		"log_level = debgu\n", "agent_listen = 0.0.0.0\n", "task_linger = 30\n", "task_linger = -5s\n", "task_linger = soon\n"} {
		require.NoError(t, os.WriteFile(inEtc, []byte(bad), 0o644))
		_, err = LoadConfig(ConfigCandidates(filepath.Join(dir, "etc"), ""))
		require.ErrorIs(t, err, ErrConfig, bad)
	}

	pw := filepath.Join(dir, "pw")
	require.NoError(t, os.WriteFile(pw, []byte("secret\n"), 0o644))
	_, err = Config{LocalPasswordFile: pw}.LocalPassword()
	require.ErrorIs(t, err, ErrConfig, "readable by others")
	require.NoError(t, os.Chmod(pw, 0o600))
	got, err := Config{LocalPasswordFile: pw}.LocalPassword()
	require.NoError(t, err)
	assert.Equal(t, "secret", got)

	b, err := os.ReadFile("../packaging/wanmotion.conf")
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(inEtc, b, 0o644))
	c, err = ReadConfig(inEtc)
	require.NoError(t, err, "the packaged default parses")
	assert.Equal(t, "0.0.0.0:0", c.AgentListen)
	assert.Equal(t, DefaultTaskLinger, c.TaskLinger)

	for in, want := range map[string]time.Duration{"task_linger = 2m\n": 2 * time.Minute, "task_linger = 0\n": 0,
		"task_linger = 0s\n": 0, "task_linger = never\n": -1, "task_linger =\n": DefaultTaskLinger, "state_dir = /x\n": DefaultTaskLinger} {
		require.NoError(t, os.WriteFile(inEtc, []byte(in), 0o644))
		c, err = ReadConfig(inEtc)
		require.NoError(t, err, in)
		assert.Equal(t, want, c.TaskLinger, in)
	}
}

func TestAgentStartArgsRoundTrip(t *testing.T) {
	b, err := agent.NewBundle("m-1")
	require.NoError(t, err)
	spec := agentclient.AgentLaunchSpec{MigrationID: "m-1", Role: contract.RoleDestination, TLS: b.For(contract.RoleDestination),
		ControlListen: "0.0.0.0:7001", PluginDir: "/opt/p", StateDir: "/var/s", IdleTimeout: 90 * time.Second}
	args, err := LaunchArgs(spec)
	require.NoError(t, err)
	got, err := ParseAgentStart(args)
	require.NoError(t, err)
	assert.Equal(t, spec, got)

	for _, tc := range []struct {
		name string
		mod  func(map[string]string)
	}{
		{"bad id", func(m map[string]string) { m[ArgMigrationID] = "../x" }},
		{"no id", func(m map[string]string) { delete(m, ArgMigrationID) }},
		{"bad role", func(m map[string]string) { m[ArgRole] = "both" }},
		{"no tls", func(m map[string]string) { delete(m, ArgTLS) }},
		{"bad tls", func(m map[string]string) { m[ArgTLS] = "{" }},
		{"empty tls", func(m map[string]string) { m[ArgTLS] = "{}" }},
		{"bad idle", func(m map[string]string) { m[ArgIdleTimeout] = "-1s" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := LaunchArgs(spec)
			require.NoError(t, err)
			tc.mod(m)
			_, err = ParseAgentStart(m)
			require.ErrorIs(t, err, ErrInvalidArgument)
		})
	}
}

func TestPluginLauncherNeedsClientAndHost(t *testing.T) {
	l := &PluginLauncher{}
	_, err := l.Launch(context.Background(), agentclient.AgentLaunchSpec{MigrationID: "m", Role: contract.RoleSource})
	require.ErrorIs(t, err, contract.ErrInvalidArgument)
	c, err := xapi.New(xapi.Config{URL: "http://127.0.0.1:1"})
	require.NoError(t, err)
	l.Source = c
	_, err = l.Launch(context.Background(), agentclient.AgentLaunchSpec{MigrationID: "m", Role: contract.RoleSource})
	require.ErrorIs(t, err, contract.ErrInvalidArgument, "no host")
	require.ErrorIs(t, l.Stop(context.Background(), agentclient.AgentLaunchSpec{MigrationID: "m", Role: "x"}), contract.ErrInvalidArgument)
}
