package xapiadapt

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"sync"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

// Pool is one pool's xapi as the engine uses it. It implements
// engine.SourcePool, engine.DestPool and engine.VDIFinder.
type Pool struct {
	c   *xapi.Client
	log hclog.Logger

	mu   sync.Mutex
	pool xapi.PoolRef
}

var (
	_ engine.SourcePool = (*Pool)(nil)
	_ engine.DestPool   = (*Pool)(nil)
	_ engine.VDIFinder  = (*Pool)(nil)
)

// NewPool returns the adapter for the pool c is logged in to. A nil logger
// discards.
func NewPool(c *xapi.Client, logger hclog.Logger) *Pool {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &Pool{c: c, log: logger.Named("xapiadapt")}
}

// Client returns the underlying client.
func (p *Pool) Client() *xapi.Client { return p.c }

// PoolRef returns the ref of the (only) pool, cached after the first call.
func (p *Pool) PoolRef(ctx context.Context) (xapi.PoolRef, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pool != "" {
		return p.pool, nil
	}
	ref, err := p.c.ThePool(ctx)
	if err != nil {
		return "", fmt.Errorf("pool.get_all: %w", mapErr(err))
	}
	p.pool = ref
	return ref, nil
}

// VMByUUID implements engine.SourcePool and engine.DestPool.
func (p *Pool) VMByUUID(ctx context.Context, uuid string) (engine.VMRecord, error) {
	ref, err := p.c.VMGetByUUID(ctx, uuid)
	if err != nil {
		return engine.VMRecord{}, fmt.Errorf("VM.get_by_uuid %s: %w", uuid, mapErr(err))
	}
	rec, err := p.c.VMGetRecord(ctx, ref)
	if err != nil {
		return engine.VMRecord{}, fmt.Errorf("VM.get_record: %w", mapErr(err))
	}
	return vmRecord(ref, rec), nil
}

func vmRecord(ref xapi.VMRef, rec xapi.VMRecord) engine.VMRecord {
	mem := rec.MemoryTarget
	if mem <= 0 {
		mem = rec.MemoryDynamicMax
	}
	if mem <= 0 {
		mem = rec.MemoryStaticMax
	}
	resident := string(rec.ResidentOn)
	if rec.ResidentOn.IsNull() {
		resident = ""
	}
	return engine.VMRecord{
		Ref: string(ref), UUID: rec.UUID, NameLabel: rec.NameLabel, PowerState: string(rec.PowerState),
		ResidentOn: resident, MemoryBytes: mem, CurrentOperations: rec.CurrentOperations,
	}
}

