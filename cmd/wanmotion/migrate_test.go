package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

func TestParseMigrateFlags(t *testing.T) {
	base := []string{"--vm", "demo-vm", "--from", "https://a.example", "--to", "https://b.example"}
	for _, tc := range []struct {
		name string
		args []string
		flag string // the flag the usage error names ("" = valid)
	}{
		{"valid", nil, ""},
		{"valid full", []string{"--dest-sr", "sr", "--dest-host", "h", "--network-map", "a=b", "--network-map", "*=c",
			"--storage", "nbd", "--network", "none", "--bandwidth", "200Mbit", "--rtt", "50ms", "--streams", "8",
			"--downtime-target", "500ms", "--policy", "throttle", "--gateway-listen", "0.0.0.0:7000",
			"--gateway-advertise", "gw.example:7000", "--compression", "none", "--dry-run", "--json", "--thumbprint", "ab:cd",
			"--task-linger", "5s"}, ""},
		{"no vm", []string{"--vm", ""}, "--vm"},
		{"bad from", []string{"--from", "ftp://x"}, "--from"},
		{"bare host", []string{"--from", "pool-a.example"}, "e.g. https://"},
		{"bad log level", []string{"--log-level", "loud"}, "--log-level"},
		{"same pool", []string{"--to", "https://a.example/"}, "--from and --to"},
		{"bad bandwidth", []string{"--bandwidth", "fast"}, "--bandwidth"},
		{"bad policy", []string{"--policy", "pray"}, "--policy"},
		{"bad streams", []string{"--streams", "0"}, "--streams"},
		{"bad downtime", []string{"--downtime-target", "0s"}, "--downtime-target"},
		{"bad rtt", []string{"--rtt", "soon"}, "rtt"},
		{"bad task linger", []string{"--task-linger", "30"}, "task-linger"},
		{"bad map", []string{"--network-map", "a"}, "--network-map"},
		{"bad compression", []string{"--compression", "lz4"}, "--compression"},
		{"bad gateway", []string{"--gateway-listen", "7000"}, "--gateway-listen"},
		{"empty storage", []string{"--storage", ""}, "--storage"},
		{"bad id", []string{"--id", "../x"}, "--id"},
		{"tls conflict", []string{"--insecure", "--ca-file", "x.pem"}, "--insecure"},
		{"unknown flag", []string{"--colour", "blue"}, "colour"},
		{"password flag", []string{"--from-password", "hunter2"}, "--from-password"},
		{"password flag 2", []string{"--password=hunter2"}, "--password"},
		{"extra arg", []string{"now"}, "now"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			args := append(append([]string{}, base...), tc.args...)
			var stderr strings.Builder
			f, o, err := parseMigrateFlags(args, &stderr)
			if tc.flag == "" {
				require.NoError(t, err)
				assert.Equal(t, "demo-vm", f.vm)
				if len(tc.args) > 0 {
					require.NotNil(t, o.BandwidthBytesPerSec)
					assert.Equal(t, int64(25_000_000), *o.BandwidthBytesPerSec)
					assert.Equal(t, engine.PolicyThrottle, *o.Policy)
					assert.Equal(t, 500*time.Millisecond, *o.DowntimeTarget)
					assert.Equal(t, 8, *o.Streams)
					assert.Equal(t, "gw.example:7000", *o.GatewayAdvertise)
					assert.Equal(t, 50*time.Millisecond, f.rtt)
					assert.Equal(t, 5*time.Second, f.taskLinger)
					assert.Equal(t, []string{"a=b", "*=c"}, []string(f.networkMap))
				} else {
					assert.Nil(t, o.Storage, "unset flags do not override the pools")
					assert.Nil(t, o.BandwidthBytesPerSec)
				}
				return
			}
			require.ErrorIs(t, err, errUsage)
			assert.Contains(t, err.Error(), tc.flag)
			assert.NotContains(t, err.Error(), "hunter2")
			assert.NotContains(t, stderr.String(), "hunter2")
		})
	}
}

