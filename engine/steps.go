package engine

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"
)

// assumedLink is used by the planner when neither a measurement nor a
// bandwidth cap is known.
const assumedLink = 125_000_000 // 1 Gbit/s

// PlanResult is the outcome of Plan (dry run) and of the Plan phase.
type PlanResult struct {
	VMUUID      string
	VMName      string
	VMRef       string
	SourceHost  string
	DestHost    string
	DestNetwork string
	Disks       []DiskState
	VIFs        []VIF
	VIFMap      map[string]string
	Settings    Settings
	Estimate    Estimate
	// Assumptions lists guesses the estimate rests on.
	Assumptions []string
}

// Text renders a plan for people (--dry-run).
func (p PlanResult) Text() string {
	var b strings.Builder
	e := p.Estimate
	fmt.Fprintf(&b, "plan for VM %s (%s)\n", p.VMName, p.VMUUID)
	fmt.Fprintf(&b, "  backends:          storage %s, network %s\n", p.Settings.Storage, p.Settings.Network)
	for _, d := range p.Disks {
		fmt.Fprintf(&b, "  disk %-4s %s: %s allocated of %s -> SR %s\n", d.Disk.Device, d.Disk.VDIUUID, HumanBytes(allocated(d.Disk)), HumanBytes(d.Disk.VirtualSize), d.DestSR)
	}
	fmt.Fprintf(&b, "  link:              %s/s, rtt %s\n", HumanBytes(e.LinkBytesPerSec), time.Duration(e.RTTSeconds*float64(time.Second)))
	fmt.Fprintf(&b, "  bytes to move:     %s, memory %s\n", HumanBytes(e.BytesToMove), HumanBytes(e.MemoryBytes))
	fmt.Fprintf(&b, "  seed:              %d rounds, %s\n", e.SeedRounds, fmtSeconds(e.SeedSeconds))
	fmt.Fprintf(&b, "  handoff:           %s (residual %s)\n", fmtSeconds(e.HandoffSeconds), HumanBytes(e.ResidualBytes))
	fmt.Fprintf(&b, "  estimated total:   %s\n", fmtSeconds(e.TotalSeconds))
	fmt.Fprintf(&b, "  estimated pause:   %s (target %s)\n", fmtSeconds(e.DowntimeSeconds), p.Settings.DowntimeTarget)
	if e.Advice != "" {
		fmt.Fprintf(&b, "  advice:            %s\n", e.Advice)
	}
	for _, a := range p.Assumptions {
		fmt.Fprintf(&b, "  assumption:        %s\n", a)
	}
	return b.String()
}

// Plan resolves and estimates a migration without changing the VM, its
// disks or the pools' configuration (--dry-run). Unless req.SkipAssert it
// also calls host.migrate_receive (which opens a session in the
// destination pool for the migration) and VM.assert_can_migrate.
func (e *Engine) Plan(ctx context.Context, req Request) (PlanResult, error) {
	if req.VMUUID == "" {
		return PlanResult{}, fmt.Errorf("%w: no vm uuid", ErrConfig)
	}
	return e.resolve(ctx, requestState(req), e.d.Logger.Named("engine").With("vm_uuid", req.VMUUID))
}