// VMDisks implements engine.SourcePool: the VM's VBDs of type Disk that
// are not empty, with their VDIs, in userdevice order.
func (p *Pool) VMDisks(ctx context.Context, vm string) ([]engine.Disk, error) {
	rec, err := p.c.VMGetRecord(ctx, xapi.VMRef(vm))
	if err != nil {
		return nil, fmt.Errorf("VM.get_record: %w", mapErr(err))
	}
	var out []engine.Disk
	for _, vbdRef := range rec.VBDs {
		vbd, err := p.c.VBDGetRecord(ctx, vbdRef)
		if err != nil {
			return nil, fmt.Errorf("VBD.get_record: %w", mapErr(err))
		}
		if vbd.Type != xapi.VBDTypeDisk || vbd.Empty || vbd.VDI.IsNull() {
			continue
		}
		vdi, err := p.c.VDIGetRecord(ctx, vbd.VDI)
		if err != nil {
			return nil, fmt.Errorf("VDI.get_record: %w", mapErr(err))
		}
		out = append(out, engine.Disk{
			VDIRef: string(vbd.VDI), VDIUUID: vdi.UUID, SRRef: string(vdi.SR), NameLabel: vdi.NameLabel,
			Device: vbd.Userdevice, VirtualSize: vdi.VirtualSize, PhysicalUtilisation: vdi.PhysicalUtilisation,
			CBTEnabled: vdi.CBTEnabled,
		})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out, nil
}

// VMVIFs implements engine.SourcePool. Each VIF carries the addresses the
// guest agent reported for its device (VM_guest_metrics.networks, see
// xapi.GuestNetworks); a VM without guest metrics, or whose metrics cannot
// be read, gives VIFs without addresses, never an error.
func (p *Pool) VMVIFs(ctx context.Context, vm string) ([]engine.VIF, error) {
	rec, err := p.c.VMGetRecord(ctx, xapi.VMRef(vm))
	if err != nil {
		return nil, fmt.Errorf("VM.get_record: %w", mapErr(err))
	}
	addrs, err := p.guestAddresses(ctx, vm, rec.GuestMetrics)
	if err != nil {
		return nil, err
	}
	var out []engine.VIF
	for _, ref := range rec.VIFs {
		v, err := p.c.VIFGetRecord(ctx, ref)
		if err != nil {
			return nil, fmt.Errorf("VIF.get_record: %w", mapErr(err))
		}
		a := addrs[v.Device]
		out = append(out, engine.VIF{Ref: string(ref), Device: v.Device, MAC: v.MAC, NetworkRef: string(v.Network),
			IPv4: a.IPv4, IPv6: a.IPv6})
	}
	sort.SliceStable(out, func(i, j int) bool { return out[i].Device < out[j].Device })
	return out, nil
}

// guestAddresses reads the guest-reported addresses per VIF device. A null
// ref gives none; a read failure (the metrics object vanished, an old
// server) is logged and gives none too: the addresses only help the
// network backend announce the VM, they never block a migration. Only a
// cancelled context is an error.
func (p *Pool) guestAddresses(ctx context.Context, vm string, gm xapi.VMGuestMetricsRef) (map[string]xapi.GuestAddresses, error) {
	if gm.IsNull() {
		p.log.Debug("vm has no guest metrics: no guest addresses", "vm", vm)
		return nil, nil
	}
	nets, err := p.c.VMGuestMetricsGetNetworks(ctx, gm)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("VM_guest_metrics.get_networks: %w", ctx.Err())
		}
		p.log.Warn("cannot read guest metrics: no guest addresses", "vm", vm, "error", err)
		return nil, nil
	}
	return xapi.GuestNetworks(nets), nil
}

// PoolOtherConfig implements engine.SourcePool and engine.DestPool.
func (p *Pool) PoolOtherConfig(ctx context.Context) (map[string]string, error) {
	ref, err := p.PoolRef(ctx)
	if err != nil {
		return nil, err
	}
	m, err := p.c.PoolGetOtherConfig(ctx, ref)
	if err != nil {
		return nil, fmt.Errorf("pool.get_other_config: %w", mapErr(err))
	}
	if m == nil {
		m = map[string]string{}
	}
	return m, nil
}

// SetPoolOtherConfig writes pool.other_config entries with remove-then-add
// (so an existing key never gives MAP_DUPLICATE_KEY); an empty value only
// removes the key. Keys are written in sorted order.
func (p *Pool) SetPoolOtherConfig(ctx context.Context, entries map[string]string) error {
	ref, err := p.PoolRef(ctx)
	if err != nil {
		return err
	}
	keys := make([]string, 0, len(entries))
	for k := range entries {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := p.c.PoolRemoveFromOtherConfig(ctx, ref, k); err != nil {
			return fmt.Errorf("pool.remove_from_other_config %s: %w", k, mapErr(err))
		}
		if entries[k] == "" {
			continue
		}
		if err := p.c.PoolAddToOtherConfig(ctx, ref, k, entries[k]); err != nil {
			return fmt.Errorf("pool.add_to_other_config %s: %w", k, mapErr(err))
		}
	}
	return nil
}

// EnableCBT implements engine.SourcePool.
func (p *Pool) EnableCBT(ctx context.Context, vdi string) error {
	if err := p.c.VDIEnableCBT(ctx, xapi.VDIRef(vdi)); err != nil {
		return fmt.Errorf("VDI.enable_cbt: %w", mapErr(err))
	}
	return nil
}

// DisableCBT implements engine.SourcePool.
func (p *Pool) DisableCBT(ctx context.Context, vdi string) error {
	if err := p.c.VDIDisableCBT(ctx, xapi.VDIRef(vdi)); err != nil {
		return fmt.Errorf("VDI.disable_cbt: %w", mapErr(err))
	}
	return nil
}

