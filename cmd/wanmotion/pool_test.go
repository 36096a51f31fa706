package main

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

func TestPoolShowConfigure(t *testing.T) {
	e := newCLIEnv(t)
	show := func() map[string]any {
		out, _, err := run(t, runPool, "show", "--url", e.a, "--json")
		require.NoError(t, err)
		return oneJSONObject(t, out)
	}
	v := show()
	assert.Equal(t, "site-a", v["pool"])
	assert.Equal(t, "", v["storage"])
	assert.Equal(t, map[string]any{}, v["config"])

	out, _, err := run(t, runPool, "configure", "--url", e.a, "--plugin-dir", e.pluginDir,
		"--storage", "nbd", "--network", "none", "--set", "bandwidth=200Mbit", "--set", "streams=8", "--set", "gateway_listen=0.0.0.0:7000")
	require.NoError(t, err)
	assert.Contains(t, out, "wanmotion:storage    nbd")
	v = show()
	assert.Equal(t, "nbd", v["storage"])
	assert.Equal(t, "none", v["network"])
	cfg := v["config"].(map[string]any)
	assert.Equal(t, float64(8), cfg["streams"])
	assert.Equal(t, "0.0.0.0:7000", cfg["gateway_listen"])

	// Read back through the engine: the stored values parse to what was set.
	c, err := xapi.New(xapi.Config{URL: e.a, Username: "root", Password: "xenroot"})
	require.NoError(t, err)
	require.NoError(t, c.Login(context.Background()))
	defer c.Close(context.Background())
	pool, err := c.ThePool(context.Background())
	require.NoError(t, err)
	oc, err := c.PoolGetOtherConfig(context.Background(), pool)
	require.NoError(t, err)
	o, err := engine.ParsePoolConfig(oc)
	require.NoError(t, err)
	require.NotNil(t, o.BandwidthBytesPerSec)
	assert.Equal(t, int64(25_000_000), *o.BandwidthBytesPerSec)
	assert.Equal(t, "nbd", *o.Storage)

	// The keys exist now: a second write must not hit MAP_DUPLICATE_KEY.
	require.True(t, xapi.IsCode(c.PoolAddToOtherConfig(context.Background(), pool, engine.KeyStorage, "x"), xapi.CodeMapDuplicateKey),
		"precondition: a plain add of an existing key fails")
	_, _, err = run(t, runPool, "configure", "--url", e.a, "--plugin-dir", e.pluginDir, "--storage", "drbd", "--set", "streams=", "--set", "max_rounds=3")
	require.NoError(t, err)
	v = show()
	assert.Equal(t, "drbd", v["storage"])
	cfg = v["config"].(map[string]any)
	assert.NotContains(t, cfg, "streams", "key= removes a field")
	assert.Equal(t, float64(3), cfg["max_rounds"])
	assert.Equal(t, "0.0.0.0:7000", cfg["gateway_listen"], "other fields are kept")

	// Remove the backend keys.
	_, _, err = run(t, runPool, "configure", "--url", e.a, "--storage=", "--network=")
	require.NoError(t, err)
	v = show()
	assert.Equal(t, "", v["storage"])
	assert.Equal(t, "", v["network"])

	// Text form.
	out, _, err = run(t, runPool, "show", "--url", e.a)
	require.NoError(t, err)
	assert.Contains(t, out, "pool site-a")
	assert.Contains(t, out, "(not set; default nbd)")
	assert.Contains(t, out, "max_rounds")

	// The other pool is untouched.
	out, _, err = run(t, runPool, "show", "--url", e.b, "--json")
	require.NoError(t, err)
	assert.Equal(t, map[string]any{}, oneJSONObject(t, out)["config"])
}

func TestPoolConfigureErrors(t *testing.T) {
	e := newCLIEnv(t)
	for _, tc := range []struct {
		name  string
		args  []string
		usage bool
		want  []string
	}{
		{"unknown storage", []string{"--storage", "zfs-magic"}, false, []string{`storage backend "zfs-magic" is not installed`, "installed: drbd, nbd", "wanmotion plugins list"}},
		{"unknown network", []string{"--network", "mipv6"}, false, []string{`network backend "mipv6"`, "installed: none, l2tunnel"}},
		{"unknown field", []string{"--set", "colour=blue"}, true, []string{`unknown field "colour"`, "bandwidth"}},
		{"bad value", []string{"--set", "streams=0"}, false, []string{"streams 0"}},
		{"bad bandwidth", []string{"--set", "bandwidth=fast"}, false, []string{`bandwidth "fast"`}},
		{"bad int", []string{"--set", "streams=many"}, true, []string{"want an integer"}},
		{"no change", []string{}, true, []string{"nothing to configure"}},
		{"password flag", []string{"--password", "xenroot"}, true, []string{"--password", EnvPassword}},
		{"unknown flag", []string{"--colour", "blue"}, true, []string{"colour"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"configure", "--url", e.a, "--plugin-dir", e.pluginDir}, tc.args...)
			_, _, err := run(t, runPool, args...)
			require.Error(t, err)
			assert.Equal(t, tc.usage, errorsIsUsage(err), "%v", err)
			for _, w := range tc.want {
				assert.Contains(t, err.Error(), w)
			}
			assert.NotContains(t, err.Error(), "xenroot")
		})
	}
	// Nothing was written by the failed calls.
	out, _, err := run(t, runPool, "show", "--url", e.a, "--json")
	require.NoError(t, err)
	v := oneJSONObject(t, out)
	assert.Equal(t, "", v["storage"])
	assert.Equal(t, map[string]any{}, v["config"])

	_, _, err = run(t, runPool, "show")
	require.ErrorIs(t, err, errUsage, "--url is required")
	t.Setenv(EnvPassword, "not-the-pw")
	_, _, err = run(t, runPool, "show", "--url", e.a)
	require.ErrorIs(t, err, xapi.ErrSessionAuthenticationFailed)
	assert.NotContains(t, err.Error(), "not-the-pw")
	assert.Contains(t, err.Error(), "wrong user name or password", "says what to fix")
}
