package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

const nDisks = 2

// assertMovedClean checks the end state of a successful migration.
func assertMovedClean(t *testing.T, w *world, rep Report) {
	t.Helper()
	assertMovedCleanTasks(t, w, rep, 1)
}

func assertMovedCleanTasks(t *testing.T, w *world, rep Report, nTasks int) {
	t.Helper()
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.False(t, w.vmAtSource, "vm must be gone from the source")
	assert.True(t, w.vmAtDst, "vm must run at the destination")
	assert.Equal(t, 1, w.count("src.MigrateSend"), "VM.migrate_send exactly once")
	assert.Equal(t, nDisks*3, w.count("src.SnapshotVDI"), "one snapshot per disk per round (3 rounds)")
	assert.Equal(t, nDisks, w.count("dst.CreateVDI"), "one replica per disk")
	assert.Equal(t, nTasks, w.count("task.Create"), "xapi tasks")
	assert.Equal(t, 0, w.live("snapshot"), "all snapshots removed")
	assert.Equal(t, 0, w.live("replica"), "replicas removed after the move")
	assert.Equal(t, []bool{false, false}, w.srcCBT())
	assert.False(t, w.agentsUp)
	assert.False(t, w.gatewayUp)
	assert.True(t, w.netActive && w.netReleased && w.netCleaned)
	task := w.ourTasks[len(w.ourTasks)-1]
	assert.Equal(t, TaskSuccess, w.tasks[task].Status)
	assert.Equal(t, 1.0, w.tasks[task].Progress)
	assert.Equal(t, "OpaqueRef:dstvm", w.tasks[task].Result)
	assert.Equal(t, TaskLabel, w.taskLabel[task])
	assert.Equal(t, "OpaqueRef:vm1,OpaqueRef:srchost", w.taskOC[task]["applies_to"])
	assert.Equal(t, 3, rep.SeedRounds)
	assert.Equal(t, IntegrityOK, rep.Integrity)
	assert.Positive(t, rep.GuestWriteBytesPerSec, "measured by the delta rounds")
}

func TestRunSuccess(t *testing.T) {
	t.Parallel()
	w := newWorld()
	st, err := NewFileStore(t.TempDir())
	require.NoError(t, err)
	var progress []float64
	e := newEngine(t, w, st)
	e.d.Observe = func(p Progress) { progress = append(progress, p.Overall) }
	rep, err := e.Run(context.Background(), testRequest())
	require.NoError(t, err)
	assertMovedClean(t, w, rep)

	// the dest map reached xapi rewritten, path and query intact
	assert.Equal(t, "http://127.0.0.1:4002/services/SM?session_id=OpaqueRef%3Asess", w.migArgs.Dest["SM"])
	assert.Equal(t, "http://127.0.0.1:4001/", w.migArgs.Dest["master"])
	assert.Equal(t, "OpaqueRef:sess", w.migArgs.Dest["session_id"])
	assert.Equal(t, map[string]string{"OpaqueRef:vif0": "OpaqueRef:dstnet"}, w.migArgs.VIFMap)
	assert.Equal(t, map[string]string{"OpaqueRef:vdi0": "OpaqueRef:dstsr", "OpaqueRef:vdi1": "OpaqueRef:dstsr"}, w.migArgs.VDIMap)
	// each replica got the content_id of its disk's last snapshot before migrate_send
	cp, err := st.Load(context.Background(), "wm-test")
	require.NoError(t, err)
	for _, d := range cp.Disks {
		last := lastSnap(&d)
		require.NotNil(t, last)
		assert.Equal(t, 2, last.Round)
		assert.NotEmpty(t, last.ContentID)
		assert.Equal(t, last.ContentID, w.vdis[d.ReplicaRef].contentID)
	}
	// old snapshots were data-destroyed during Seed
	assert.Equal(t, nDisks*2, w.count("src.DataDestroyVDI"))

	// progress is monotonic and ends at 1
	require.NotEmpty(t, progress)
	for i := 1; i < len(progress); i++ {
		assert.GreaterOrEqual(t, progress[i], progress[i-1])
	}
	assert.Equal(t, 1.0, progress[len(progress)-1])

	// report
	assert.Equal(t, int64(5<<30/4), rep.BytesToMove)
	assert.Equal(t, int64(5*CBTBlockSize*nDisks), rep.ResidualBytes)
	assert.InDelta(t, 3.0, rep.CompressionRatio, 1e-9)
	var names []string
	for _, p := range rep.Phases {
		names = append(names, p.Name)
		assert.Greater(t, p.Seconds, 0.0, p.Name)
	}
	assert.Equal(t, []string{"plan", "prepare", "seed", "handoff", "switch", "verify", "cleanup"}, names)

	// Resume of a finished migration changes nothing.
	calls := w.count("src.MigrateSend")
	rep2, err := e.Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep2.Result)
	assert.Equal(t, calls, w.count("src.MigrateSend"))

	// A second Run with the same id is refused.
	_, err = e.Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrExists)
}

// lateStore is a FileStore on which another controller saves a checkpoint
// of the same id just before this one takes the lock.
type lateStore struct {
	*FileStore
	other *Checkpoint
	once  sync.Once
}