// SnapshotVDI implements engine.SourcePool: VDI.snapshot(vdi, {}), then
// each tag written to the snapshot's other_config (remove-then-add, sorted
// keys). A crash between the two calls leaves an untagged snapshot (see
// docs/engine.md).
func (p *Pool) SnapshotVDI(ctx context.Context, vdi string, tags map[string]string) (string, error) {
	snap, err := p.c.VDISnapshot(ctx, xapi.VDIRef(vdi), map[string]string{})
	if err != nil {
		return "", fmt.Errorf("VDI.snapshot: %w", mapErr(err))
	}
	keys := make([]string, 0, len(tags))
	for k := range tags {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := p.setVDIKey(ctx, snap, k, tags[k]); err != nil {
			return string(snap), err
		}
	}
	return string(snap), nil
}

func (p *Pool) setVDIKey(ctx context.Context, vdi xapi.VDIRef, key, value string) error {
	if err := p.c.VDIRemoveFromOtherConfig(ctx, vdi, key); err != nil {
		return fmt.Errorf("VDI.remove_from_other_config %s: %w", key, mapErr(err))
	}
	if err := p.c.VDIAddToOtherConfig(ctx, vdi, key, value); err != nil {
		return fmt.Errorf("VDI.add_to_other_config %s: %w", key, mapErr(err))
	}
	return nil
}

// VDIContentID implements engine.SourcePool.
func (p *Pool) VDIContentID(ctx context.Context, vdi string) (string, error) {
	rec, err := p.c.VDIGetRecord(ctx, xapi.VDIRef(vdi))
	if err != nil {
		return "", fmt.Errorf("VDI.get_record: %w", mapErr(err))
	}
	return rec.OtherConfig["content_id"], nil
}

// SetVDIContentID implements engine.SourcePool and engine.DestPool.
func (p *Pool) SetVDIContentID(ctx context.Context, vdi, contentID string) error {
	return p.setVDIKey(ctx, xapi.VDIRef(vdi), "content_id", contentID)
}

// ListChangedBlocks implements engine.SourcePool.
func (p *Pool) ListChangedBlocks(ctx context.Context, from, to string) (string, error) {
	s, err := p.c.VDIListChangedBlocks(ctx, xapi.VDIRef(from), xapi.VDIRef(to))
	if err != nil {
		return "", fmt.Errorf("VDI.list_changed_blocks: %w", mapErr(err))
	}
	return s, nil
}

// DataDestroyVDI implements engine.SourcePool.
func (p *Pool) DataDestroyVDI(ctx context.Context, vdi string) error {
	if err := p.c.VDIDataDestroy(ctx, xapi.VDIRef(vdi)); err != nil {
		return fmt.Errorf("VDI.data_destroy: %w", mapErr(err))
	}
	return nil
}

// DestroyVDI implements engine.SourcePool and engine.DestPool (a VDI that
// is already gone gives an error wrapping engine.ErrNotFound).
func (p *Pool) DestroyVDI(ctx context.Context, vdi string) error {
	if err := p.c.VDIDestroy(ctx, xapi.VDIRef(vdi)); err != nil {
		return fmt.Errorf("VDI.destroy: %w", mapErr(err))
	}
	return nil
}

func migrateMaps(a engine.MigrateArgs) (map[xapi.VDIRef]xapi.SRRef, map[xapi.VIFRef]xapi.NetworkRef) {
	vdis := make(map[xapi.VDIRef]xapi.SRRef, len(a.VDIMap))
	for k, v := range a.VDIMap {
		vdis[xapi.VDIRef(k)] = xapi.SRRef(v)
	}
	vifs := make(map[xapi.VIFRef]xapi.NetworkRef, len(a.VIFMap))
	for k, v := range a.VIFMap {
		vifs[xapi.VIFRef(k)] = xapi.NetworkRef(v)
	}
	return vdis, vifs
}

