package e2e

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

// TestMigrateAndLinkCuts: a migration with the guest writing, then the
// same migration with the WAN link cut during Seed and during Handoff. The
// cut runs must finish with the disks intact and re-send little: their
// bytes on the wire stay within 1.5× of the cut-free run's.
func TestMigrateAndLinkCuts(t *testing.T) {
	var baselineWire int64
	t.Run("success", func(t *testing.T) {
		e := newEnv(t)
		rep, code := e.migrate("wm-success").report(t)
		require.Equal(t, 0, code, "report %+v", rep)
		assert.Equal(t, "success", rep.Result)
		assert.Equal(t, "done", rep.Phase)
		assert.Equal(t, e.vmUUID, rep.VMUUID)
		assert.Equal(t, "ok", rep.Integrity, "the destination disk holds what the guest wrote")
		assert.GreaterOrEqual(t, rep.SeedRounds, 2, "round 0 and at least one delta round")
		assert.Positive(t, rep.BytesToMove)
		assert.Positive(t, rep.BytesOnWire)
		assert.True(t, rep.GuestPauseMeasured)
		names := []string{}
		for _, p := range rep.Phases {
			names = append(names, p.Name)
		}
		assert.Equal(t, []string{"plan", "prepare", "seed", "handoff", "switch", "verify", "cleanup"}, names)
		// the report's bytes on the wire are what crossed the emulated
		// link (which also counts TLS records and the gateway's acks)
		c := e.link.Counters()
		assert.GreaterOrEqual(t, c.Upstream+c.Downstream, rep.BytesOnWire*9/10, "link counters %+v", c)
		assert.LessOrEqual(t, c.Upstream+c.Downstream, rep.BytesOnWire*5/4, "link counters %+v", c)
		e.settled(siteB)
		baselineWire = rep.BytesOnWire
		cutFree.mu.Lock()
		cutFree.link, cutFree.wire = e.linkBytes(), rep.BytesOnWire
		cutFree.mu.Unlock()
	})

	for _, tc := range []struct {
		name      string
		phase     engine.Phase
		blackhole bool // a silent path instead of dropped connections
	}{
		{"link-cut-seed", engine.PhaseSeed, false},
		{"link-cut-handoff", engine.PhaseHandoff, false},
		{"link-blackhole-seed", engine.PhaseSeed, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			id := "wm-" + tc.name
			p := e.migrate(id)
			// cut once data flows in the phase (≥ 1 MiB crossed the link since it began)
			e.waitFor(id, p, tc.phase.String(), func(cp *engine.Checkpoint) bool { return cp.Phase == tc.phase })
			start := e.link.Counters().Upstream
			deadline := time.Now().Add(runTimeout)
			for e.link.Counters().Upstream-start < 1<<20 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			cp := e.checkpoint(id)
			require.Equal(t, tc.phase, cp.Phase, "still in %s when the link is cut", tc.phase)
			if tc.blackhole {
				e.link.Blackhole()
			} else {
				e.link.Cut()
			}
			time.Sleep(1500 * time.Millisecond)
			require.NoError(t, e.link.Restore())
			rep, code := p.report(t)
			require.Equal(t, 0, code, "report %+v\nstderr:\n%s", rep, p.stderrText())
			assert.Equal(t, "success", rep.Result)
			assert.Equal(t, "ok", rep.Integrity)
			assert.GreaterOrEqual(t, e.link.Counters().Cuts, 1)
			e.settled(siteB)
			if baselineWire > 0 {
				ratio := float64(rep.BytesOnWire) / float64(baselineWire)
				t.Logf("bytes on the wire: %d with the cut, %d without (%.2fx)", rep.BytesOnWire, baselineWire, ratio)
				assert.Less(t, ratio, 1.5, "a cut re-sends little")
			}
			e.assertLittleResent(1.5)
		})
	}
}

// fault is a point where a fault is injected. The gate holds the first
// pool API call the controller makes while its checkpoint names the phase
// (and more holds): every phase makes one early (task progress, the cancel
// poll or a VM lookup), so the fault lands inside that phase.
type fault struct {
	name  string
	phase engine.Phase
	more  func(method string, cp *engine.Checkpoint) bool
	// slow: the link runs at 1/12 of its rate until the fault, so that
	// round 0 lasts long enough for the engine's cancel poll (every 1 s) to
	// run while data is copied.
	slow bool
}

// midRound0 holds the engine's cancel poll while round 0 copies.
func midRound0(m string, cp *engine.Checkpoint) bool {
	return m == "task.get_record" && cp.Seed.Round == 0 && len(cp.Disks) > 0 && len(cp.Disks[0].Snapshots) > 0
}