func TestMigrateDryRun(t *testing.T) {
	e := newCLIEnv(t)
	args := []string{"--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", e.pluginDir, "--dry-run",
		"--bandwidth", "100Mbit", "--rtt", "50ms", "--downtime-target", "500ms"}
	out, _, err := run(t, runMigrate, args...)
	require.NoError(t, err)
	for _, want := range []string{"plan for VM demo-vm", "storage nbd, network none", "bytes to move:",
		"estimated total:", "estimated pause:", "target 500ms", "rtt 50ms", "-> SR site-b storage ("} {
		assert.Contains(t, out, want)
	}
	assert.NotContains(t, out, "OpaqueRef", "the plan names SRs for people")

	out, stderr, err := run(t, runMigrate, append(args, "--json")...)
	require.NoError(t, err, stderr)
	v := oneJSONObject(t, out)
	assert.Equal(t, true, v["dry_run"])
	assert.Equal(t, "demo-vm", v["vm_name"])
	est := v["estimate"].(map[string]any)
	assert.Equal(t, float64(12_500_000), est["link_bytes_per_sec"])
	assert.Positive(t, est["total_seconds"])
	assert.Positive(t, est["downtime_seconds"])
	require.Len(t, v["disks"], 1)
	disk := v["disks"].([]any)[0].(map[string]any)
	assert.Equal(t, "site-b storage", disk["dest_sr_name"])
	assert.Regexp(t, `^[0-9a-f-]{36}$`, disk["dest_sr_uuid"])
	assert.Contains(t, out, "site-b storage")

	// By UUID, with an explicit SR and network map, no checkpoint written.
	vmUUID := v["vm_uuid"].(string)
	out, _, err = run(t, runMigrate, "--vm", vmUUID, "--from", e.a, "--to", e.b, "--plugin-dir", e.pluginDir, "--dry-run",
		"--dest-sr", "site-b storage", "--network-map", "WAN-net=WAN-net", "--state-dir", e.stateDir)
	require.NoError(t, err)
	assert.Contains(t, out, vmUUID)
	assert.Contains(t, out, "assumed 1 Gbit/s", "no bandwidth given")
	out, _, err = run(t, runMigrate, "status", "--state-dir", e.stateDir)
	require.NoError(t, err)
	assert.Contains(t, out, "no migrations")

	// Resolution errors.
	_, _, err = run(t, runMigrate, "--vm", "no-such-vm", "--from", e.a, "--to", e.b, "--dry-run", "--plugin-dir", e.pluginDir)
	require.ErrorIs(t, err, engine.ErrNotFound)
	_, _, err = run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--dry-run", "--plugin-dir", e.pluginDir,
		"--storage", "p2p")
	require.ErrorIs(t, err, engine.ErrUnknownBackend)
	assert.Contains(t, err.Error(), "installed: drbd, nbd")
	_, _, err = run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--dry-run", "--plugin-dir", e.pluginDir,
		"--network-map", "WAN-net=nowhere")
	require.ErrorIs(t, err, engine.ErrNotFound)
}

func TestMigrateJSONOnFailure(t *testing.T) {
	e := newCLIEnv(t)
	ctx := context.Background()
	// A halted VM cannot move live: the engine fails in Plan and rolls back.
	c, err := xapi.New(xapi.Config{URL: e.a, Username: "root", Password: "xenroot"})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	defer c.Close(ctx)
	vms, err := c.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	_, err = c.Call(ctx, "VM.hard_shutdown", string(vms[0]))
	require.NoError(t, err)

	out, _, err := run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--plugin-dir", e.pluginDir,
		"--state-dir", e.stateDir, "--json")
	require.Error(t, err)
	var ec interface{ ExitCode() int }
	require.ErrorAs(t, err, &ec)
	assert.Equal(t, exitFailed, ec.ExitCode())
	v := oneJSONObject(t, out)
	for _, k := range []string{"migration_id", "vm_uuid", "result", "phases", "seed_rounds", "bytes_to_move",
		"bytes_on_wire", "residual_bytes", "guest_pause_ms", "integrity"} {
		assert.Contains(t, v, k)
	}
	assert.Equal(t, "failed", v["result"])
	assert.Equal(t, "rolled_back", v["phase"])
	assert.Equal(t, "skipped", v["integrity"])
	assert.NotEmpty(t, v["vm_uuid"])
	assert.Contains(t, v["error"], "Halted")
	phases := v["phases"].([]any)
	require.Len(t, phases, 7)
	for i, name := range []string{"plan", "prepare", "seed", "handoff", "switch", "verify", "cleanup"} {
		assert.Equal(t, name, phases[i].(map[string]any)["name"])
	}

	// Failing before the engine starts (wrong password): also one JSON
	// object of the same shape, and no password in it.
	t.Setenv(EnvToPassword, "not-the-password")
	out, _, err = run(t, runMigrate, "--vm", "demo-vm", "--from", e.a, "--to", e.b, "--json")
	require.Error(t, err)
	v = oneJSONObject(t, out)
	assert.Equal(t, "failed", v["result"])
	assert.Len(t, v["phases"], 7)
	assert.NotContains(t, out, "not-the-password")
	assert.NotContains(t, out, "xenroot")
}

