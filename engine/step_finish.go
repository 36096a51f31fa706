package engine

import (
	"context"
	"errors"
	"fmt"
)

func (r *run) stepSwitch(ctx context.Context) (Phase, error) {
	cp := r.cp
	if err := r.ensureAttached(ctx); err != nil {
		return PhaseSwitch, err
	}
	_ = r.checkCancel(ctx)
	if cp.Settings.Network == NetworkNone {
		return PhaseVerify, nil
	}
	if !cp.Net.Activated {
		st, err := r.d.Network.Activate(ctx, r.netSpec())
		if err != nil {
			return PhaseSwitch, fmt.Errorf("activate network at the destination: %w", err)
		}
		if st != nil {
			cp.Net.State = st
		}
		cp.Net.Activated = true
		if err := r.save(ctx); err != nil {
			return PhaseSwitch, err
		}
	}
	if !cp.Net.Released {
		st, err := r.d.Network.Release(ctx, r.netSpec())
		if err != nil {
			return PhaseSwitch, fmt.Errorf("release network at the source: %w", err)
		}
		if st != nil {
			cp.Net.State = st
		}
		cp.Net.Released = true
		if err := r.save(ctx); err != nil {
			return PhaseSwitch, err
		}
	}
	return PhaseVerify, nil
}

func (r *run) stepVerify(ctx context.Context) (Phase, error) {
	cp := r.cp
	if err := r.ensureAttached(ctx); err != nil {
		return PhaseVerify, err
	}
	dv, err := r.d.Dest.VMByUUID(ctx, cp.Request.VMUUID)
	if err != nil {
		return PhaseVerify, fmt.Errorf("vm at the destination: %w", err)
	}
	if dv.PowerState != "Running" {
		return PhaseVerify, fmt.Errorf("vm at the destination is %s, not Running", dv.PowerState)
	}
	cp.DestVM = dv.Ref
	if sv, err := r.d.Source.VMByUUID(ctx, cp.Request.VMUUID); err == nil {
		if sv.PowerState == "Running" {
			return PhaseVerify, fmt.Errorf("vm runs at the source and at the destination")
		}
	} else if !errors.Is(err, ErrNotFound) {
		return PhaseVerify, fmt.Errorf("vm at the source: %w", err)
	}
	if cp.Integrity == "" {
		cp.Integrity = IntegritySkipped
		if r.d.Integrity != nil {
			ok, err := r.d.Integrity.Check(ctx, IntegrityRequest{MigrationID: cp.MigrationID, VMUUID: cp.Request.VMUUID, DestVM: cp.DestVM, Disks: cp.Disks})
			switch {
			case err != nil:
				r.plog.Warn("integrity check could not run", "error", err)
			case ok:
				cp.Integrity = IntegrityOK
			default:
				cp.Integrity = IntegrityMismatch
				r.plog.Error("integrity check: source and destination disks differ")
			}
		}
	}
	if !cp.PauseMeasured && r.d.Pause != nil {
		if d, ok, err := r.d.Pause.GuestPause(ctx, cp.MigrationID, cp.Request.VMUUID); err == nil && ok {
			cp.PauseNS, cp.PauseMeasured = int64(d), true
		}
	}
	if cp.GatewayUp && !cp.GatewayDown {
		if st, err := r.d.Gateway.Stats(ctx, cp.MigrationID); err == nil {
			cp.Stats = st
		} else {
			r.plog.Warn("could not read gateway counters", "error", err)
		}
	}
	if err := r.save(ctx); err != nil {
		return PhaseVerify, err
	}
	return PhaseCleanup, nil
}

