package engine

import (
	"context"
	"errors"
	"fmt"
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
	// SRLabels optionally names destination SRs for people: SR ref →
	// "name (uuid)". Text prints the ref of an SR not in it.
	SRLabels map[string]string
}

// Text renders a plan for people (--dry-run).
func (p PlanResult) Text() string {
	var b strings.Builder
	e := p.Estimate
	fmt.Fprintf(&b, "plan for VM %s (%s)\n", p.VMName, p.VMUUID)
	fmt.Fprintf(&b, "  backends:          storage %s, network %s\n", p.Settings.Storage, p.Settings.Network)
	for _, d := range p.Disks {
		sr := d.DestSR
		if l := p.SRLabels[sr]; l != "" {
			sr = l
		}
		fmt.Fprintf(&b, "  disk %-4s %s: %s allocated of %s -> SR %s\n", d.Disk.Device, d.Disk.VDIUUID, HumanBytes(allocated(d.Disk)), HumanBytes(d.Disk.VirtualSize), sr)
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
	if p.DestHost = rq.DestHost; p.DestHost == "" {
		if p.DestHost, err = d.Dest.PoolMaster(ctx); err != nil {
			return p, fmt.Errorf("destination pool coordinator: %w", err)
		}
	}
	defaultSR := rq.DestSR
	for _, dk := range disks {
		sr := rq.SRMap[dk.VDIUUID]
		if sr == "" {
			sr = rq.SRMap[dk.SRRef]
		}
		if sr == "" {
			if defaultSR == "" {
				if defaultSR, err = d.Dest.DefaultSRFor(ctx, p.DestHost); err != nil {
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
	var inst Installed
	if hc, ok := d.Catalog.(HostCatalog); ok {
		inst, err = hc.InstalledOn(ctx, vm.ResidentOn, p.DestHost)
	} else {
		inst, err = d.Catalog.Installed(ctx)
	}
	if err != nil {
		return p, fmt.Errorf("installed backends: %w", err)
	}
	if p.Settings, err = Resolve(srcO, dstO, rq.Overrides, inst); err != nil {
		return p, err
	}
	if p.Settings.Network != NetworkNone && d.Network == nil {
		return p, fmt.Errorf("%w: network backend %q configured but the engine has no network driver", ErrConfig, p.Settings.Network)
	}
	if p.Settings.Policy == PolicyThrottle {
		if d.Throttle == nil {
			return p, fmt.Errorf("%w: convergence_policy throttle: this installation has no guest throttle; choose keep-going or stop", ErrConfig)
		}
		if c, ok := d.Throttle.(ThrottleChecker); ok {
			if err := c.CheckThrottle(ctx, p.VMUUID); err != nil {
				return p, fmt.Errorf("%w: convergence_policy throttle cannot slow this guest: %w; fix that or choose keep-going or stop", ErrConfig, err)
			}
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