func (e *Engine) resolve(ctx context.Context, rq RequestState, log interface {
	Info(string, ...interface{})
}) (PlanResult, error) {
	d := e.d
	vm, err := d.Source.VMByUUID(ctx, rq.VMUUID)
	if err != nil {
		return PlanResult{}, fmt.Errorf("look up vm %s: %w", rq.VMUUID, err)
	}
	if vm.PowerState != "Running" {
		return PlanResult{}, fmt.Errorf("%w: vm %s is %s; a live migration needs a running vm", ErrConfig, rq.VMUUID, vm.PowerState)
	}
	p := PlanResult{VMUUID: vm.UUID, VMName: vm.NameLabel, VMRef: vm.Ref, SourceHost: vm.ResidentOn}
	if p.VMUUID == "" {
		p.VMUUID = rq.VMUUID
	}
	disks, err := d.Source.VMDisks(ctx, vm.Ref)
	if err != nil {
		return p, fmt.Errorf("list disks: %w", err)
	}
	defaultSR := rq.DestSR
	for _, dk := range disks {
		sr := rq.SRMap[dk.VDIUUID]
		if sr == "" {
			sr = rq.SRMap[dk.SRRef]
		}
		if sr == "" {
			if defaultSR == "" {
				if defaultSR, err = d.Dest.DefaultSR(ctx); err != nil {
					return p, fmt.Errorf("destination default sr: %w", err)
				}
			}
			sr = defaultSR
		}
		if sr == "" {
			return p, fmt.Errorf("%w: no destination sr for disk %s and the destination pool has no default sr", ErrConfig, dk.VDIUUID)
		}
		p.Disks = append(p.Disks, DiskState{Disk: dk, DestSR: sr, CBTWasEnabled: dk.CBTEnabled})
	}
	if p.VIFs, err = d.Source.VMVIFs(ctx, vm.Ref); err != nil {
		return p, fmt.Errorf("list vifs: %w", err)
	}
	p.VIFMap = map[string]string{}
	var unmapped []string
	for _, v := range p.VIFs {
		n := rq.NetworkMap[v.NetworkRef]
		if n == "" {
			n = rq.NetworkMap["*"]
		}
		if n == "" {
			unmapped = append(unmapped, fmt.Sprintf("vif %s (network %s)", v.Device, v.NetworkRef))
			continue
		}
		p.VIFMap[v.Ref] = n
	}
	if len(unmapped) > 0 {
		return p, fmt.Errorf("%w: no destination network for %s: give a network map", ErrConfig, strings.Join(unmapped, ", "))
	}
	srcOC, err := d.Source.PoolOtherConfig(ctx)
	if err != nil {
		return p, fmt.Errorf("source pool other_config: %w", err)
	}
	dstOC, err := d.Dest.PoolOtherConfig(ctx)
	if err != nil {
		return p, fmt.Errorf("destination pool other_config: %w", err)
	}
	srcO, err := ParsePoolConfig(srcOC)
	if err != nil {
		return p, fmt.Errorf("source pool: %w", err)
	}
	dstO, err := ParsePoolConfig(dstOC)
	if err != nil {
		return p, fmt.Errorf("destination pool: %w", err)
	}
	inst, err := d.Catalog.Installed(ctx)
	if err != nil {
		return p, fmt.Errorf("installed backends: %w", err)
	}
	if p.Settings, err = Resolve(srcO, dstO, rq.Overrides, inst); err != nil {
		return p, err
	}
	if p.Settings.Network != NetworkNone && d.Network == nil {
		return p, fmt.Errorf("%w: network backend %q configured but the engine has no network driver", ErrConfig, p.Settings.Network)
	}
	if p.DestHost = rq.DestHost; p.DestHost == "" {
		if p.DestHost, err = d.Dest.PoolMaster(ctx); err != nil {
			return p, fmt.Errorf("destination pool coordinator: %w", err)
		}
	}
	if p.DestNetwork = p.Settings.MigrationNetwork; p.DestNetwork == "" {
		if p.DestNetwork, err = d.Dest.ManagementNetwork(ctx, p.DestHost); err != nil {
			return p, fmt.Errorf("destination management network: %w", err)
		}
	}
	link := Link{BandwidthBytesPerSec: rq.LinkBytesPerSec, RTT: time.Duration(rq.RTTNanos)}
	if link.BandwidthBytesPerSec <= 0 || (p.Settings.BandwidthBytesPerSec > 0 && p.Settings.BandwidthBytesPerSec < link.BandwidthBytesPerSec) {
		link.BandwidthBytesPerSec = p.Settings.BandwidthBytesPerSec
	}
	if link.BandwidthBytesPerSec <= 0 {
		link.BandwidthBytesPerSec = assumedLink
		p.Assumptions = append(p.Assumptions, "link bandwidth unknown: assumed 1 Gbit/s (set a bandwidth)")
	}
	if rq.GuestWriteRate == 0 {
		p.Assumptions = append(p.Assumptions, "guest write rate unknown: assumed 0 (the seed rounds measure it)")
	}
	var toMove int64
	for _, dk := range p.Disks {
		toMove += allocated(dk.Disk)
	}
	p.Estimate, err = EstimateMigration(PlanInput{
		Link: link, BytesToMove: toMove, MemoryBytes: vm.MemoryBytes,
		GuestWriteBytesPerSec: rq.GuestWriteRate, DowntimeTarget: p.Settings.DowntimeTarget,
		MaxRounds: p.Settings.MaxRounds,
	})
	if err != nil {
		return p, err
	}
	if !rq.SkipAssert {
		dest, err := d.Dest.MigrateReceive(ctx, p.DestHost, p.DestNetwork, map[string]string{})
		if err != nil {
			return p, fmt.Errorf("host.migrate_receive: %w", err)
		}
		err = d.Source.AssertCanMigrate(ctx, MigrateArgs{VM: vm.Ref, Dest: dest, Live: true,
			VDIMap: vdiMap(p.Disks), VIFMap: p.VIFMap, Options: rq.MigrateOptions})
		switch {
		case errors.Is(err, ErrCBTEnabled):
			log.Info("assert_can_migrate: cbt enabled on a disk; handoff disables it")
		case err != nil:
			return p, fmt.Errorf("VM.assert_can_migrate: %w", err)
		}
	}
	return p, nil
}