// releaseAll stops transfers, network, gateway and agents and removes
// snapshots and replicas. Used by Cleanup and RollingBack; idempotent.
func (r *run) releaseAll(ctx context.Context, rollback bool) error {
	cp := r.cp
	var errs []error
	// the guest gets its CPU back first (storage cleanup can take a while)
	if err := r.releaseThrottle(ctx); err != nil {
		errs = append(errs, err)
	}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		if (d.ReceiverReady || d.SenderReady) && !d.StorageClosed {
			if rollback {
				if err := r.d.Storage.Abort(ctx, r.key(d)); err != nil {
					r.plog.Warn("storage abort failed", "disk", d.Disk.VDIUUID, "error", err)
				}
			}
			if err := r.d.Storage.Cleanup(ctx, r.key(d), d.ReceiverState, d.SenderState); err != nil {
				errs = append(errs, fmt.Errorf("storage cleanup of %s: %w", d.Disk.VDIUUID, err))
				continue
			}
			d.StorageClosed = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	if cp.Net.Prepared && !cp.Net.Cleaned {
		if err := r.d.Network.Cleanup(ctx, r.netSpec()); err != nil {
			errs = append(errs, fmt.Errorf("network cleanup: %w", err))
		} else {
			cp.Net.Cleaned = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	if cp.GatewayUp && !cp.GatewayDown {
		if rollback { // keep the counters of what crossed the link for the report
			if st, err := r.d.Gateway.Stats(ctx, cp.MigrationID); err == nil && st.BytesOnWire > cp.Stats.BytesOnWire {
				cp.Stats = st
			}
		}
		if err := r.d.Gateway.Stop(ctx, cp.MigrationID); err != nil {
			errs = append(errs, fmt.Errorf("stop gateway: %w", err))
		} else {
			cp.GatewayDown = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	if (cp.AgentsStarted || cp.AgentsLaunching) && !cp.AgentsStopped {
		if err := r.d.Agents.Stop(ctx, cp.MigrationID); err != nil {
			errs = append(errs, fmt.Errorf("stop agents: %w", err))
		} else {
			cp.AgentsStopped = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		for j := range d.Snapshots {
			s := &d.Snapshots[j]
			if s.Destroyed {
				continue
			}
			if err := r.d.Source.DestroyVDI(ctx, s.Ref); err != nil && !errors.Is(err, ErrNotFound) {
				errs = append(errs, fmt.Errorf("destroy snapshot %s: %w", s.Ref, err))
				continue
			}
			s.Destroyed = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
		if d.ReplicaRef != "" && !d.ReplicaGone {
			if err := r.d.Dest.DestroyVDI(ctx, d.ReplicaRef); err != nil && !errors.Is(err, ErrNotFound) {
				errs = append(errs, fmt.Errorf("destroy replica %s: %w", d.ReplicaRef, err))
			} else {
				d.ReplicaGone = true
				if err := r.save(ctx); err != nil {
					return err
				}
			}
		}
		if rollback && d.CBTEnabled && !d.CBTDisabled {
			// CBT was enabled by us: restore the original state.
			if err := r.d.Source.DisableCBT(ctx, d.Disk.VDIRef); err != nil {
				errs = append(errs, fmt.Errorf("disable cbt on %s: %w", d.Disk.VDIUUID, err))
			} else {
				d.CBTDisabled = true
				if err := r.save(ctx); err != nil {
					return err
				}
			}
		}
		if rollback && d.CBTWasEnabled && d.CBTDisabled {
			// CBT was on before us and Handoff turned it off: turn it back on.
			if err := r.d.Source.EnableCBT(ctx, d.Disk.VDIRef); err != nil {
				errs = append(errs, fmt.Errorf("re-enable cbt on %s: %w", d.Disk.VDIUUID, err))
			} else {
				d.CBTDisabled = false
				if err := r.save(ctx); err != nil {
					return err
				}
			}
		}
	}
	return errors.Join(errs...)
}

func (r *run) stepCleanup(ctx context.Context) (Phase, error) {
	if err := r.ensureAttached(ctx); err != nil {
		return PhaseCleanup, err
	}
	_ = r.checkCancel(ctx)
	if err := r.releaseAll(ctx, false); err != nil {
		return PhaseCleanup, err
	}
	return PhaseDone, nil
}

func (r *run) stepRollback(ctx context.Context) (Phase, error) {
	if err := r.ensureAttached(ctx); err != nil {
		r.plog.Warn("could not re-attach before rollback; continuing", "error", err)
	}
	if err := r.releaseAll(ctx, true); err != nil {
		return PhaseRollingBack, err
	}
	if vm, err := r.d.Source.VMByUUID(ctx, r.cp.Request.VMUUID); err != nil || vm.PowerState != "Running" {
		r.plog.Warn("after rollback the vm is not seen running at the source", "error", err)
	}
	r.plog.Info("rolled back; the vm is untouched at the source")
	return PhaseRolledBack, nil
}

// releaseThrottle puts the guest's scheduler cap back if a throttle is in
// force. It is called in cleanup on every path (after a successful move the
// throttled domain is gone: GuestThrottle finds nothing to do) and when a
// handoff fails with the VM still at the source.
func (r *run) releaseThrottle(ctx context.Context) error {
	cp := r.cp
	if cp.Seed.Throttle == nil || cp.Seed.ThrottleRemoved {
		return nil
	}
	if r.d.Throttle == nil {
		return fmt.Errorf("remove guest throttle: a throttle (cap %d on domain %d of host %s) is recorded but this installation has no guest throttle; restore the cap by hand in that host's dom0: xl sched-%s -d %d -c %d",
			cp.Seed.Throttle.Cap, cp.Seed.Throttle.Domid, cp.Seed.Throttle.Host, schedulerName(cp.Seed.Throttle.Scheduler), cp.Seed.Throttle.Domid, cp.Seed.Throttle.PrevCap)
	}
	err := r.d.Throttle.ReleaseThrottle(ctx, cp.Request.VMUUID, *cp.Seed.Throttle)
	switch {
	case errors.Is(err, ErrThrottleConflict):
		r.plog.Warn("the guest's CPU cap was changed by someone else; wanmotion leaves it as it is", "error", err)
		cp.Seed.ThrottleConflict = true
	case err != nil:
		return fmt.Errorf("remove guest throttle: %w", err)
	}
	cp.Seed.ThrottleRemoved = true
	r.plog.Info("guest throttle removed", "cap", cp.Seed.Throttle.PrevCap, "domid", cp.Seed.Throttle.Domid)
	return r.save(ctx)
}

func schedulerName(s string) string {
	if s == "" {
		return "credit"
	}
	return s
}