func (s *lateStore) Lock(ctx context.Context, id string) (func(), error) {
	s.once.Do(func() { _ = s.FileStore.Save(ctx, s.other) })
	return s.FileStore.Lock(ctx, id)
}

// Two controllers started with the same id: the one that takes the lock
// second must not overwrite the other's checkpoint, nor report on it.
func TestRunSameIDStartedElsewhere(t *testing.T) {
	t.Parallel()
	fs, err := NewFileStore(t.TempDir())
	require.NoError(t, err)
	other := &Checkpoint{Version: CheckpointVersion, MigrationID: "wm-test", Phase: PhaseSeed,
		Request: RequestState{VMUUID: "vm-uuid-1"}, Timings: map[string]float64{}}
	w := newWorld()
	rep, err := newEngine(t, w, &lateStore{FileStore: fs, other: other}).Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrExists)
	assert.Empty(t, rep.MigrationID, "no report of a migration that did not start")
	cp, err := fs.Load(context.Background(), "wm-test")
	require.NoError(t, err)
	assert.Equal(t, PhaseSeed, cp.Phase, "the other controller's checkpoint is intact")
	assert.Zero(t, w.count("task.Create"))
}

// saves counts the checkpoint saves of an undisturbed run.
func saves(t *testing.T) int {
	w := newWorld()
	hs := &hookStore{Store: mustStore(t)}
	_, err := newEngine(t, w, hs).Run(context.Background(), testRequest())
	require.NoError(t, err)
	return hs.n
}

func mustStore(t *testing.T) Store {
	st, err := NewFileStore(t.TempDir())
	require.NoError(t, err)
	return st
}

// TestCrashResumeAtEveryCheckpoint stops the controller right after each
// checkpoint of a full run (so in every phase and inside Seed rounds),
// drops the engine, and resumes with a new one from the store.
func TestCrashResumeAtEveryCheckpoint(t *testing.T) {
	t.Parallel()
	total := saves(t)
	require.Greater(t, total, 20)
	seen := map[Phase]bool{}
	for n := 1; n <= total; n++ {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			w := newWorld()
			inner := NewMemStore() // FileStore has its own tests; keep this loop fast
			var crashedIn Phase
			hs := &hookStore{Store: inner, after: func(i int, c *Checkpoint) error {
				if i == n {
					crashedIn = c.Phase
					return errCrash
				}
				return nil
			}}
			quiet := hclog.NewNullLogger()
			_, err := newEngineLog(t, w, hs, quiet).Run(context.Background(), testRequest())
			require.ErrorIs(t, err, ErrInterrupted)
			require.ErrorIs(t, err, errCrash)
			seen[crashedIn] = true
			rep, err := newEngineLog(t, w, inner, quiet).Resume(context.Background(), "wm-test")
			require.NoError(t, err, "resume after a crash in %s", crashedIn)
			assertMovedClean(t, w, rep)
		})
	}
	for _, p := range append(WorkPhases, PhaseDone) {
		assert.True(t, seen[p], "no crash point in phase %s", p)
	}
}

// TestCancelInEachPhase cancels through the xapi task (current_operations)
// as soon as the migration checkpoints a phase.
func TestCancelInEachPhase(t *testing.T) {
	t.Parallel()
	for _, p := range WorkPhases {
		t.Run(p.String(), func(t *testing.T) {
			t.Parallel()
			w := newWorld()
			hs := &hookStore{Store: mustStore(t), after: func(_ int, c *Checkpoint) error {
				if c.Phase == p {
					w.mu.Lock()
					w.cancelAll = true
					for _, tk := range w.ourTasks {
						w.tasks[tk].CurrentOperations["OpaqueRef:canceller"] = "cancel"
					}
					w.mu.Unlock()
				}
				return nil
			}}
			rep, err := newEngine(t, w, hs).Run(context.Background(), testRequest())
			if p < PhaseHandoff {
				require.ErrorIs(t, err, ErrCancelled)
				assert.Equal(t, ResultCancelled, rep.Result)
				assert.Equal(t, "rolled_back", rep.Phase)
				assert.True(t, w.vmAtSource, "vm untouched at the source")
				assert.False(t, w.vmAtDst)
				assert.Zero(t, w.count("src.MigrateSend"))
				assert.Zero(t, w.live("snapshot"), "snapshots removed")
				assert.Zero(t, w.live("replica"), "replicas destroyed")
				assert.Equal(t, []bool{false, false}, w.srcCBT(), "cbt back to its original state")
				assert.False(t, w.agentsUp)
				assert.False(t, w.gatewayUp)
				require.Len(t, w.ourTasks, 1)
				assert.Equal(t, TaskCancelled, w.tasks[w.ourTasks[0]].Status)
				assert.Less(t, w.tasks[w.ourTasks[0]].Progress, 1.0, "a rollback never shows 100 %")
				assert.Equal(t, "WANMOTION_MIGRATION_CANCELLED", w.tasks[w.ourTasks[0]].ErrorInfo[0])
				if w.netPrepared {
					assert.True(t, w.netCleaned)
				}
				assert.False(t, w.netActive)
			} else {
				require.NoError(t, err, "forward-only from handoff")
				assertMovedClean(t, w, rep)
			}
		})
	}
}