// phaseFaults: one point per phase, plus mid-phase points in Seed (a round
// copying) and Handoff (VM.migrate_send running). Plan is caught once its
// xapi task exists (a cancel needs it).
var phaseFaults = []fault{
	{name: "plan", phase: engine.PhasePlan, more: func(_ string, cp *engine.Checkpoint) bool { return cp.Task != "" && cp.TaskLabelled }},
	{name: "prepare", phase: engine.PhasePrepare},
	{name: "seed", phase: engine.PhaseSeed, more: func(m string, _ *engine.Checkpoint) bool { return m == "VDI.list_changed_blocks" }},
	{name: "seed-mid-round", phase: engine.PhaseSeed, more: midRound0, slow: true},
	{name: "handoff", phase: engine.PhaseHandoff},
	{name: "handoff-migrate-send", phase: engine.PhaseHandoff, more: func(m string, cp *engine.Checkpoint) bool {
		return m == "task.get_record" && cp.Handoff.Task != ""
	}},
	{name: "switch", phase: engine.PhaseSwitch},
	{name: "verify", phase: engine.PhaseVerify},
	{name: "cleanup", phase: engine.PhaseCleanup},
}

// inject starts a migration and holds it at f; the caller injects its
// fault, then sends on e.gate.release.
func (e *env) inject(id string, f fault) (*proc, string) {
	e.t.Helper()
	if f.slow {
		e.link.SetBandwidth(linkBits / 12)
	}
	e.gate.arm(e.inPhase(id, f.phase, f.more))
	p := e.migrate(id)
	m := e.gate.waitHit(p)
	e.t.Logf("holding %s in %s", m, f.name)
	return p, m
}

// releaseGate restores the link's rate and lets the held call go on
// (drop: answer it with an error instead, its caller being dead).
func (e *env) releaseGate(drop bool) {
	e.link.SetBandwidth(linkBits)
	e.gate.release <- drop
}

// TestCancelInEachPhase cancels with `wanmotion migrate cancel` (xapi
// task.cancel, as XenCenter does) in each phase. Before Handoff the
// migration rolls back (exit 3, VM at the source only, nothing left
// behind); from Handoff on the CLI refuses, a task.cancel sent anyway is
// ignored, and the migration completes.
func TestCancelInEachPhase(t *testing.T) {
	for _, f := range phaseFaults {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			id := "wm-cancel-" + f.name
			p, _ := e.inject(id, f)
			c := e.start(id+"-cancel", "migrate", "cancel", id, "--state-dir", e.stateDir)
			code := c.wait(t)
			if f.phase.ForwardOnly() {
				assert.NotEqual(t, 0, code, "cancel refused past handoff")
				assert.Contains(t, c.stderrText(), "cannot be cancelled")
				// XenCenter's Cancel button does not ask: task.cancel anyway
				cp := e.checkpoint(id)
				require.NotEmpty(t, cp.Task)
				require.NoError(t, e.client(siteA).TaskCancel(t.Context(), xapi.TaskRef(cp.Task)))
			} else {
				require.Equal(t, 0, code, "cancel: %s", c.stderrText())
				assert.Contains(t, c.stdout.String(), "cancel requested")
			}
			require.Equal(t, f.phase, e.checkpoint(id).Phase, "the fault landed in %s", f.name)
			e.releaseGate(false)
			rep, code := p.report(t)
			if f.phase.ForwardOnly() {
				require.Equal(t, 0, code, "report %+v", rep)
				assert.Equal(t, "success", rep.Result)
				assert.Equal(t, "ok", rep.Integrity)
				assert.True(t, e.checkpoint(id).CancelIgnored)
				e.settled(siteB)
				return
			}
			assert.Equal(t, 3, code, "exit code of a cancelled migration; report %+v", rep)
			assert.Equal(t, "cancelled", rep.Result)
			assert.Equal(t, "rolled_back", rep.Phase)
			e.settled(siteA)
			e.assertCBTRestored()
		})
	}
}

// TestControllerKilledInEachPhase kills the controller (SIGKILL of the
// migrate process) in each phase, then `wanmotion migrate resume ID`
// completes the migration.
func TestControllerKilledInEachPhase(t *testing.T) {
	for _, f := range phaseFaults {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			id := "wm-kill-" + f.name
			p, m := e.inject(id, f)
			require.NoError(t, p.cmd.Process.Signal(syscall.SIGKILL))
			<-p.done
			t.Logf("controller killed while %s was held in %s", m, f.name)
			e.releaseGate(true)
			require.Equal(t, f.phase, e.checkpoint(id).Phase, "killed in %s", f.phase)
			rep, code := e.resume(id)
			require.Equal(t, 0, code, "resume: report %+v", rep)
			assert.Equal(t, "success", rep.Result)
			assert.Equal(t, "ok", rep.Integrity)
			e.settled(siteB)
			e.assertLittleResent(1.5)
		})
	}
}