func vdiMap(disks []DiskState) map[string]string {
	m := make(map[string]string, len(disks))
	for _, d := range disks {
		m[d.Disk.VDIRef] = d.DestSR
	}
	return m
}

func (r *run) stepPlan(ctx context.Context) (Phase, error) {
	cp := r.cp
	p, err := r.e.resolve(ctx, cp.Request, r.plog)
	if p.VMRef != "" && cp.VMRef == "" {
		cp.VMRef, cp.VMName, cp.SourceHost = p.VMRef, p.VMName, p.SourceHost
	}
	if cp.VMRef != "" {
		if terr := r.ensureTask(ctx); terr != nil {
			return PhasePlan, terr
		}
	}
	if err != nil {
		return PhasePlan, err
	}
	cp.MemoryBytes = p.Estimate.MemoryBytes
	cp.DestHost, cp.DestNetwork = p.DestHost, p.DestNetwork
	cp.Disks, cp.VIFs, cp.VIFMap = p.Disks, p.VIFs, p.VIFMap
	cp.Settings, cp.Plan = p.Settings, p.Estimate
	for _, a := range p.Assumptions {
		r.plog.Info("planner assumption", "assumption", a)
	}
	r.plog.Info("plan ready", "bytes_to_move", p.Estimate.BytesToMove, "estimated_seconds", int64(p.Estimate.TotalSeconds),
		"estimated_pause_ms", int64(p.Estimate.DowntimeSeconds*1000), "storage", p.Settings.Storage, "network", p.Settings.Network)
	if err := r.checkCancel(ctx); err != nil {
		return PhasePlan, err
	}
	return PhasePrepare, nil
}

// ensureTask creates (or adopts) the xapi task XenCenter shows.
func (r *run) ensureTask(ctx context.Context) error {
	cp := r.cp
	desc := "wanmotion WAN migration " + cp.MigrationID
	if cp.Task == "" && cp.Request.TaskRef == "" && r.resumed {
		if f, ok := r.d.Tasks.(TaskFinder); ok {
			found, err := f.FindPendingTasks(ctx, desc)
			if err != nil {
				return fmt.Errorf("look for the task of this migration: %w", err)
			}
			if len(found) > 0 {
				sort.Strings(found)
				r.plog.Info("adopting a task created before a restart", "task", found[0])
				cp.Task, cp.TaskCreated = found[0], true
			}
		}
	}
	if cp.Task == "" {
		if cp.Request.TaskRef != "" {
			cp.Task = cp.Request.TaskRef
		} else {
			t, err := r.d.Tasks.CreateTask(ctx, TaskLabel, desc)
			if err != nil {
				return fmt.Errorf("task.create: %w", err)
			}
			cp.Task, cp.TaskCreated = t, true
		}
		cp.TaskLabelled = false
		if err := r.save(ctx); err != nil {
			return err
		}
	}
	if cp.TaskLabelled {
		return nil
	}
	applies := cp.VMRef
	if cp.SourceHost != "" {
		applies += "," + cp.SourceHost
	}
	for _, kv := range [][2]string{{"applies_to", applies}, {"wanmotion:migration_id", cp.MigrationID}} {
		if err := r.d.Tasks.AddTaskOtherConfig(ctx, cp.Task, kv[0], kv[1]); err != nil {
			r.plog.Warn("could not label the task", "key", kv[0], "error", err)
		}
	}
	cp.TaskLabelled = true
	return r.save(ctx)
}

