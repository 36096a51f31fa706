package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// cliEnv is an in-process simulator with two pools, passwords in the
// environment and an isolated config directory.
type cliEnv struct {
	sim       *xapisim.Sim
	a, b      string // pool URLs
	pluginDir string
	stateDir  string
}

func newCLIEnv(t *testing.T) cliEnv {
	t.Helper()
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 2, DiskSize: 16 << 20, FillSize: 4 << 20,
		MemorySize: 8 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	info := s.Info()
	isolate(t)
	t.Setenv(EnvPassword, info.Pools[0].Password)
	t.Setenv(EnvFromPassword, info.Pools[0].Password)
	t.Setenv(EnvToPassword, info.Pools[1].Password)
	return cliEnv{sim: s, a: info.Pools[0].URL, b: info.Pools[1].URL,
		pluginDir: fakeBackends(t, "storage-nbd", "storage-drbd", "network-l2tunnel"), stateDir: t.TempDir()}
}

// isolate points the default credentials file at an empty directory and
// makes stdin look like no terminal.
func isolate(t *testing.T) {
	t.Helper()
	t.Setenv("XDG_CONFIG_HOME", t.TempDir())
	for _, e := range []string{EnvPassword, EnvFromPassword, EnvToPassword} {
		t.Setenv(e, "")
	}
	old := stdinIsTerminal
	stdinIsTerminal = func() bool { return false }
	t.Cleanup(func() { stdinIsTerminal = old })
}

// fakeBackends makes a plugin directory with executables named like
// backends ("storage-nbd" → wanmotion-storage-nbd). Discovery only looks
// at names and the executable bit; they are never launched here.
func fakeBackends(t *testing.T, ids ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, id := range ids {
		require.NoError(t, os.WriteFile(filepath.Join(dir, "wanmotion-"+id), []byte("#!/bin/sh\nexit 1\n"), 0o755))
	}
	return dir
}

func run(t *testing.T, fn func(context.Context, []string, io.Writer, io.Writer) error, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	err := fn(ctx, args, &out, &errb)
	return out.String(), errb.String(), err
}

// oneJSONObject decodes s, which must hold exactly one JSON object.
func oneJSONObject(t *testing.T, s string) map[string]any {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader([]byte(s)))
	var m map[string]any
	require.NoError(t, dec.Decode(&m), "stdout: %q", s)
	_, err := dec.Token()
	require.ErrorIs(t, err, io.EOF, "more than one JSON value on stdout: %q", s)
	return m
}

func errorsIsUsage(err error) bool { return errors.Is(err, errUsage) }