func TestEngineCancelMethod(t *testing.T) {
	t.Parallel()
	w := newWorld()
	var e *Engine
	hs := &hookStore{Store: mustStore(t), after: func(_ int, c *Checkpoint) error {
		if c.Phase == PhaseSeed && len(c.Seed.Rounds) == 1 {
			assert.True(t, e.Cancel("wm-test"))
		}
		return nil
	}}
	e = newEngine(t, w, hs)
	assert.False(t, e.Cancel("wm-test"), "not running yet")
	rep, err := e.Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrCancelled)
	assert.Equal(t, ResultCancelled, rep.Result)
	assert.True(t, w.vmAtSource)
	assert.Zero(t, w.live("replica"))
}

func TestMigrateSendFailureKeepsVMAtSourceAndReplica(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.MigrateSendF = func(MigrateArgs) []string { return []string{"MIRROR_FAILED", "OpaqueRef:vdi0"} }
	st := mustStore(t)
	e := newEngine(t, w, st)
	rep, err := e.Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrHandoffFailed)
	var pe *PhaseError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, PhaseHandoff, pe.Phase)
	assert.Equal(t, ResultFailed, rep.Result)
	assert.Contains(t, rep.Error, "MIRROR_FAILED")
	assert.True(t, w.vmAtSource, "vm keeps running at the source")
	assert.False(t, w.vmAtDst)
	assert.Equal(t, nDisks, w.live("replica"), "replicas kept for a retry")
	assert.Equal(t, nDisks*3, w.live("snapshot"), "snapshot chain kept (older ones data-destroyed)")
	assert.Equal(t, TaskFailure, w.tasks[w.ourTasks[0]].Status)
	assert.Contains(t, w.tasks[w.ourTasks[0]].ErrorInfo, "handoff")

	// retry: only the handoff is repeated; seeding is not redone
	w.MigrateSendF = nil
	snaps := w.count("src.SnapshotVDI")
	rep, err = e.Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Equal(t, snaps, w.count("src.SnapshotVDI"))
	assert.Equal(t, 2, w.count("src.MigrateSend"))
	assert.Equal(t, 2, w.count("task.Create"), "a fresh task for the retry")
	assert.Equal(t, TaskSuccess, w.tasks[w.ourTasks[1]].Status)
	assert.True(t, w.vmAtDst)
	assert.Zero(t, w.live("replica"))
	assert.Zero(t, w.live("snapshot"))
}

// A guest throttle stays on through VM.migrate_send and is removed when
// the send fails with the VM still at the source.
func TestThrottleKeptThroughHandoffReleasedOnFailure(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.ChangedBlocks = func(int) int { return 1 << 16 }
	req := testRequest()
	pol, rounds := PolicyThrottle, 2
	req.Overrides.Policy, req.Overrides.MaxRounds = &pol, &rounds
	req.Link.BandwidthBytesPerSec = 10_000_000
	throttledAtSend := -1
	w.MigrateSendF = func(MigrateArgs) []string {
		throttledAtSend = w.throttle
		return []string{"MIRROR_FAILED", "OpaqueRef:vdi0"}
	}
	e := newEngine(t, w, mustStore(t))
	rep, err := e.Run(context.Background(), req)
	require.ErrorIs(t, err, ErrHandoffFailed)
	assert.Equal(t, 20, throttledAtSend, "the guest stays throttled during VM.migrate_send")
	assert.True(t, w.vmAtSource)
	assert.Equal(t, 1, w.released, "the failed handoff gave the guest its CPU back")
	assert.Zero(t, w.throttle)
	assert.Equal(t, 20, rep.GuestThrottlePercent, "round 1 throttled; round 2 reached the cap of 2")

	// the retry throttles the guest again for its VM.migrate_send, and the
	// cleanup after the move finds nothing to release at the source
	throttledAtSend = -1
	w.MigrateSendF = func(MigrateArgs) []string {
		throttledAtSend = w.throttle
		return nil
	}
	rep, err = e.Resume(context.Background(), rep.MigrationID)
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Equal(t, 20, throttledAtSend, "throttled again for the retried send")
	assert.Equal(t, []int{20, 20}, w.throttleSeen)
}

func TestAbortAfterFailedHandoff(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.disks[0].CBTEnabled = true // CBT was on before us (a backup tool)
	w.vdis["OpaqueRef:vdi0"].cbt = true
	w.MigrateSendF = func(MigrateArgs) []string { return []string{"INTERNAL_ERROR"} }
	e := newEngine(t, w, mustStore(t))
	_, err := e.Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrHandoffFailed)
	rep, err := e.Abort(context.Background(), "wm-test")
	require.ErrorIs(t, err, ErrCancelled)
	assert.Equal(t, ResultCancelled, rep.Result)
	assert.True(t, w.vmAtSource)
	assert.Zero(t, w.live("replica"))
	assert.Zero(t, w.live("snapshot"))
	assert.Equal(t, []bool{true, false}, w.srcCBT(), "cbt restored to the original state")
}