// findVDIUUID looks, in a resumed run only, for a VDI this migration
// created before a crash that the checkpoint did not record. It needs the
// pool adapter to implement VDIFinder; otherwise it finds nothing.
func (r *run) findVDIUUID(ctx context.Context, pool any, match map[string]string) (string, string, error) {
	f, ok := pool.(VDIFinder)
	if !ok || !r.resumed {
		return "", "", nil
	}
	found, err := f.FindVDIs(ctx, match)
	if err != nil {
		return "", "", fmt.Errorf("look for vdis of this migration: %w", err)
	}
	refs := make([]string, 0, len(found))
	for ref := range found {
		refs = append(refs, ref)
	}
	if len(refs) == 0 {
		return "", "", nil
	}
	sort.Strings(refs)
	if len(refs) > 1 {
		r.plog.Warn("several vdis match; adopting the first", "match", fmt.Sprint(match), "refs", fmt.Sprint(refs))
	}
	r.plog.Info("adopting a vdi created before a restart", "vdi", refs[0])
	return refs[0], found[refs[0]], nil
}

func (r *run) findVDI(ctx context.Context, pool any, match map[string]string) (string, error) {
	ref, _, err := r.findVDIUUID(ctx, pool, match)
	return ref, err
}

func (r *run) agentSpec() AgentSpec {
	return AgentSpec{MigrationID: r.cp.MigrationID, SourceHost: r.cp.SourceHost, DestHost: r.cp.DestHost,
		StorageBackend: r.cp.Settings.Storage, NetworkBackend: r.cp.Settings.Network}
}

func (r *run) key(d *DiskState) DiskKey {
	return DiskKey{MigrationID: r.cp.MigrationID, DiskID: d.Disk.VDIUUID}
}

// ensureAttached re-attaches to agents, gateway, transfers and network
// after a controller restart or a lost agent (once per process, or again
// after a retry resets r.attached).
func (r *run) ensureAttached(ctx context.Context) error {
	cp := r.cp
	if r.attached || !r.resumed {
		return nil
	}
	if cp.AgentsStarted && !cp.AgentsStopped {
		if err := r.d.Agents.Start(ctx, r.agentSpec()); err != nil {
			return fmt.Errorf("re-attach agents: %w", err)
		}
	}
	if cp.GatewayUp && !cp.GatewayDown {
		if err := r.d.Gateway.Start(ctx, r.gatewaySpec()); err != nil {
			return fmt.Errorf("re-attach gateway: %w", err)
		}
	}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		if d.StorageClosed || d.Finalized {
			continue // a finalized replica belongs to xapi now; Cleanup works from the states
		}
		if d.ReceiverReady {
			info, err := r.d.Storage.RecoverReceiver(ctx, r.key(d), d.ReceiverState)
			if err != nil {
				return fmt.Errorf("recover receiver of disk %s: %w", d.Disk.VDIUUID, err)
			}
			r.setReceiver(d, info)
			if err := r.forwardReceiver(ctx, d); err != nil {
				return err
			}
		}
		if d.SenderReady {
			if err := r.d.Storage.RecoverSender(ctx, r.key(d), d.SenderState, r.peer(d)); err != nil {
				return fmt.Errorf("recover sender of disk %s: %w", d.Disk.VDIUUID, err)
			}
		}
	}
	if cp.Net.Prepared && !cp.Net.Cleaned {
		st, err := r.d.Network.Recover(ctx, r.netSpec())
		if err != nil {
			return fmt.Errorf("recover network: %w", err)
		}
		if st != nil {
			cp.Net.State = st
		}
	}
	r.attached = true
	return r.save(ctx)
}