// AssertCanMigrate implements engine.SourcePool.
func (p *Pool) AssertCanMigrate(ctx context.Context, a engine.MigrateArgs) error {
	vdis, vifs := migrateMaps(a)
	if err := p.c.VMAssertCanMigrate(ctx, xapi.VMRef(a.VM), a.Dest, a.Live, vdis, vifs, a.Options); err != nil {
		return fmt.Errorf("VM.assert_can_migrate: %w", mapErr(err))
	}
	return nil
}

// MigrateSend implements engine.SourcePool: Async.VM.migrate_send, returning
// its task ref.
func (p *Pool) MigrateSend(ctx context.Context, a engine.MigrateArgs) (string, error) {
	vdis, vifs := migrateMaps(a)
	t, err := p.c.AsyncVMMigrateSend(ctx, xapi.VMRef(a.VM), a.Dest, a.Live, vdis, vifs, a.Options)
	if err != nil {
		return "", fmt.Errorf("Async.VM.migrate_send: %w", mapErr(err))
	}
	return string(t), nil
}

// PoolMaster implements engine.DestPool.
func (p *Pool) PoolMaster(ctx context.Context) (string, error) {
	ref, err := p.PoolRef(ctx)
	if err != nil {
		return "", err
	}
	h, err := p.c.PoolGetMaster(ctx, ref)
	if err != nil {
		return "", fmt.Errorf("pool.get_master: %w", mapErr(err))
	}
	return string(h), nil
}

// ErrNoSR: the pool has no default SR and no SR that can hold a replica.
var ErrNoSR = errors.New("no usable SR")

// DefaultSR is DefaultSRFor the pool coordinator, the host a migration
// lands on when none is asked for.
func (p *Pool) DefaultSR(ctx context.Context) (string, error) { return p.DefaultSRFor(ctx, "") }

// DefaultSRFor implements engine.DestPool. It returns the SR that disks of
// a VM arriving on host go to:
// pool.default_SR when host can use it, otherwise the SR with the most free
// space among the SRs that can hold disks (content_type not "iso", type not
// iso/udev) and are plugged on host (a PBD of host with currently_attached),
// shared SRs preferred over the host's local ones. A local SR of another
// host is never chosen: the VM could not reach it. An empty host means the
// pool coordinator.
func (p *Pool) DefaultSRFor(ctx context.Context, host string) (string, error) {
	ref, err := p.PoolRef(ctx)
	if err != nil {
		return "", err
	}
	rec, err := p.c.PoolGetRecord(ctx, ref)
	if err != nil {
		return "", fmt.Errorf("pool.get_record: %w", mapErr(err))
	}
	if host == "" {
		host = string(rec.Master)
	}
	return p.defaultSRFor(ctx, rec, host)
}

// pbdRecord is the part of a PBD record DefaultSRFor needs.
type pbdRecord struct {
	Host              xapi.HostRef `xapi:"host"`
	SR                xapi.SRRef   `xapi:"SR"`
	CurrentlyAttached bool         `xapi:"currently_attached"`
}

func (p *Pool) defaultSRFor(ctx context.Context, rec xapi.PoolRecord, host string) (string, error) {
	var pbds map[string]pbdRecord
	if err := p.c.CallInto(ctx, &pbds, "PBD.get_all_records"); err != nil {
		return "", fmt.Errorf("PBD.get_all_records: %w", mapErr(err))
	}
	plugged := map[xapi.SRRef]bool{} // SRs host can use
	for _, pbd := range pbds {
		if string(pbd.Host) == host && pbd.CurrentlyAttached {
			plugged[pbd.SR] = true
		}
	}
	if !rec.DefaultSR.IsNull() {
		_, err := p.c.SRGetRecord(ctx, rec.DefaultSR)
		switch {
		case err != nil:
			p.log.Warn("pool.default_SR is not a valid SR; choosing one", "sr", string(rec.DefaultSR))
		case !plugged[rec.DefaultSR]:
			p.log.Warn("pool.default_SR is not plugged on the destination host; choosing one",
				"sr", string(rec.DefaultSR), "host", host)
		default:
			return string(rec.DefaultSR), nil
		}
	}
	srs, err := p.c.SRGetAllRecords(ctx)
	if err != nil {
		return "", fmt.Errorf("SR.get_all_records: %w", mapErr(err))
	}
	best, bestFree, bestShared := xapi.SRRef(""), int64(-1), false
	refs := make([]string, 0, len(srs))
	for r := range srs {
		refs = append(refs, string(r))
	}
	sort.Strings(refs)
	for _, r := range refs {
		sr := srs[xapi.SRRef(r)]
		if strings.EqualFold(sr.ContentType, "iso") || sr.Type == "iso" || sr.Type == "udev" || !plugged[xapi.SRRef(r)] {
			continue
		}
		free := sr.PhysicalSize - sr.PhysicalUtilisation
		if free <= 0 {
			continue
		}
		if best == "" || (sr.Shared && !bestShared) || (sr.Shared == bestShared && free > bestFree) {
			best, bestFree, bestShared = xapi.SRRef(r), free, sr.Shared
		}
	}
	if best == "" {
		return "", fmt.Errorf("destination pool: %w (no usable pool.default_SR and no non-ISO SR with free space plugged on host %s)", ErrNoSR, host)
	}
	return string(best), nil
}