// A handoff step that fails on our side (polling the task) while xapi's
// VM.migrate_send is still moving the VM must not roll back under it: Abort
// refuses, and Resume follows the same task instead of sending again.
func TestHandoffPollErrorWhileMigrateSendRuns(t *testing.T) {
	t.Parallel()
	w := newWorld()
	var down atomic.Bool // the source pool's API stays unreachable
	down.Store(true)
	w.Hook = func(m string) error {
		if m == "task.Record" && w.count("src.MigrateSend") == 1 && down.Load() {
			return errors.New("connection reset by peer")
		}
		return nil
	}
	e := newEngine(t, w, mustStore(t))
	rep, err := e.Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrVMLocation)
	down.Store(false)
	assert.Equal(t, ResultFailed, rep.Result)
	assert.Contains(t, rep.Error, "still running")
	assert.True(t, w.vmAtSource, "the fake migrate_send has not finished")

	_, err = e.Abort(context.Background(), "wm-test")
	require.ErrorIs(t, err, ErrVMLocation, "no rollback while migrate_send moves the vm")
	assert.Positive(t, w.live("replica"), "replicas kept for the running migrate_send")

	rep, err = e.Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Equal(t, 1, w.count("src.MigrateSend"), "the running task was followed, not sent again")
	assert.True(t, w.vmAtDst)
}

func TestHandoffErrorButVMArrived(t *testing.T) {
	t.Parallel()
	w := newWorld()
	// the task vanishes (xapi restarted) after the VM moved
	w.Hook = func(m string) error {
		if m == "task.Record" && !w.vmAtSource {
			return fmt.Errorf("task: %w", ErrNotFound)
		}
		return nil
	}
	// move the VM on migrate_send directly
	w.MigrateSendF = nil
	e := newEngine(t, w, mustStore(t))
	hs := e.d.Store
	_ = hs
	origHook := w.Hook
	w.Hook = func(m string) error {
		if m == "src.MigrateSend" {
			w.mu.Lock()
			w.vmAtSource, w.vmAtDst, w.vmDstRef = false, true, "OpaqueRef:dstvm"
			w.mu.Unlock()
		}
		return origHook(m)
	}
	rep, err := e.Run(context.Background(), testRequest())
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Equal(t, 1, w.count("src.MigrateSend"))
}

func TestSeedFailureRollsBack(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.SyncFail = func(s SyncSpec) bool { return s.Round == 1 }
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.Error(t, err)
	assert.NotErrorIs(t, err, ErrCancelled)
	assert.Equal(t, ResultFailed, rep.Result)
	assert.Equal(t, "rolled_back", rep.Phase)
	assert.Contains(t, rep.Error, "injected failure")
	assert.True(t, w.vmAtSource)
	assert.Zero(t, w.live("replica"))
	assert.Zero(t, w.live("snapshot"))
	assert.Equal(t, nDisks, w.count("st.Abort"))
	assert.Equal(t, TaskFailure, w.tasks[w.ourTasks[0]].Status)
}

func TestPrepareFailureRollsBack(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.Hook = func(m string) error {
		if m == "st.PrepareSender" {
			return errors.New("no route to agent")
		}
		return nil
	}
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.Error(t, err)
	assert.Equal(t, ResultFailed, rep.Result)
	assert.Zero(t, w.live("replica"))
	assert.Zero(t, w.count("src.SnapshotVDI"))
	assert.True(t, w.vmAtSource)
	assert.False(t, w.agentsUp, "the rollback stopped the agents")
}

// TestAgentsStartFailureStopsAgents: Agents.Start fails after launching
// one agent (the destination agent runs, the source agent or a backend did
// not start): the rollback still calls Agents.Stop, also when the
// controller crashed in between and a successor rolls back.
func TestAgentsStartFailureStopsAgents(t *testing.T) {
	t.Parallel()
	for _, crash := range []bool{false, true} {
		t.Run(fmt.Sprintf("crash=%v", crash), func(t *testing.T) {
			w := newWorld()
			w.Hook = func(m string) error {
				if m == "agents.Start" {
					return errors.New("source agent: backend storage-nbd exited")
				}
				return nil
			}
			st := mustStore(t)
			var store Store = st
			if crash {
				// The controller dies right after the rollback is decided.
				store = &hookStore{Store: st, after: func(_ int, c *Checkpoint) error {
					if c.Phase == PhaseRollingBack {
						return errHalt
					}
					return nil
				}}
			}
			rep, err := newEngine(t, w, store).Run(context.Background(), testRequest())
			require.Error(t, err)
			if crash {
				require.True(t, w.agentsUp, "the crash left the agent running")
				w.Hook = nil
				rep, err = newEngine(t, w, st).Resume(context.Background(), "wm-test")
				require.Error(t, err, "the resumed rollback reports the original failure")
			}
			assert.Equal(t, ResultFailed, rep.Result)
			assert.Equal(t, "rolled_back", rep.Phase)
			assert.False(t, w.agentsUp, "no agent left running")
			assert.Equal(t, 1, w.count("agents.Stop"))
			assert.True(t, w.vmAtSource)
		})
	}
}