func (r *run) setReceiver(d *DiskState, info ReceiverInfo) {
	d.ReceiverAddress, d.ReceiverEndpoint = info.Address, info.Endpoint
	if info.State != nil {
		d.ReceiverState = info.State
	}
}

// forwardReceiver makes the receiver reachable from the source through the gateway.
func (r *run) forwardReceiver(ctx context.Context, d *DiskState) error {
	d.PeerAddress = ""
	if d.ReceiverAddress == "" {
		return nil
	}
	local, err := r.d.Gateway.Forward(ctx, r.cp.MigrationID, d.ReceiverAddress)
	if err != nil {
		return fmt.Errorf("gateway forward to the receiver of %s: %w", d.Disk.VDIUUID, err)
	}
	d.PeerAddress = local
	return nil
}

func (r *run) peer(d *DiskState) Peer {
	return Peer{Address: d.PeerAddress, Endpoint: d.ReceiverEndpoint}
}

func (r *run) gatewaySpec() GatewaySpec {
	s := r.cp.Settings
	return GatewaySpec{MigrationID: r.cp.MigrationID, Listen: s.GatewayListen, Advertise: s.GatewayAdvertise,
		Streams: s.Streams, Compression: s.Compression, BandwidthBytesPerSec: s.BandwidthBytesPerSec}
}

func (r *run) netSpec() NetSpec {
	return NetSpec{MigrationID: r.cp.MigrationID, Backend: r.cp.Settings.Network, VMUUID: r.cp.Request.VMUUID,
		VMName: r.cp.VMName, VIFs: r.cp.VIFs, VIFMap: r.cp.VIFMap, State: r.cp.Net.State}
}