// ManagementNetwork implements engine.DestPool: the network of the host's
// PIF with management = true.
func (p *Pool) ManagementNetwork(ctx context.Context, host string) (string, error) {
	h, err := p.c.HostGetRecord(ctx, xapi.HostRef(host))
	if err != nil {
		return "", fmt.Errorf("host.get_record: %w", mapErr(err))
	}
	for _, ref := range h.PIFs {
		pif, err := p.c.PIFGetRecord(ctx, ref)
		if err != nil {
			return "", fmt.Errorf("PIF.get_record: %w", mapErr(err))
		}
		if pif.Management {
			return string(pif.Network), nil
		}
	}
	return "", fmt.Errorf("host %s has no management PIF: %w", host, engine.ErrNotFound)
}

// CreateVDI implements engine.DestPool: VDI.create (type user, not
// sharable, not read-only) with the spec's name, size and other_config.
func (p *Pool) CreateVDI(ctx context.Context, spec engine.VDISpec) (string, string, error) {
	ref, err := p.c.VDICreate(ctx, xapi.VDICreateSpec{
		NameLabel: spec.NameLabel, NameDescription: spec.Description, SR: xapi.SRRef(spec.SRRef),
		VirtualSize: spec.VirtualSize, Type: xapi.VDITypeUser, OtherConfig: spec.OtherConfig,
	})
	if err != nil {
		return "", "", fmt.Errorf("VDI.create: %w", mapErr(err))
	}
	rec, err := p.c.VDIGetRecord(ctx, ref)
	if err != nil {
		return string(ref), "", fmt.Errorf("VDI.get_record: %w", mapErr(err))
	}
	return string(ref), rec.UUID, nil
}

// MigrateReceive implements engine.DestPool.
func (p *Pool) MigrateReceive(ctx context.Context, host, network string, options map[string]string) (map[string]string, error) {
	if options == nil {
		options = map[string]string{}
	}
	m, err := p.c.HostMigrateReceive(ctx, xapi.HostRef(host), xapi.NetworkRef(network), options)
	if err != nil {
		return nil, fmt.Errorf("host.migrate_receive: %w", mapErr(err))
	}
	return m, nil
}

// FindVDIs implements engine.VDIFinder: ref → uuid of the VDIs whose
// other_config holds every entry of match.
func (p *Pool) FindVDIs(ctx context.Context, match map[string]string) (map[string]string, error) {
	all, err := p.c.VDIGetAllRecords(ctx)
	if err != nil {
		return nil, fmt.Errorf("VDI.get_all_records: %w", mapErr(err))
	}
	out := map[string]string{}
	for ref, v := range all {
		ok := true
		for k, want := range match {
			if got, has := v.OtherConfig[k]; !has || got != want {
				ok = false
				break
			}
		}
		if ok {
			out[string(ref)] = v.UUID
		}
	}
	return out, nil
}