func TestConvergencePolicies(t *testing.T) {
	t.Parallel()
	diverging := func(w *world) { w.ChangedBlocks = func(int) int { return 1 << 16 } } // 4 GiB per round
	cases := []struct {
		name       string
		policy     ConvergencePolicy
		wantErr    error
		result     string
		throttle   bool
		noThrottle bool // no GuestThrottle wired in (the CLI today)
	}{
		{"stop", PolicyStop, ErrNotConverging, ResultFailed, false, false},
		{"throttle", PolicyThrottle, nil, ResultSuccess, true, false},
		{"throttle unavailable", PolicyThrottle, ErrConfig, ResultFailed, false, true},
		{"keep-going", PolicyKeepGoing, nil, ResultSuccess, false, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newWorld()
			diverging(w)
			req := testRequest()
			pol, rounds := tc.policy, 3
			req.Overrides.Policy, req.Overrides.MaxRounds = &pol, &rounds
			req.Link.BandwidthBytesPerSec = 10_000_000 // 10 MB/s: the guest out-writes it
			eng := newEngine(t, w, mustStore(t))
			if tc.noThrottle {
				eng.d.Throttle = nil
			}
			rep, err := eng.Run(context.Background(), req)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				if tc.noThrottle {
					assert.Contains(t, err.Error(), "has no guest throttle; choose keep-going or stop")
					assert.Zero(t, w.count("st.SyncRound"), "refused while planning, before any copy")
				} else {
					assert.Contains(t, err.Error(), "raise the bandwidth")
					assert.Contains(t, err.Error(), "convergence_policy keep-going", "advice names a policy that works")
				}
				assert.True(t, w.vmAtSource)
				assert.Zero(t, w.live("replica"))
			} else {
				require.NoError(t, err)
				assert.Equal(t, 4, rep.SeedRounds, "round 0 + the cap of 3 delta rounds")
			}
			assert.Equal(t, tc.result, rep.Result)
			assert.Equal(t, tc.throttle, w.count("throttle") > 0)
			if tc.throttle {
				// round 0, then delta rounds 1 and 2 out-write the link
				// (throttle 20%, then 30%), delta round 3 hits the cap.
				assert.Equal(t, []int{20, 30}, w.throttleSeen)
				assert.Equal(t, 1, w.released, "released once, in cleanup (kept through the handoff)")
				assert.Zero(t, w.throttle)
				assert.Equal(t, 30, rep.GuestThrottlePercent)
				require.Len(t, rep.Rounds, 4)
				assert.Equal(t, []int{0, 0, 20, 30}, []int{rep.Rounds[0].ThrottlePercent, rep.Rounds[1].ThrottlePercent, rep.Rounds[2].ThrottlePercent, rep.Rounds[3].ThrottlePercent})
			}
		})
	}
}

// The cap to put back is checkpointed before the first throttle: a
// throttle call that fails after it may have reached the host (the answer
// lost) still gets the original cap restored when the migration stops.
func TestThrottleFailureStillReleases(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.ChangedBlocks = func(int) int { return 1 << 16 }
	req := testRequest()
	pol := PolicyThrottle
	req.Overrides.Policy = &pol
	req.Link.BandwidthBytesPerSec = 10_000_000
	w.Hook = func(m string) error {
		if m == "throttle" {
			return errors.New("host.call_plugin: connection reset")
		}
		return nil
	}
	eng := newEngine(t, w, mustStore(t))
	rep, err := eng.Run(context.Background(), req)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "connection reset")
	assert.Equal(t, PhaseRolledBack.String(), rep.Phase, "a failed seed rolls back")
	assert.Equal(t, 1, w.count("throttle.read"))
	assert.Equal(t, 1, w.released, "the original cap (50, read before the throttle) is put back")
	assert.True(t, w.vmAtSource)
}

// Someone else changing the guest's cap while it is throttled: wanmotion
// leaves the cap alone, throttles no more, and the migration goes on.
func TestThrottleConflictLeavesTheCap(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.ChangedBlocks = func(int) int { return 1 << 16 }
	req := testRequest()
	pol, rounds := PolicyThrottle, 4
	req.Overrides.Policy, req.Overrides.MaxRounds = &pol, &rounds
	req.Link.BandwidthBytesPerSec = 10_000_000
	throttles := 0
	w.Hook = func(m string) error {
		if m == "throttle" {
			throttles++
			if throttles == 2 {
				return fmt.Errorf("host h1: %w: expect_cap 160, cap is 30", ErrThrottleConflict)
			}
		}
		return nil
	}
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Equal(t, 2, throttles, "no step after the conflict")
	assert.Zero(t, w.count("throttle.release"), "the cap someone else set is left alone")
	assert.Equal(t, 20, rep.GuestThrottlePercent)
}

// Policy throttle is refused while planning when the throttle cannot work
// on this VM (no host plugin, no xl, a scheduler without a cap).
func TestThrottleCheckedWhilePlanning(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.Hook = func(m string) error {
		if m == "throttle.check" {
			return errors.New("the wanmotion host plugin is not installed on host-a")
		}
		return nil
	}
	req := testRequest()
	pol := PolicyThrottle
	req.Overrides.Policy = &pol
	eng := newEngine(t, w, mustStore(t))
	_, err := eng.Plan(context.Background(), req)
	require.ErrorIs(t, err, ErrConfig)
	assert.Contains(t, err.Error(), "cannot slow this guest: the wanmotion host plugin is not installed on host-a; fix that or choose keep-going or stop")
	rep, err := eng.Run(context.Background(), req)
	require.ErrorIs(t, err, ErrConfig)
	assert.Equal(t, ResultFailed, rep.Result)
	assert.Zero(t, w.count("st.SyncRound"))
	assert.True(t, w.vmAtSource)
	// other policies do not need it
	kg := PolicyKeepGoing
	req.Overrides.Policy = &kg
	_, err = eng.Plan(context.Background(), req)
	require.NoError(t, err)
}