func (r *run) stepPrepare(ctx context.Context) (Phase, error) {
	cp := r.cp
	if err := r.ensureAttached(ctx); err != nil {
		return PhasePrepare, err
	}
	if !cp.AgentsStarted {
		if err := r.d.Agents.Start(ctx, r.agentSpec()); err != nil {
			return PhasePrepare, fmt.Errorf("start agents: %w", err)
		}
		cp.AgentsStarted = true
		if err := r.save(ctx); err != nil {
			return PhasePrepare, err
		}
	}
	r.attached = true
	if err := r.checkCancel(ctx); err != nil {
		return PhasePrepare, err
	}
	if !cp.GatewayUp {
		if err := r.d.Gateway.Start(ctx, r.gatewaySpec()); err != nil {
			return PhasePrepare, fmt.Errorf("start gateway: %w", err)
		}
		cp.GatewayUp = true
		if err := r.save(ctx); err != nil {
			return PhasePrepare, err
		}
	}
	for i := range cp.Disks {
		d := &cp.Disks[i]
		if err := r.checkCancel(ctx); err != nil {
			return PhasePrepare, err
		}
		if d.ReplicaRef == "" {
			tags := map[string]string{"wanmotion:migration_id": cp.MigrationID, "wanmotion:source_vdi": d.Disk.VDIUUID}
			ref, uuid, err := r.findVDIUUID(ctx, r.d.Dest, tags)
			if err != nil {
				return PhasePrepare, err
			}
			if ref == "" {
				ref, uuid, err = r.d.Dest.CreateVDI(ctx, VDISpec{
					SRRef: d.DestSR, NameLabel: "wanmotion replica of " + d.Disk.NameLabel,
					Description: "WAN migration " + cp.MigrationID + " of VDI " + d.Disk.VDIUUID,
					VirtualSize: d.Disk.VirtualSize, OtherConfig: tags,
				})
				if err != nil {
					return PhasePrepare, fmt.Errorf("create replica of %s: %w", d.Disk.VDIUUID, err)
				}
			}
			d.ReplicaRef, d.ReplicaUUID = ref, uuid
			if err := r.save(ctx); err != nil {
				return PhasePrepare, err
			}
		}
		if !d.ReceiverReady {
			info, err := r.d.Storage.PrepareReceiver(ctx, ReceiverSpec{Key: r.key(d), Backend: cp.Settings.Storage,
				Disk: d.Disk, ReplicaVDI: d.ReplicaRef, ReplicaUUID: d.ReplicaUUID, DestSR: d.DestSR})
			if err != nil {
				return PhasePrepare, fmt.Errorf("prepare receiver for %s: %w", d.Disk.VDIUUID, err)
			}
			r.setReceiver(d, info)
			d.ReceiverReady = true
			if err := r.save(ctx); err != nil {
				return PhasePrepare, err
			}
		}
		if !d.SenderReady {
			if err := r.forwardReceiver(ctx, d); err != nil {
				return PhasePrepare, err
			}
			s := cp.Settings
			st, err := r.d.Storage.PrepareSender(ctx, SenderSpec{Key: r.key(d), Backend: s.Storage, Disk: d.Disk,
				Peer: r.peer(d), Streams: s.Streams, Compression: s.Compression, BandwidthBytesPerSec: s.BandwidthBytesPerSec})
			if err != nil {
				return PhasePrepare, fmt.Errorf("prepare sender for %s: %w", d.Disk.VDIUUID, err)
			}
			d.SenderReady, d.SenderState = true, st
			if err := r.save(ctx); err != nil {
				return PhasePrepare, err
			}
		}
	}
	if cp.Settings.Network != NetworkNone && !cp.Net.Prepared {
		st, err := r.d.Network.Prepare(ctx, r.netSpec())
		if err != nil {
			return PhasePrepare, fmt.Errorf("prepare network: %w", err)
		}
		cp.Net.Prepared, cp.Net.State = true, st
		if err := r.save(ctx); err != nil {
			return PhasePrepare, err
		}
	}
	return PhaseSeed, r.checkCancel(ctx)
}

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
			MaxRounds: cp.Settings.MaxRounds, Policy: cp.Settings.Policy, Throttled: cp.Seed.Throttled})
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
				return PhaseSeed, fmt.Errorf("%w: %s, and no guest throttle is available; %s", ErrNotConverging, dec.Reason, dec.Advice)
			}
			if err := r.d.Throttle.ThrottleGuest(ctx, cp.MigrationID, cp.Request.VMUUID, dec.ThrottleBytesPS); err != nil {
				return PhaseSeed, fmt.Errorf("throttle guest: %w", err)
			}
			cp.Seed.Throttled = true
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
	stat := RoundStat{Round: round, Seconds: float64(r.d.Now().UnixNano()-cp.Seed.RoundStartNano) / 1e9}
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

func (r *run) stepHandoff(ctx context.Context) (Phase, error) {
	cp := r.cp
	h := &cp.Handoff
	if err := r.ensureAttached(ctx); err != nil {
		return PhaseHandoff, err
	}
	_ = r.checkCancel(ctx) // logged and ignored: forward-only
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
			for task, op := range vm.CurrentOperations {
				if op == "migrate_send" {
					r.plog.Info("adopting the running VM.migrate_send task", "task", task)
					h.Task = task
				}
			}
		}
		if err := r.save(ctx); err != nil {
			return PhaseHandoff, err
		}
	}
	if !h.Done && h.Task == "" {
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
			return PhaseHandoff, fmt.Errorf("poll VM.migrate_send task: %w", err)
		}
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
	if rollback && cp.Seed.Throttled && !cp.Seed.ThrottleRemoved && r.d.Throttle != nil {
		if err := r.d.Throttle.ThrottleGuest(ctx, cp.MigrationID, cp.Request.VMUUID, 0); err != nil {
			errs = append(errs, fmt.Errorf("remove guest throttle: %w", err))
		} else {
			cp.Seed.ThrottleRemoved = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	if cp.GatewayUp && !cp.GatewayDown {
		if err := r.d.Gateway.Stop(ctx, cp.MigrationID); err != nil {
			errs = append(errs, fmt.Errorf("stop gateway: %w", err))
		} else {
			cp.GatewayDown = true
			if err := r.save(ctx); err != nil {
				return err
			}
		}
	}
	if cp.AgentsStarted && !cp.AgentsStopped {
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
