package engine

import (
	"context"
	"errors"
	"fmt"
	"strings"
)

func (r *run) stepHandoff(ctx context.Context) (Phase, error) {
	cp := r.cp
	h := &cp.Handoff
	if err := r.ensureAttached(ctx); err != nil {
		return PhaseHandoff, err
	}
	_ = r.checkCancel(ctx) // logged and ignored: forward-only
	// A guest throttle stays on through VM.migrate_send: xapi mirrors the
	// guest's writes and copies its memory now, and a slower guest makes
	// that shorter. The destination domain is built without it; a failed
	// handoff removes it (failure handling), cleanup marks it gone.
	if h.StartNano == 0 {
		h.StartNano = r.d.Now().UnixNano()
	}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		if !d.Finalized {
			st, err := r.d.Storage.Finalize(ctx, r.key(d))
			if err != nil {
				return PhaseHandoff, fmt.Errorf("finalize replica of %s: %w", d.Disk.VDIUUID, err)
			}
			if st != nil {
				d.ReceiverState = st
			}
			d.Finalized = true
			if err := r.save(ctx); err != nil {
				return PhaseHandoff, err
			}
		}
		if !d.ContentIDSet {
			s := lastSnap(d)
			if s == nil || s.ContentID == "" {
				return PhaseHandoff, fmt.Errorf("disk %s has no seeded snapshot", d.Disk.VDIUUID)
			}
			if err := r.d.Dest.SetVDIContentID(ctx, d.ReplicaRef, s.ContentID); err != nil {
				return PhaseHandoff, fmt.Errorf("set replica content_id of %s: %w", d.Disk.VDIUUID, err)
			}
			d.ContentIDSet = true
			if err := r.save(ctx); err != nil {
				return PhaseHandoff, err
			}
		}
		if !d.CBTDisabled && (d.CBTEnabled || d.CBTWasEnabled) {
			if err := r.d.Source.DisableCBT(ctx, d.Disk.VDIRef); err != nil {
				return PhaseHandoff, fmt.Errorf("disable cbt on %s: %w", d.Disk.VDIUUID, err)
			}
			d.CBTDisabled = true
			if err := r.save(ctx); err != nil {
				return PhaseHandoff, err
			}
		}
	}
	if !h.Done && h.Task == "" && h.SendIntent {
		// A previous run stopped around VM.migrate_send: find out whether it started.
		vm, err := r.d.Source.VMByUUID(ctx, cp.Request.VMUUID)
		switch {
		case errors.Is(err, ErrNotFound):
			where, destVM, lerr := r.locate(ctx)
			if where != "dest" {
				return PhaseHandoff, fmt.Errorf("%w: vm gone from the source and not running at the destination (%v)", ErrVMLocation, lerr)
			}
			cp.DestVM, h.Done = destVM, true
		case err != nil:
			return PhaseHandoff, fmt.Errorf("look up vm: %w", err)
		default:
			if task := migrateSendTask(vm); task != "" {
				r.plog.Info("adopting the running VM.migrate_send task", "task", task)
				h.Task = task
			}
		}
		if err := r.save(ctx); err != nil {
			return PhaseHandoff, err
		}
	}
	if !h.Done && h.Task == "" {
		r.rethrottle(ctx)
		dest, err := r.d.Dest.MigrateReceive(ctx, cp.DestHost, cp.DestNetwork, map[string]string{})
		if err != nil {
			return PhaseHandoff, fmt.Errorf("host.migrate_receive: %w", err)
		}
		rw, err := RewriteDest(dest, func(target string) (string, error) {
			return r.d.Gateway.Forward(ctx, cp.MigrationID, target)
		})
		if err != nil {
			return PhaseHandoff, err
		}
		args := MigrateArgs{VM: cp.VMRef, Dest: rw, Live: true, VDIMap: vdiMap(cp.Disks), VIFMap: cp.VIFMap, Options: cp.Request.MigrateOptions}
		if args.Options == nil {
			args.Options = map[string]string{}
		}
		if !cp.Request.SkipAssert {
			if err := r.d.Source.AssertCanMigrate(ctx, args); err != nil {
				return PhaseHandoff, fmt.Errorf("VM.assert_can_migrate: %w", err)
			}
		}
		h.SendIntent = true
		if err := r.save(ctx); err != nil {
			return PhaseHandoff, err
		}
		task, err := r.d.Source.MigrateSend(ctx, args)
		h.SendCalls++
		if err != nil {
			return PhaseHandoff, fmt.Errorf("VM.migrate_send: %w", err)
		}
		h.Task = task
		r.plog.Info("VM.migrate_send started", "task", task)
		if err := r.save(ctx); err != nil {
			return PhaseHandoff, err
		}
	}
	pollFailures := 0
	for !h.Done {
		rec, err := r.d.Tasks.TaskRecord(ctx, h.Task)
		if errors.Is(err, ErrNotFound) {
			where, destVM, lerr := r.locate(ctx)
			if where != "dest" {
				return PhaseHandoff, fmt.Errorf("VM.migrate_send task %s disappeared and the vm is not at the destination (%s, %v)", h.Task, where, lerr)
			}
			cp.DestVM, h.Done = destVM, true
			break
		}
		if err != nil {
			// xapi's task keeps running whatever happens to our poll: ride
			// out a short blip of the source pool's API before giving up
			// (a resume would follow the task anyway).
			pollFailures++
			if pollFailures >= handoffPollAttempts || ctx.Err() != nil {
				return PhaseHandoff, fmt.Errorf("poll VM.migrate_send task (%d attempts): %w", pollFailures, err)
			}
			r.plog.Warn("poll of VM.migrate_send task failed; retrying", "attempt", pollFailures, "error", err)
			if err := r.sleep(ctx); err != nil {
				return PhaseHandoff, err
			}
			continue
		}
		pollFailures = 0
		switch rec.Status {
		case TaskSuccess:
			cp.DestVM, h.Done = rec.Result, true
		case TaskFailure, TaskCancelled:
			return PhaseHandoff, fmt.Errorf("VM.migrate_send %s: %s", rec.Status, strings.Join(rec.ErrorInfo, " "))
		default:
			h.Progress = rec.Progress
			r.progress(ctx, PhaseHandoff, rec.Progress, Progress{Message: "VM.migrate_send"})
			_ = r.checkCancel(ctx)
			if err := r.sleep(ctx); err != nil {
				return PhaseHandoff, err
			}
		}
	}
	if cp.DestVM == "" {
		if dv, err := r.d.Dest.VMByUUID(ctx, cp.Request.VMUUID); err == nil {
			cp.DestVM = dv.Ref
		}
	}
	h.Seconds = float64(r.d.Now().UnixNano()-h.StartNano) / 1e9
	r.plog.Info("handoff done", "dest_vm", cp.DestVM)
	if err := r.save(ctx); err != nil {
		return PhaseHandoff, err
	}
	return PhaseSwitch, nil
}

// handoffPollAttempts is how many polls of the VM.migrate_send task in a row
// may fail before Handoff stops (resumable) with the VM's location unknown.
const handoffPollAttempts = 5

// rethrottle puts the guest throttle back before a retried VM.migrate_send
// (a failed handoff gave the guest its CPU back). Best effort: a failure
// only means the retry runs with the guest at full speed.
func (r *run) rethrottle(ctx context.Context) {
	cp := r.cp
	t := cp.Seed.Throttle
	if r.d.Throttle == nil || t == nil || t.Percent <= 0 || !cp.Seed.ThrottleRemoved || cp.Seed.ThrottleConflict {
		return
	}
	if err := r.applyThrottle(ctx, t.Percent); err != nil {
		r.plog.Warn("could not throttle the guest again; the retried handoff runs unthrottled", "error", err)
		return
	}
	st := cp.Seed.Throttle
	r.plog.Info("guest throttled again for the retried handoff", "percent", st.Percent, "cap", st.Cap)
	if err := r.save(ctx); err != nil {
		r.plog.Warn("could not save the checkpoint", "error", err)
	}
}