// A migration cancelled while the guest is throttled gives the guest its
// CPU back in the rollback, and a failing release is reported, retried by
// a resume of the cleanup, and never lost.
func TestThrottleReleasedOnRollback(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.ChangedBlocks = func(int) int { return 1 << 16 }
	req := testRequest()
	pol, rounds := PolicyThrottle, 5
	req.Overrides.Policy, req.Overrides.MaxRounds = &pol, &rounds
	req.Link.BandwidthBytesPerSec = 10_000_000
	store := mustStore(t)
	eng := newEngine(t, w, store)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	// cancel the migration after its second throttle; fail the first release
	throttles, releaseFails := 0, 1
	w.Hook = func(m string) error {
		switch m {
		case "throttle":
			throttles++
			if throttles == 2 {
				w.mu.Lock()
				w.cancelAll = true
				for _, tk := range w.ourTasks {
					w.tasks[tk].CurrentOperations["OpaqueRef:c"] = "cancel"
				}
				w.mu.Unlock()
			}
		case "throttle.release":
			if releaseFails > 0 {
				releaseFails--
				return errors.New("xl: connection refused")
			}
		}
		return nil
	}
	rep, err := eng.Run(ctx, req)
	require.Error(t, err)
	assert.Equal(t, []int{20, 30}, w.throttleSeen)
	assert.True(t, w.vmAtSource)
	if w.released == 0 {
		// the first release failed: the rollback stops with the throttle
		// recorded; a resume finishes it.
		assert.Contains(t, err.Error(), "remove guest throttle")
		rep, err = eng.Resume(ctx, rep.MigrationID)
		require.ErrorIs(t, err, ErrCancelled)
	}
	assert.Equal(t, 1, w.released)
	assert.Zero(t, w.throttle)
	assert.Equal(t, ResultCancelled, rep.Result)
}

func TestUnknownBackendNamesInstalled(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.srcOC[KeyStorage] = "zfs-send"
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrUnknownBackend)
	assert.Contains(t, err.Error(), `"zfs-send"`)
	assert.Contains(t, err.Error(), "nbd, drbd")
	assert.Equal(t, ResultFailed, rep.Result)
	assert.Zero(t, w.count("agents.Start"))
}

func TestDryRunPlanHasNoSideEffects(t *testing.T) {
	t.Parallel()
	w := newWorld()
	e := newEngine(t, w, mustStore(t))
	p, err := e.Plan(context.Background(), testRequest())
	require.NoError(t, err)
	assert.Equal(t, "demo-vm", p.VMName)
	assert.Len(t, p.Disks, nDisks)
	assert.Equal(t, int64(5<<30/4), p.Estimate.BytesToMove)
	assert.Greater(t, p.Estimate.TotalSeconds, p.Estimate.SeedSeconds)
	assert.Contains(t, p.Text(), "estimated total")
	assert.Contains(t, p.Text(), "-> SR "+p.Disks[0].DestSR, "without labels the ref is printed")
	p.SRLabels = map[string]string{p.Disks[0].DestSR: "fast (uuid-1)"}
	assert.Contains(t, p.Text(), "-> SR fast (uuid-1)")
	for _, m := range []string{"task.Create", "agents.Start", "dst.CreateVDI", "src.SnapshotVDI", "src.EnableCBT"} {
		assert.Zero(t, w.count(m), m)
	}
	assert.Equal(t, 1, w.count("src.AssertCanMigrate"))
	ids, err := e.d.Store.List(context.Background())
	require.NoError(t, err)
	assert.Empty(t, ids)
}

func TestContextCancelInterruptsAndResumes(t *testing.T) {
	t.Parallel()
	w := newWorld()
	inner := mustStore(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	hs := &hookStore{Store: inner, after: func(_ int, c *Checkpoint) error {
		if c.Phase == PhaseSeed && len(c.Seed.Rounds) == 1 {
			cancel()
		}
		return nil
	}}
	_, err := newEngine(t, w, hs).Run(ctx, testRequest())
	require.ErrorIs(t, err, ErrInterrupted)
	assert.True(t, w.vmAtSource)
	assert.Equal(t, nDisks, w.live("replica"), "an interruption is not a rollback")
	rep, err := newEngine(t, w, inner).Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assertMovedClean(t, w, rep)
}

func TestReportJSONFields(t *testing.T) {
	t.Parallel()
	w := newWorld()
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.NoError(t, err)
	b, err := rep.JSON()
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(b, &m))
	for _, k := range []string{"migration_id", "vm_uuid", "result", "phases", "seed_rounds", "bytes_to_move",
		"bytes_on_wire", "residual_bytes", "guest_pause_ms", "integrity"} {
		assert.Contains(t, m, k)
	}
	assert.Equal(t, "wm-test", m["migration_id"])
	assert.Equal(t, "success", m["result"])
	assert.Equal(t, "ok", m["integrity"])
	assert.EqualValues(t, 3, m["seed_rounds"])
	phases := m["phases"].([]any)
	require.Len(t, phases, 7)
	assert.Equal(t, "plan", phases[0].(map[string]any)["name"])
	assert.Contains(t, phases[0].(map[string]any), "seconds")
	assert.Contains(t, rep.Text(), "SUCCESS")
}

