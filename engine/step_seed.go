package engine

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"
)

func snapFor(d *DiskState, round int) *SnapshotState {
	for i := range d.Snapshots {
		if d.Snapshots[i].Round == round {
			return &d.Snapshots[i]
		}
	}
	return nil
}

func lastSnap(d *DiskState) *SnapshotState {
	if len(d.Snapshots) == 0 {
		return nil
	}
	return &d.Snapshots[len(d.Snapshots)-1]
}

func (r *run) stepSeed(ctx context.Context) (Phase, error) {
	cp := r.cp
	if err := r.ensureAttached(ctx); err != nil {
		return PhaseSeed, err
	}
	for !cp.Seed.Finished {
		round := cp.Seed.Round
		if len(cp.Seed.Rounds) <= round {
			if err := r.seedRound(ctx, round); err != nil {
				return PhaseSeed, err
			}
		}
		dec := Decide(ConvergeInput{Rounds: cp.Seed.Rounds, LinkBytesPerSec: cp.Plan.LinkBytesPerSec,
			DowntimeTarget: cp.Settings.DowntimeTarget, MinShrink: cp.Settings.MinShrink,
			MaxRounds: cp.Settings.MaxRounds, Policy: cp.Settings.Policy, ThrottlePercent: throttlePercent(cp.Seed),
			ThrottleDisabled: cp.Seed.ThrottleConflict,
			ThrottleMax:      cp.Settings.ThrottleMax})
		cp.Seed.Decision = dec.Reason
		if dec.WriteRate > 0 {
			cp.Seed.WriteRate = dec.WriteRate
		}
		r.plog.Info("convergence decision", "round", round, "action", dec.Action.String(), "reason", dec.Reason,
			"write_rate", dec.WriteRate, "threshold_bytes", dec.ThresholdBytes)
		switch dec.Action {
		case ActionHandoff:
			cp.Seed.Finished = true
		case ActionStop:
			return PhaseSeed, fmt.Errorf("%w: %s; %s", ErrNotConverging, dec.Reason, dec.Advice)
		case ActionThrottle:
			if r.d.Throttle == nil {
				return PhaseSeed, fmt.Errorf("%w: %s, but no guest throttle is available in this installation; %s", ErrNotConverging, dec.Reason, dec.Advice)
			}
			err := r.applyThrottle(ctx, dec.ThrottlePercent)
			if errors.Is(err, ErrThrottleConflict) {
				// not ours any more: leave the cap alone, go on as keep-going
				r.plog.Warn("the guest's CPU cap was changed by someone else; wanmotion leaves it and throttles no more", "error", err)
				cp.Seed.ThrottleConflict, cp.Seed.ThrottleRemoved = true, true
				cp.Seed.Round++
				cp.Seed.RoundStartNano = 0
				if err := r.save(ctx); err != nil {
					return PhaseSeed, err
				}
				continue
			}
			if err != nil {
				return PhaseSeed, fmt.Errorf("throttle guest to %d%%: %w", dec.ThrottlePercent, err)
			}
			st := cp.Seed.Throttle
			r.plog.Info("guest throttled", "percent", st.Percent, "cap", st.Cap, "prev_cap", st.PrevCap, "domid", st.Domid)
			fallthrough
		case ActionContinue:
			cp.Seed.Round++
			cp.Seed.RoundStartNano = 0
		}
		if err := r.save(ctx); err != nil {
			return PhaseSeed, err
		}
		if err := r.checkCancel(ctx); err != nil {
			return PhaseSeed, err
		}
	}
	return PhaseHandoff, nil
}

// syncRetries is how often a failed round is retried (after re-attaching
// to the agents) before the migration rolls back.
const syncRetries = 3