// TestAgentKilledDuringSeed kills the source or the destination agent, or
// the storage backend one of them runs (SIGKILL), while a seed round
// copies. The engine (or the agent, for a backend) re-launches it and the
// migration completes, or it fails cleanly with the VM at the source and
// resume completes.
func TestAgentKilledDuringSeed(t *testing.T) {
	for _, tc := range []struct {
		name, role string
		backend    bool // kill the agent's storage backend, not the agent
	}{
		{"source", "source", false},
		{"destination", "destination", false},
		{"source-backend", "source", true},
		{"destination-backend", "destination", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			id := "wm-agent-" + tc.name
			p, _ := e.inject(id, fault{name: "seed-mid-round", phase: engine.PhaseSeed, more: midRound0, slow: true})
			pid := e.agentPID(id, tc.role)
			what := tc.role + " agent"
			if tc.backend {
				pid, what = e.backendPID(pid), tc.role+" agent's storage backend"
			}
			require.NoError(t, syscall.Kill(pid, syscall.SIGKILL))
			t.Logf("killed the %s (pid %d) mid round 0", what, pid)
			e.releaseGate(false)
			rep, code := p.report(t)
			if code != 0 {
				t.Logf("the migration did not complete (exit %d, %s in %s: %s); resuming", code, rep.Result, rep.Phase, rep.Error)
				assert.Contains(t, []string{"failed", "cancelled"}, rep.Result)
				assert.Equal(t, siteA, e.location(), "a failed migration leaves the VM at the source")
				if rep.Phase != "rolled_back" {
					rep, code = e.resume(id)
					require.Equal(t, 0, code, "resume: report %+v", rep)
				}
			}
			if rep.Result == "success" {
				assert.Equal(t, "ok", rep.Integrity)
				e.settled(siteB)
				// a killed process loses the round's in-flight state: up to
				// one round 0 (about half a fault-free run) is sent again
				e.assertLittleResent(1.6)
				return
			}
			e.settled(siteA)
		})
	}
}

// assertCBTRestored: a rolled-back migration leaves CBT on the VM's disks
// as it found it (off in the simulator's demo-vm).
func (e *env) assertCBTRestored() {
	e.t.Helper()
	recs, err := e.client(siteA).VDIGetAllRecords(e.t.Context())
	require.NoError(e.t, err)
	var on []string
	for _, r := range recs {
		if !r.IsASnapshot && len(r.VBDs) > 0 && r.CBTEnabled && !strings.Contains(r.NameLabel, "suspend") {
			on = append(on, fmt.Sprintf("%s (%s)", r.UUID, r.NameLabel))
		}
	}
	assert.Empty(e.t, on, "CBT restored to off on the VM's disks")
}

// TestXapiCallFails answers one of the controller's pool API calls with an
// HTTP error (the call never reaches the pool): a seed snapshot,
// VM.migrate_send itself, and the first call at every fault point. The
// migration then completes, or rolls back before Handoff (VM at the
// source), or stops failed with the VM in one place, and `migrate resume`
// completes it.
func TestXapiCallFails(t *testing.T) {
	faults := []fault{
		{name: "seed-snapshot", phase: engine.PhaseSeed, more: func(m string, _ *engine.Checkpoint) bool { return m == "VDI.snapshot" }},
		{name: "handoff-VM.migrate_send", phase: engine.PhaseHandoff, more: func(m string, _ *engine.Checkpoint) bool { return m == "Async.VM.migrate_send" }},
	}
	// and the first call at every fault point
	for _, f := range phaseFaults {
		f.name = "at-" + f.name
		faults = append(faults, f)
	}
	for _, f := range faults {
		t.Run(f.name, func(t *testing.T) {
			e := newEnv(t)
			id := "wm-xapi-" + strings.ReplaceAll(f.name, "VM.", "")
			p, m := e.inject(id, f)
			e.releaseGate(true)
			rep, code := p.report(t)
			t.Logf("after the failed %s: exit %d, %s in %s (%s)", m, code, rep.Result, rep.Phase, rep.Error)
			switch {
			case code == 0:
				assert.Equal(t, "success", rep.Result)
			case rep.Phase == "rolled_back":
				assert.Equal(t, "failed", rep.Result)
				e.settled(siteA)
				return
			default:
				require.Equal(t, "failed", rep.Phase, "report %+v", rep)
				where := e.location()
				if f.phase <= engine.PhaseHandoff {
					assert.Equal(t, siteA, where, "a failed handoff leaves the VM at the source")
				}
				e.guestVerify(where)
				rep, code = e.resume(id)
				require.Equal(t, 0, code, "resume: report %+v", rep)
			}
			assert.Equal(t, "success", rep.Result)
			assert.Equal(t, "ok", rep.Integrity)
			e.settled(siteB)
			e.assertLittleResent(1.5)
		})
	}
}