func TestSecondControllerIsRefused(t *testing.T) {
	t.Parallel()
	w := newWorld()
	st := mustStore(t)
	var second error
	tried := false
	hs := &hookStore{Store: st, after: func(_ int, c *Checkpoint) error {
		if c.Phase == PhaseSeed && !tried {
			tried = true
			_, second = newEngine(t, w, st).Resume(context.Background(), "wm-test")
		}
		return nil
	}}
	// hookStore hides the Locker of the FileStore: lock through the inner store
	e := newEngine(t, w, lockingStore{hs, st.(*FileStore)})
	rep, err := e.Run(context.Background(), testRequest())
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	require.ErrorIs(t, second, ErrLocked)
	assert.Equal(t, 1, w.count("src.MigrateSend"))
}

type lockingStore struct {
	Store
	l Locker
}

func (s lockingStore) Lock(ctx context.Context, id string) (func(), error) { return s.l.Lock(ctx, id) }

func TestSyncRetriedAfterAgentLoss(t *testing.T) {
	t.Parallel()
	w := newWorld()
	failed := 0
	w.SyncFail = func(s SyncSpec) bool {
		if s.Round == 1 && s.Key.DiskID == "vdi-uuid-0" && failed < 2 {
			failed++
			return true
		}
		return false
	}
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.NoError(t, err)
	assertMovedClean(t, w, rep)
	assert.Equal(t, 2, failed)
	assert.Equal(t, 2*nDisks, w.count("st.RecoverSender"), "re-attached after each failure")
	assert.Equal(t, []int{0, 1, 2}, w.applied[DiskKey{"wm-test", "vdi-uuid-0"}], "no round re-applied after it succeeded")
	assert.Equal(t, []int{0, 1, 2}, w.applied[DiskKey{"wm-test", "vdi-uuid-1"}])
}

func TestCancelDuringLongSync(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.SyncBlock = func(s SyncSpec) bool {
		if s.Round == 1 {
			w.cancelAll = true
			for _, tk := range w.ourTasks {
				w.tasks[tk].CurrentOperations["OpaqueRef:c"] = "cancel"
			}
			return true
		}
		return false
	}
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrCancelled)
	assert.Equal(t, "migration cancelled", err.Error(), "the cause is not repeated")
	assert.Equal(t, ResultCancelled, rep.Result)
	assert.True(t, w.vmAtSource)
	assert.Zero(t, w.live("replica"))
	assert.Zero(t, w.live("snapshot"))
	// the report of a rolled-back migration keeps what crossed the link
	// (read before the gateway stopped) and claims no residual delta.
	assert.Equal(t, int64(1<<30), rep.BytesOnWire)
	assert.Zero(t, rep.ResidualBytes)
	assert.Zero(t, rep.GuestPauseMS, "the guest was never paused")
	assert.Contains(t, rep.Text(), "guest pause:     none (rolled back)")
	assert.Positive(t, rep.Estimate.DowntimeSeconds, "the plan's estimate stays in estimate")
}

// The controller dies after VM.migrate_send returned but before its task
// ref was checkpointed: the resumed engine adopts the running task from the
// VM's current_operations instead of sending again.
func TestResumeAdoptsRunningMigrateSend(t *testing.T) {
	t.Parallel()
	w := newWorld()
	inner := NewMemStore()
	hs := &hookStore{Store: inner, before: func(c *Checkpoint) error {
		if c.Handoff.Task != "" && c.Phase == PhaseHandoff && !c.Handoff.Done {
			return errCrash
		}
		return nil
	}}
	_, err := newEngine(t, w, hs).Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrInterrupted)
	require.Equal(t, 1, w.count("src.MigrateSend"))
	rep, err := newEngine(t, w, inner).Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assertMovedClean(t, w, rep)
}

func TestForwardFailureThenResume(t *testing.T) {
	t.Parallel()
	w := newWorld()
	n := 0
	w.Hook = func(m string) error {
		if m == "net.Release" && n == 0 {
			n++
			return errors.New("source host unreachable")
		}
		return nil
	}
	e := newEngine(t, w, mustStore(t))
	rep, err := e.Run(context.Background(), testRequest())
	require.Error(t, err)
	var pe *PhaseError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, PhaseSwitch, pe.Phase)
	assert.Equal(t, "failed", rep.Phase)
	assert.True(t, w.vmAtDst, "forward-only: the vm stays at the destination")
	_, err = e.Abort(context.Background(), "wm-test")
	require.ErrorIs(t, err, ErrNotResumable, "no rollback after the vm moved")
	rep, err = e.Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assertMovedCleanTasks(t, w, rep, 2)
}