// seedRound makes every replica equal to snapshot S<round>.
func (r *run) seedRound(ctx context.Context, round int) error {
	cp := r.cp
	if err := r.checkCancel(ctx); err != nil {
		return err
	}
	if cp.Seed.RoundStartNano == 0 {
		cp.Seed.RoundStartNano = r.d.Now().UnixNano()
		if err := r.save(ctx); err != nil {
			return err
		}
	}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		if round == 0 && !d.CBTWasEnabled && !d.CBTEnabled {
			if err := r.d.Source.EnableCBT(ctx, d.Disk.VDIRef); err != nil {
				return fmt.Errorf("enable cbt on %s: %w", d.Disk.VDIUUID, err)
			}
			d.CBTEnabled = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
		if snapFor(d, round) == nil {
			tags := map[string]string{"wanmotion:migration_id": cp.MigrationID,
				"wanmotion:source_vdi": d.Disk.VDIUUID, "wanmotion:round": strconv.Itoa(round)}
			ref, err := r.findVDI(ctx, r.d.Source, tags)
			if err != nil {
				return err
			}
			if ref == "" {
				if ref, err = r.d.Source.SnapshotVDI(ctx, d.Disk.VDIRef, tags); err != nil {
					return fmt.Errorf("snapshot %s: %w", d.Disk.VDIUUID, err)
				}
			}
			d.Snapshots = append(d.Snapshots, SnapshotState{Round: round, Ref: ref})
			if err := r.save(ctx); err != nil {
				return err
			}
		}
		s := snapFor(d, round)
		if s.ContentID == "" {
			cid, err := r.d.Source.VDIContentID(ctx, s.Ref)
			if err != nil {
				return fmt.Errorf("content_id of snapshot %s: %w", s.Ref, err)
			}
			if cid == "" {
				cid = newUUID()
				if err := r.d.Source.SetVDIContentID(ctx, s.Ref, cid); err != nil {
					return fmt.Errorf("set content_id of snapshot %s: %w", s.Ref, err)
				}
			}
			s.ContentID = cid
			if err := r.save(ctx); err != nil {
				return err
			}
		}
		if d.SyncRound != round {
			d.SyncRound, d.SyncDone, d.RoundBytes, d.RoundWire = round, false, 0, 0
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	for attempt := 0; ; attempt++ {
		err := r.runSyncs(ctx, round)
		if err == nil {
			break
		}
		if errors.Is(err, errHalt) || errors.Is(err, ErrCancelled) || ctx.Err() != nil || attempt >= syncRetries {
			return err
		}
		r.plog.Warn("seed round failed; re-attaching and retrying", "round", round, "attempt", attempt+1, "error", err)
		if err := r.sleepFor(ctx, time.Duration(attempt+1)*r.d.PollInterval); err != nil {
			return err
		}
		r.attached, r.resumed = false, true
		if err := r.ensureAttached(ctx); err != nil {
			r.plog.Warn("re-attach failed", "error", err)
		}
	}
	stat := RoundStat{Round: round, Seconds: float64(r.d.Now().UnixNano()-cp.Seed.RoundStartNano) / 1e9, ThrottlePercent: throttlePercent(cp.Seed)}
	for _, d := range cp.Disks {
		stat.ChangedBytes += d.RoundBytes
		stat.BytesOnWire += d.RoundWire
	}
	cp.Seed.Rounds = append(cp.Seed.Rounds, stat)
	r.plog.Info("seed round done", "round", round, "changed_bytes", stat.ChangedBytes, "bytes_on_wire", stat.BytesOnWire, "seconds", stat.Seconds)
	if err := r.save(ctx); err != nil {
		return err
	}
	// S<round-1> is no longer needed for list_changed_blocks: drop its data.
	if round > 0 {
		for i := range cp.Disks {
			d := &cp.Disks[i]
			if s := snapFor(d, round-1); s != nil && !s.DataDestroyed && !s.Destroyed {
				if err := r.d.Source.DataDestroyVDI(ctx, s.Ref); err != nil {
					r.plog.Warn("could not data-destroy an old snapshot", "snapshot", s.Ref, "error", err)
				} else {
					s.DataDestroyed = true
					if err := r.save(ctx); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

type syncOutcome struct {
	i   int
	res SyncResult
	err error
}

// runSyncs runs SyncRound for every disk not yet done with the round, all
// disks at once, while polling progress and cancel. It returns only after
// every SyncRound call returned (no goroutine outlives it).
func (r *run) runSyncs(ctx context.Context, round int) error {
	cp := r.cp
	specs := map[int]SyncSpec{}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		if d.SyncDone {
			continue
		}
		spec, err := r.syncSpec(ctx, d, round)
		if err != nil {
			return err
		}
		specs[i] = spec
	}
	if err := r.save(ctx); err != nil { // RoundBytes
		return err
	}
	if len(specs) == 0 {
		return nil
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	results := make(chan syncOutcome, len(specs))
	for i, spec := range specs {
		go func() {
			res, err := r.d.Storage.SyncRound(rctx, spec)
			results <- syncOutcome{i: i, res: res, err: err}
		}()
	}
	tick := time.NewTicker(r.d.PollInterval)
	defer tick.Stop()
	var firstErr error
	fail := func(err error) {
		if firstErr == nil {
			firstErr = err
			cancel()
		}
	}
	for pending := len(specs); pending > 0; {
		select {
		case o := <-results:
			pending--
			d := &cp.Disks[o.i]
			if o.err != nil {
				fail(fmt.Errorf("sync round %d of %s: %w", round, d.Disk.VDIUUID, o.err))
				continue
			}
			d.SyncDone, d.RoundWire = true, o.res.BytesOnWire
			if o.res.State != nil {
				d.SenderState = o.res.State
			}
			if err := r.save(ctx); err != nil {
				fail(err)
			}
		case <-tick.C:
			if firstErr != nil {
				continue
			}
			if err := r.checkCancel(ctx); err != nil {
				fail(err)
				continue
			}
			r.seedProgress(ctx, round)
		}
	}
	if firstErr == nil {
		r.seedProgress(ctx, round)
	}
	return firstErr
}

// seedProgress reports Seed progress: round 0 is most of Seed, later
// rounds fill the rest.
func (r *run) seedProgress(ctx context.Context, round int) {
	var total, done, wire int64
	for i := range r.cp.Disks {
		d := &r.cp.Disks[i]
		total += d.RoundBytes
		if d.SyncDone {
			done += d.RoundBytes
			wire += d.RoundWire
			continue
		}
		if st, err := r.d.Storage.SyncStatus(ctx, r.key(d)); err == nil && st.Round == round {
			done += min(st.BytesCopied, d.RoundBytes)
			wire += st.BytesOnWire
		}
	}
	frac := 1.0
	if total > 0 {
		frac = float64(done) / float64(total)
	}
	seedFrac := 0.8 * frac
	if round > 0 {
		k := float64(round)
		seedFrac = 0.8 + 0.2*(k-1)/k + 0.2*(1/k-1/(k+1))*frac
	}
	r.progress(ctx, PhaseSeed, seedFrac, Progress{Round: round, BytesDone: done, BytesTotal: total, BytesOnWire: wire})
}

// syncSpec builds a disk's round (the bitmap is asked again on every call:
// list_changed_blocks has no side effects).
func (r *run) syncSpec(ctx context.Context, d *DiskState, round int) (SyncSpec, error) {
	s := snapFor(d, round)
	spec := SyncSpec{Key: r.key(d), Round: round, Snapshot: s.Ref, SnapshotContentID: s.ContentID, BlockSize: CBTBlockSize}
	if round == 0 {
		spec.Full = true
		d.RoundBytes = allocated(d.Disk)
		return spec, nil
	}
	prev := snapFor(d, round-1)
	if prev == nil {
		return spec, fmt.Errorf("disk %s: no snapshot of round %d", d.Disk.VDIUUID, round-1)
	}
	b64, err := r.d.Source.ListChangedBlocks(ctx, prev.Ref, s.Ref)
	if err != nil {
		return spec, fmt.Errorf("list changed blocks of %s: %w", d.Disk.VDIUUID, err)
	}
	bm, err := DecodeCBTBitmap(b64)
	if err != nil {
		return spec, err
	}
	spec.Bitmap = bm
	d.RoundBytes = ChangedBytes(bm, d.Disk.VirtualSize)
	return spec, nil
}

// throttlePercent is the guest throttle in force (0: none).
func throttlePercent(s SeedState) int {
	if s.Throttle == nil || s.ThrottleRemoved {
		return 0
	}
	return s.Throttle.Percent
}

// applyThrottle slows the guest to percent. When no throttle is in force,
// the domain's cap is read and checkpointed first, so that it can always be
// put back (even after a crash between setting the cap and saving).
func (r *run) applyThrottle(ctx context.Context, percent int) error {
	cp := r.cp
	if cp.Seed.Throttle == nil || cp.Seed.ThrottleRemoved {
		if rd, ok := r.d.Throttle.(ThrottleReader); ok {
			now, err := rd.ReadThrottle(ctx, cp.Request.VMUUID)
			if err != nil {
				return err
			}
			cp.Seed.Throttle, cp.Seed.Throttled, cp.Seed.ThrottleRemoved = &now, true, false
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	st, err := r.d.Throttle.ThrottleGuest(ctx, cp.Request.VMUUID, percent, cp.Seed.Throttle)
	if err != nil {
		return err
	}
	cp.Seed.Throttle, cp.Seed.Throttled, cp.Seed.ThrottleRemoved = &st, true, false
	return nil
}