func TestMigrateStatusFromCheckpoint(t *testing.T) {
	isolate(t)
	dir := t.TempDir()
	store, err := engine.NewFileStore(dir)
	require.NoError(t, err)
	ctx := context.Background()
	cp := &engine.Checkpoint{Version: engine.CheckpointVersion, MigrationID: "wm-000000000001", Phase: engine.PhaseDone,
		VMName: "demo-vm", Request: engine.RequestState{VMUUID: "5e1f0000-0000-4000-8000-000000000001"},
		Timings: map[string]float64{"seed": 2.5, "handoff": 1}, Integrity: engine.IntegrityOK,
		UpdatedUnixNano: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano()}
	require.NoError(t, store.Save(ctx, cp))
	cp2 := *cp
	cp2.MigrationID, cp2.Phase, cp2.Cancelled = "wm-000000000002", engine.PhaseRolledBack, true
	require.NoError(t, store.Save(ctx, &cp2))

	out, _, err := run(t, runMigrate, "status", "wm-000000000001", "--state-dir", dir, "--json")
	require.NoError(t, err)
	v := oneJSONObject(t, out)
	assert.Equal(t, "success", v["result"])
	assert.Equal(t, "ok", v["integrity"])

	out, _, err = run(t, runMigrate, "status", "--state-dir", dir)
	require.NoError(t, err)
	assert.Contains(t, out, "wm-000000000001  demo-vm  success")
	assert.Contains(t, out, "wm-000000000002  demo-vm  cancelled")

	out, _, err = run(t, runMigrate, "status", "--state-dir", dir, "--json")
	require.NoError(t, err)
	assert.Len(t, oneJSONObject(t, out)["migrations"], 2)

	_, _, err = run(t, runMigrate, "statuss", "--state-dir", dir)
	require.ErrorIs(t, err, errUsage)
	assert.Contains(t, err.Error(), `unknown migrate command "statuss": want status, cancel or resume`)
	_, _, err = run(t, runMigrate, "resume", "wm-000000000001", "--state-dir", dir, "--log-level", "loud")
	require.ErrorIs(t, err, errUsage)
	assert.Contains(t, err.Error(), "--log-level")
	_, _, err = run(t, runMigrate, "status", "wm-nope", "--state-dir", dir)
	require.ErrorIs(t, err, engine.ErrNotFound)
	assert.Equal(t, 1, strings.Count(err.Error(), "wm-nope"), "the id is named once: %v", err)
	assert.Contains(t, err.Error(), "not found in "+dir)
	_, _, err = run(t, runMigrate, "resume", "wm-nope", "--state-dir", dir)
	require.ErrorIs(t, err, engine.ErrNotFound)
	assert.Contains(t, err.Error(), "migrate status' lists")
	_, _, err = run(t, runMigrate, "cancel", "wm-000000000001", "--state-dir", dir)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "already ended")
	_, _, err = run(t, runMigrate, "cancel", "--state-dir", dir)
	require.ErrorIs(t, err, errUsage)
}

func TestOutcomeExitCodes(t *testing.T) {
	rep := engine.Report{MigrationID: "wm-1"}
	for _, tc := range []struct {
		err  error
		code int
	}{
		{fmt.Errorf("%w: by user", engine.ErrCancelled), exitCancelled},
		{fmt.Errorf("%w: ctx", engine.ErrInterrupted), exitFailed},
		{errors.New("boom"), exitFailed},
	} {
		err := outcomeError(rep, tc.err)
		var ec interface{ ExitCode() int }
		require.ErrorAs(t, err, &ec)
		assert.Equal(t, tc.code, ec.ExitCode())
		assert.ErrorIs(t, err, tc.err)
	}
	assert.NoError(t, outcomeError(rep, nil))
	assert.Contains(t, outcomeError(rep, engine.ErrInterrupted).Error(), "wanmotion migrate resume wm-1")
	hf := outcomeError(rep, fmt.Errorf("handoff: %w", engine.ErrHandoffFailed)).Error()
	assert.Contains(t, hf, "wanmotion migrate resume wm-1")
	assert.Contains(t, hf, "wanmotion migrate cancel wm-1")
	throttled := outcomeError(engine.Report{MigrationID: "wm-1", GuestThrottleActive: true, GuestThrottlePercent: 40}, engine.ErrInterrupted).Error()
	assert.Contains(t, throttled, "the guest is still throttled (40% of its CPU taken)")
	assert.Contains(t, throttled, "wanmotion migrate cancel wm-1")
}
