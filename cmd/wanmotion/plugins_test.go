package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/host"
)

// exampleBackends builds the two example backends (docs/example-backend)
// into a test directory, plus a broken "backend".
func exampleBackends(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	for bin, pkg := range map[string]string{
		"wanmotion-storage-filecopy": "../../docs/example-backend/filecopy",
		"wanmotion-network-noop":     "../../docs/example-backend/noop",
	} {
		out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(dir, bin), pkg).CombinedOutput()
		require.NoError(t, err, "go build %s: %s", pkg, out)
	}
	require.NoError(t, os.WriteFile(filepath.Join(dir, "wanmotion-storage-broken"), []byte("#!/bin/sh\necho not a plugin >&2\nexit 1\n"), 0o755))
	return dir
}

// TestPluginsCommand builds the examples once and runs list and check on them.
func TestPluginsCommand(t *testing.T) {
	dir := exampleBackends(t)
	t.Run("ListJSON", func(t *testing.T) { testPluginsListJSON(t, dir) })
	t.Run("ListTable", func(t *testing.T) { testPluginsListTable(t, dir) })
	t.Run("Check", func(t *testing.T) { testPluginsCheck(t, dir) })
}

func runCmd(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	err := runPlugins(context.Background(), args, &out, &errb)
	return out.String(), errb.String(), err
}

func testPluginsListJSON(t *testing.T, dir string) {
	out, _, err := runCmd(t, "list", "--dir", dir, "--json")
	require.NoError(t, err)
	var rows []pluginRow
	require.NoError(t, json.Unmarshal([]byte(out), &rows))
	byName := map[string]pluginRow{}
	for _, r := range rows {
		byName[r.Kind+"/"+r.Name] = r
	}
	require.Contains(t, byName, "storage/filecopy")
	require.Contains(t, byName, "network/noop")
	require.Contains(t, byName, "storage/broken")

	fc := byName["storage/filecopy"]
	assert.Equal(t, "0.1.0", fc.Version)
	assert.Equal(t, []string{"1.0"}, fc.APIVersions)
	assert.Contains(t, fc.Capabilities, "incremental")
	assert.Contains(t, fc.Capabilities, "resume")
	assert.Equal(t, filepath.Join(dir, "wanmotion-storage-filecopy"), fc.Path)
	sum, err := host.FileSHA256(fc.Path)
	require.NoError(t, err)
	assert.Equal(t, sum, fc.SHA256)
	assert.Empty(t, fc.Error)

	assert.NotEmpty(t, byName["storage/broken"].Error, "a broken backend is listed with its error")
}

func testPluginsListTable(t *testing.T, dir string) {
	out, _, err := runCmd(t, "list", "--dir", dir)
	require.NoError(t, err)
	assert.Contains(t, out, "KIND")
	assert.Contains(t, out, "filecopy")
	assert.Contains(t, out, "noop")
	assert.Regexp(t, `storage\s+broken\s+\?.*error:`, out)

	empty := t.TempDir()
	out, _, err = runCmd(t, "list", "--dir", empty)
	require.NoError(t, err)
	assert.Contains(t, out, "no backends found")
}

func testPluginsCheck(t *testing.T, dir string) {
	out, _, err := runCmd(t, "check", "filecopy", "--dir", dir)
	require.NoError(t, err)
	assert.Contains(t, out, "storage/filecopy")
	assert.Regexp(t, `negotiated api:\s+1\.0`, out)
	assert.Regexp(t, `result:\s+ok`, out)

	out, _, err = runCmd(t, "check", "--kind", "network", "--json", "--dir", dir, "noop")
	require.NoError(t, err)
	var row pluginRow
	require.NoError(t, json.Unmarshal([]byte(out), &row))
	assert.Equal(t, "1.0", row.APIVersion)
	assert.Equal(t, 1, row.ProtocolVersion)
	assert.Empty(t, row.Error)

	_, _, err = runCmd(t, "check", "nbd", "--dir", dir)
	require.ErrorIs(t, err, host.ErrBackendNotFound)
	assert.Contains(t, err.Error(), "storage/filecopy")

	_, _, err = runCmd(t, "check", "nbd", "--kind", "storage", "--dir", dir)
	require.ErrorIs(t, err, host.ErrBackendNotFound)
	assert.Contains(t, err.Error(), "broken, filecopy")

	out, _, err = runCmd(t, "check", "broken", "--dir", dir, "--json")
	require.Error(t, err)
	require.NoError(t, json.Unmarshal([]byte(out), &row))
	assert.NotEmpty(t, row.Error)
}

func TestPluginsUsage(t *testing.T) {
	cases := [][]string{
		{},
		{"frobnicate"},
		{"check"},
		{"check", "a", "b"},
		{"check", "x", "--kind", "disk"},
		{"list", "extra"},
		{"list", "--no-such-flag"},
	}
	for _, args := range cases {
		_, _, err := runCmd(t, args...)
		require.ErrorIs(t, err, errUsage, strings.Join(args, " "))
	}
	_, _, err := runCmd(t, "--help")
	require.NoError(t, err)
}

// A backend copied without the executable bit, or a --dir that does not
// exist, is skipped by discovery; the command says so on stderr.
func TestPluginsListExplainsSkipped(t *testing.T) {
	t.Setenv("WANMOTION_PLUGIN_DIR", "")
	dir := t.TempDir()
	bin := filepath.Join(dir, "wanmotion-network-copied")
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "wanmotion-storage-Bad"), []byte("x"), 0o755))
	out, stderr, err := runCmd(t, "list", "--dir", dir)
	require.NoError(t, err)
	assert.NotContains(t, out, "copied")
	assert.Contains(t, stderr, bin+" skipped: not executable (chmod 0755 "+bin+")")
	assert.Contains(t, stderr, "wanmotion-storage-Bad skipped: a backend name is lower-case")

	_, stderr, err = runCmd(t, "check", "copied", "--dir", dir)
	require.Error(t, err)
	assert.Contains(t, stderr, "not executable")

	missing := filepath.Join(dir, "nope")
	_, stderr, err = runCmd(t, "list", "--dir", missing)
	require.NoError(t, err)
	assert.Contains(t, stderr, "plugin directory "+missing+" does not exist")
}
