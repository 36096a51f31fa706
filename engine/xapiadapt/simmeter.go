package xapiadapt

// Simulator-only measurements. A real xapi does not record the guest's
// pause or keep a shadow of the guest's writes; against it these report
// "not measured" (PauseMeter) or an error (IntegrityChecker), which the
// engine turns into an estimated pause and integrity "skipped".

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

// SimPauseKey is the destination VM's other_config key where xapisim
// records the guest pause of its last migration, in milliseconds.
const SimPauseKey = "sim:migration_pause_ms"

// ErrNotSimulator: the pool does not have the simulator's extra methods.
var ErrNotSimulator = errors.New("not the xapi simulator")

// SimPauseMeter implements engine.PauseMeter from what xapisim records:
// sim.last_migration (result success, pause_ms) and, failing that, the
// destination VM's other_config["sim:migration_pause_ms"].
type SimPauseMeter struct {
	Dest *xapi.Client
}

var _ engine.PauseMeter = SimPauseMeter{}

// GuestPause implements engine.PauseMeter.
func (m SimPauseMeter) GuestPause(ctx context.Context, _ string, vmUUID string) (time.Duration, bool, error) {
	var last map[string]string
	err := m.Dest.CallInto(ctx, &last, "sim.last_migration", vmUUID)
	switch {
	case err == nil && last["result"] == "success" && last["kind"] == "migrate_send":
		if ms, perr := strconv.ParseInt(last["pause_ms"], 10, 64); perr == nil && ms >= 0 {
			return time.Duration(ms) * time.Millisecond, true, nil
		}
	case err != nil && !xapi.IsCode(err, xapi.CodeMessageMethodUnknown):
		return 0, false, fmt.Errorf("sim.last_migration: %w", mapErr(err))
	}
	ref, err := m.Dest.VMGetByUUID(ctx, vmUUID)
	if err != nil {
		return 0, false, fmt.Errorf("VM.get_by_uuid: %w", mapErr(err))
	}
	rec, err := m.Dest.VMGetRecord(ctx, ref)
	if err != nil {
		return 0, false, fmt.Errorf("VM.get_record: %w", mapErr(err))
	}
	v, ok := rec.OtherConfig[SimPauseKey]
	if !ok {
		return 0, false, nil
	}
	ms, err := strconv.ParseInt(v, 10, 64)
	if err != nil || ms < 0 {
		return 0, false, fmt.Errorf("%s %q: not a number of milliseconds", SimPauseKey, v)
	}
	return time.Duration(ms) * time.Millisecond, true, nil
}

// SimIntegrity implements engine.IntegrityChecker with xapisim's
// sim.guest_verify: the simulated guest keeps a shadow copy of everything
// it wrote, and the check compares every disk of the VM, where it now runs
// (the destination), byte for byte with that shadow. It needs a guest
// workload started on the VM (sim.guest_start); without one, or against a
// real xapi, it returns an error and the engine reports "skipped".
//
// The simulator does not record a hash of the source disks at pause time,
// so a SHA-256 comparison of source and destination is not possible
// after the source VM is gone; the shadow comparison is stronger (it
// covers writes made during the move).
type SimIntegrity struct {
	Dest *xapi.Client
}

var _ engine.IntegrityChecker = SimIntegrity{}

// Check implements engine.IntegrityChecker.
func (s SimIntegrity) Check(ctx context.Context, req engine.IntegrityRequest) (bool, error) {
	var res map[string]string
	if err := s.Dest.CallInto(ctx, &res, "sim.guest_verify", req.VMUUID); err != nil {
		if xapi.IsCode(err, xapi.CodeMessageMethodUnknown) {
			return false, fmt.Errorf("integrity check: %w", ErrNotSimulator)
		}
		return false, mapErr(err) // the xapi error names the method
	}
	if n, _ := strconv.Atoi(res["disks"]); n == 0 {
		return false, errors.New("sim.guest_verify: the guest wrote to no disk; nothing to compare")
	}
	return res["ok"] == "true", nil
}