// FindVM resolves a VM given by UUID or by name label (the CLI's --vm).
// Templates, snapshots and control domains are ignored; a name that matches
// several VMs is an error listing their UUIDs.
func (p *Pool) FindVM(ctx context.Context, nameOrUUID string) (engine.VMRecord, error) {
	if looksLikeUUID(nameOrUUID) {
		v, err := p.VMByUUID(ctx, nameOrUUID)
		if err == nil || !errors.Is(err, engine.ErrNotFound) {
			return v, err
		}
	}
	refs, err := p.c.VMGetByNameLabel(ctx, nameOrUUID)
	if err != nil {
		return engine.VMRecord{}, fmt.Errorf("VM.get_by_name_label: %w", mapErr(err))
	}
	var found []engine.VMRecord
	for _, r := range refs {
		rec, err := p.c.VMGetRecord(ctx, r)
		if err != nil {
			continue
		}
		if rec.IsATemplate || rec.IsASnapshot || rec.IsControlDomain {
			continue
		}
		found = append(found, vmRecord(r, rec))
	}
	switch len(found) {
	case 0:
		return engine.VMRecord{}, fmt.Errorf("vm %q: %w", nameOrUUID, engine.ErrNotFound)
	case 1:
		return found[0], nil
	}
	uuids := make([]string, len(found))
	for i, v := range found {
		uuids[i] = v.UUID
	}
	sort.Strings(uuids)
	return engine.VMRecord{}, fmt.Errorf("%d VMs are named %q (%s): give the UUID", len(found), nameOrUUID, strings.Join(uuids, ", "))
}

// FindSR resolves an SR given by UUID or name label.
func (p *Pool) FindSR(ctx context.Context, nameOrUUID string) (string, error) {
	if looksLikeUUID(nameOrUUID) {
		if ref, err := p.c.SRGetByUUID(ctx, nameOrUUID); err == nil {
			return string(ref), nil
		}
	}
	refs, err := p.c.SRGetByNameLabel(ctx, nameOrUUID)
	if err != nil {
		return "", fmt.Errorf("SR.get_by_name_label: %w", mapErr(err))
	}
	switch len(refs) {
	case 0:
		return "", fmt.Errorf("sr %q: %w", nameOrUUID, engine.ErrNotFound)
	case 1:
		return string(refs[0]), nil
	}
	return "", fmt.Errorf("%d SRs are named %q: give the UUID", len(refs), nameOrUUID)
}

// FindNetwork resolves a network given by UUID or name label.
func (p *Pool) FindNetwork(ctx context.Context, nameOrUUID string) (string, error) {
	if looksLikeUUID(nameOrUUID) {
		if ref, err := p.c.NetworkGetByUUID(ctx, nameOrUUID); err == nil {
			return string(ref), nil
		}
	}
	refs, err := p.c.NetworkGetByNameLabel(ctx, nameOrUUID)
	if err != nil {
		return "", fmt.Errorf("network.get_by_name_label: %w", mapErr(err))
	}
	switch len(refs) {
	case 0:
		return "", fmt.Errorf("network %q: %w", nameOrUUID, engine.ErrNotFound)
	case 1:
		return string(refs[0]), nil
	}
	return "", fmt.Errorf("%d networks are named %q: give the UUID", len(refs), nameOrUUID)
}

// FindHost resolves a host given by UUID or name label.
func (p *Pool) FindHost(ctx context.Context, nameOrUUID string) (string, error) {
	if looksLikeUUID(nameOrUUID) {
		if ref, err := p.c.HostGetByUUID(ctx, nameOrUUID); err == nil {
			return string(ref), nil
		}
	}
	refs, err := p.c.HostGetByNameLabel(ctx, nameOrUUID)
	if err != nil {
		return "", fmt.Errorf("host.get_by_name_label: %w", mapErr(err))
	}
	switch len(refs) {
	case 0:
		return "", fmt.Errorf("host %q: %w", nameOrUUID, engine.ErrNotFound)
	case 1:
		return string(refs[0]), nil
	}
	return "", fmt.Errorf("%d hosts are named %q: give the UUID", len(refs), nameOrUUID)
}

func looksLikeUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i, r := range s {
		switch i {
		case 8, 13, 18, 23:
			if r != '-' {
				return false
			}
		default:
			if !(r >= '0' && r <= '9' || r >= 'a' && r <= 'f' || r >= 'A' && r <= 'F') {
				return false
			}
		}
	}
	return true
}