func TestAdoptsGivenTask(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.tasks["OpaqueRef:plugintask"] = &TaskRecord{Status: TaskPending, CurrentOperations: map[string]string{}}
	w.taskOC["OpaqueRef:plugintask"] = map[string]string{}
	req := testRequest()
	req.TaskRef = "OpaqueRef:plugintask"
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), req)
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Zero(t, w.count("task.Create"))
	assert.Equal(t, TaskSuccess, w.tasks["OpaqueRef:plugintask"].Status)
	assert.Equal(t, "OpaqueRef:vm1,OpaqueRef:srchost", w.taskOC["OpaqueRef:plugintask"]["applies_to"])
}

// TestCrashDuringRollback cancels in Seed, then crashes the controller
// after each checkpoint of the rollback and resumes.
func TestCrashDuringRollback(t *testing.T) {
	t.Parallel()
	cancelIn := func(w *world) func(int, *Checkpoint) error {
		return func(_ int, c *Checkpoint) error {
			if c.Phase == PhaseSeed && len(c.Seed.Rounds) == 1 {
				w.mu.Lock()
				w.cancelAll = true
				for _, tk := range w.ourTasks {
					w.tasks[tk].CurrentOperations["OpaqueRef:c"] = "cancel"
				}
				w.mu.Unlock()
			}
			return nil
		}
	}
	quiet := hclog.NewNullLogger()
	w0 := newWorld()
	base := &hookStore{Store: NewMemStore()}
	base.after = cancelIn(w0)
	_, err := newEngineLog(t, w0, base, quiet).Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrCancelled)
	total := base.n
	crashes := 0
	for n := 1; n <= total; n++ {
		w := newWorld()
		inner := NewMemStore()
		hs := &hookStore{Store: inner}
		cancel := cancelIn(w)
		crashed := false
		hs.after = func(i int, c *Checkpoint) error {
			_ = cancel(i, c)
			if i == n && (c.Phase == PhaseRollingBack || c.Phase == PhaseRolledBack) {
				crashed = true
				return errCrash
			}
			return nil
		}
		_, err := newEngineLog(t, w, hs, quiet).Run(context.Background(), testRequest())
		if !crashed {
			continue
		}
		crashes++
		require.ErrorIs(t, err, ErrInterrupted)
		rep, err := newEngineLog(t, w, inner, quiet).Resume(context.Background(), "wm-test")
		require.ErrorIs(t, err, ErrCancelled, "crash point %d", n)
		assert.Equal(t, ResultCancelled, rep.Result)
		assert.True(t, w.vmAtSource)
		assert.Zero(t, w.live("replica"))
		assert.Zero(t, w.live("snapshot"))
		assert.Equal(t, []bool{false, false}, w.srcCBT())
		assert.False(t, w.agentsUp)
		assert.Equal(t, TaskCancelled, w.tasks[w.ourTasks[0]].Status)
		assert.Equal(t, 1, w.count("task.Create"))
		assert.Zero(t, w.count("src.MigrateSend"))
	}
	assert.Greater(t, crashes, 5)
}

// TestCrashBeforeCheckpointAtEverySave stops the controller just before
// each checkpoint is written (so the side effect it records happened but is
// not in the store) and resumes: with the finder interfaces, nothing is
// created twice.
func TestCrashBeforeCheckpointAtEverySave(t *testing.T) {
	t.Parallel()
	total := saves(t)
	quiet := hclog.NewNullLogger()
	for n := 1; n <= total; n++ {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			w := newWorld()
			inner := NewMemStore()
			i := 0
			hs := &hookStore{Store: inner, before: func(c *Checkpoint) error {
				i++
				if i == n {
					return errCrash
				}
				return nil
			}}
			_, err := newEngineLog(t, w, hs, quiet).Run(context.Background(), testRequest())
			require.ErrorIs(t, err, ErrInterrupted)
			_, lerr := inner.Load(context.Background(), "wm-test")
			if errors.Is(lerr, ErrNotFound) {
				return // crashed before the first checkpoint: nothing happened
			}
			rep, err := newEngineLog(t, w, inner, quiet).Resume(context.Background(), "wm-test")
			require.NoError(t, err)
			assertMovedClean(t, w, rep)
		})
	}
}

// A short blip of the source pool's API while Handoff follows xapi's
// VM.migrate_send task is ridden out: the migration completes without a
// second migrate_send and without the operator having to resume.
func TestHandoffPollSurvivesTransientErrors(t *testing.T) {
	t.Parallel()
	w := newWorld()
	var mu sync.Mutex
	failed := 0
	w.Hook = func(m string) error {
		if m != "task.Record" || w.count("src.MigrateSend") == 0 {
			return nil
		}
		mu.Lock()
		defer mu.Unlock()
		if failed < handoffPollAttempts-1 {
			failed++
			return errors.New("connection reset by peer")
		}
		return nil
	}
	rep, err := newEngine(t, w, mustStore(t)).Run(context.Background(), testRequest())
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	assert.Equal(t, handoffPollAttempts-1, failed, "the blip really happened")
	assert.Equal(t, 1, w.count("src.MigrateSend"))
	assert.True(t, w.vmAtDst)
	assert.False(t, w.vmAtSource)
}
