package engine

import (
	"context"
	"fmt"
	"sort"
)

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
	labels := [][2]string{{"applies_to", applies}, {"wanmotion:migration_id", cp.MigrationID}}
	if cp.TaskCreated {
		labels = append(labels, [2]string{TaskOwnerKey, TaskOwnerController})
	}
	for _, kv := range labels {
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
		StorageBackend: r.cp.Settings.Storage, NetworkBackend: r.cp.Settings.Network,
		SourceConfig: r.cp.Settings.SourceConfig, DestConfig: r.cp.Settings.DestConfig}
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
		if !cp.AgentsLaunching {
			cp.AgentsLaunching = true
			if err := r.save(ctx); err != nil {
				return PhasePrepare, err
			}
		}
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
