package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
)

// demoBinaries builds the real wanmotion binary and the nbd backend into
// one directory (the demo runs its commands as child processes and finds
// the backend next to the binary).
func demoBinaries(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	for _, b := range []struct{ out, pkg string }{
		{"wanmotion", "."},
		{"wanmotion-storage-nbd", "../../storage-backends/nbd/cmd/wanmotion-storage-nbd"},
	} {
		out, err := exec.Command(gobin, "build", "-buildvcs=false", "-o", filepath.Join(dir, b.out), b.pkg).CombinedOutput()
		require.NoError(t, err, "go build %s: %s", b.pkg, out)
	}
	return filepath.Join(dir, "wanmotion")
}

// TestDemoEndToEnd runs `wanmotion demo` with small sizes and a fast link:
// the real simulator, migrate, site agents and nbd backend as child
// processes, through the emulated link.
func TestDemoEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries and runs a migration")
	}
	isolate(t)
	demoExec = demoBinaries(t)
	t.Cleanup(func() { demoExec = "" })
	work := t.TempDir()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	var out, errb bytes.Buffer
	err := runDemo(ctx, []string{"--disk-size", "64MiB", "--fill-size", "16MiB", "--memory-size", "32MiB",
		"--bandwidth", "1Gbit", "--rtt", "2ms", "--dir", work, "--json"}, &out, &errb)
	require.NoError(t, err, "stderr:\n%s", errb.String())

	v := oneJSONObject(t, out.String())
	var res demoResult
	require.NoError(t, json.Unmarshal(out.Bytes(), &res))
	assert.Equal(t, "success", res.Result, "stderr:\n%s", errb.String())
	assert.Equal(t, "success", v["migration"].(map[string]any)["result"])
	assert.Equal(t, "ok", v["migration"].(map[string]any)["integrity"], "the engine's own check")

	// The SHA-256 of the destination disk equals the guest's record.
	assert.Equal(t, "ok", res.Integrity.Result)
	require.Len(t, res.Integrity.Source, 1)
	assert.Len(t, res.Integrity.Source["0"], 64)
	assert.Equal(t, res.Integrity.Source, res.Integrity.Destination)
	assert.Equal(t, int64(64<<20), res.Integrity.Bytes)

	// The VM runs at site-b only, and the guest kept writing.
	assert.Equal(t, map[string]string{"site-b": "Running"}, res.Placement.Sites)
	assert.NotEmpty(t, res.Placement.DestHost)
	assert.NotEqual(t, "0", res.Guest["writes"])

	// The migration crossed the emulated link.
	assert.Greater(t, res.Link.Upstream, int64(16<<20), "the seed copy and memory went through the link")

	// Nothing is left running, and the work directory is gone.
	cmds := ""
	for _, p := range res.Processes {
		assert.False(t, processAlive(p.Pid, p.Command), "still runs: %d %s", p.Pid, p.Command)
		cmds += p.Command + "\n"
	}
	for _, want := range []string{"wanmotion sim ", "wanmotion migrate ", "wanmotion agent ", "wanmotion-storage-nbd"} {
		assert.Contains(t, cmds, want, "the demo saw and stopped its %s process", want)
	}
	assert.Empty(t, processesMentioning(work))
	ents, err := os.ReadDir(work)
	require.NoError(t, err)
	assert.Empty(t, ents, "the run directory is removed without --keep")

	assert.Contains(t, errb.String(), "emulated WAN link up: 1 Gbit/s, 2ms RTT")
	assert.Contains(t, errb.String(), "SUCCESS")
	assert.NotContains(t, out.String()+errb.String(), "xenroot", "no password in the output")
}

func TestDemoFlags(t *testing.T) {
	tests := []struct {
		name string
		args []string
		ok   bool
	}{
		{"defaults", nil, true},
		{"fill larger than disk", []string{"--disk-size", "64MiB", "--fill-size", "128MiB"}, false},
		{"bad bandwidth", []string{"--bandwidth", "fast"}, false},
		{"zero bandwidth", []string{"--bandwidth", "unlimited"}, false},
		{"bad size", []string{"--memory-size", "lots"}, false},
		{"bad guest rate", []string{"--guest-rate", "x"}, false},
		{"negative rtt", []string{"--rtt", "-1ms"}, false},
		{"throttle policy", []string{"--policy", "throttle"}, true},
		{"bad policy", []string{"--policy", "yolo"}, false},
		{"extra argument", []string{"now"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var errb bytes.Buffer
			f, err := parseDemoFlags(tc.args, &errb)
			if !tc.ok {
				require.Error(t, err)
				assert.True(t, errorsIsUsage(err), "%v", err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, int64(1<<30), f.diskBytes)
			assert.Equal(t, int64(256<<20), f.fillBytes)
			assert.Equal(t, int64(256<<20), f.memBytes)
			assert.Equal(t, int64(100e6), f.bwBps)
			assert.Equal(t, 50*time.Millisecond, f.rtt)
		})
	}
}

// TestDemoInterrupted cancels the demo (as Ctrl-C does) during Seed: the
// migration rolls back, the VM still runs at site-a, nothing is left.
func TestDemoInterrupted(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries and runs a migration")
	}
	isolate(t)
	demoExec = demoBinaries(t)
	t.Cleanup(func() { demoExec = "" })
	work := t.TempDir()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		// Interrupt once the migration's checkpoint says Seed.
		deadline := time.Now().Add(2 * time.Minute)
		for time.Now().Before(deadline) && ctx.Err() == nil {
			dirs, _ := filepath.Glob(filepath.Join(work, "run-*", "migrate"))
			for _, d := range dirs {
				store, err := engine.NewFileStore(d)
				if err != nil {
					continue
				}
				ids, _ := store.List(ctx)
				for _, id := range ids {
					if cp, err := store.Load(ctx, id); err == nil && cp.Phase == engine.PhaseSeed {
						cancel()
						return
					}
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
	}()
	var out, errb bytes.Buffer
	err := runDemo(ctx, []string{"--disk-size", "128MiB", "--fill-size", "48MiB", "--memory-size", "16MiB",
		"--bandwidth", "16Mbit", "--rtt", "10ms", "--dir", work, "--json"}, &out, &errb)
	require.Error(t, err, "stderr:\n%s", errb.String())
	var ec interface{ ExitCode() int }
	require.ErrorAs(t, err, &ec)
	assert.Equal(t, exitCancelled, ec.ExitCode())

	var res demoResult
	require.NoError(t, json.Unmarshal(out.Bytes(), &res), "stdout: %s", out.String())
	assert.Equal(t, "cancelled", res.Result, "stderr:\n%s", errb.String())
	assert.Equal(t, map[string]string{"site-a": "Running"}, res.Placement.Sites, "the VM stays at the source")
	assert.Equal(t, "skipped", res.Integrity.Result)
	require.NotEmpty(t, res.Processes)
	for _, p := range res.Processes {
		assert.False(t, processAlive(p.Pid, p.Command), "still runs: %d %s", p.Pid, p.Command)
	}
	assert.Empty(t, processesMentioning(work))
	assert.Contains(t, errb.String(), "cancelling the migration")
}
