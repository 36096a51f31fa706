package engine

import (
	"context"
	"time"
)

// All references (VM, VDI, SR, host, network, task) are xapi OpaqueRef
// strings; the engine never interprets them.

// VMRecord is the part of a VM record the engine reads.
type VMRecord struct {
	Ref        string
	UUID       string
	NameLabel  string
	PowerState string // xapi vm_power_state: "Running", "Halted", "Paused", "Suspended"
	ResidentOn string // host ref
	// MemoryBytes is the VM's memory (memory_dynamic_max or memory_target).
	MemoryBytes int64
	// CurrentOperations is VM.current_operations: task ref → operation
	// ("migrate_send" while xapi migrates the VM).
	CurrentOperations map[string]string
}

// Disk is one VDI of a VM that must move (CD drives excluded by the adapter).
type Disk struct {
	VDIRef              string `msgpack:"vdi_ref"`
	VDIUUID             string `msgpack:"vdi_uuid"`
	SRRef               string `msgpack:"sr_ref"`
	NameLabel           string `msgpack:"name_label"`
	Device              string `msgpack:"device"` // VBD userdevice, for messages
	VirtualSize         int64  `msgpack:"virtual_size"`
	PhysicalUtilisation int64  `msgpack:"physical_utilisation"` // allocated bytes: what a sparse copy moves
	CBTEnabled          bool   `msgpack:"cbt_enabled"`
}

// VIF is one network interface of a VM.
type VIF struct {
	Ref        string `msgpack:"ref"`
	Device     string `msgpack:"device"`
	MAC        string `msgpack:"mac"`
	NetworkRef string `msgpack:"network_ref"`
	// IPv4 and IPv6 are the addresses the guest agent reported for this
	// VIF (VM_guest_metrics.networks), sorted and deduplicated; empty when
	// the VM has no guest agent. Network backends announce them at the
	// destination (gratuitous ARP, unsolicited neighbour advertisements).
	// Optional in checkpoints: plans written before they existed load
	// with both empty.
	IPv4 []string `msgpack:"ipv4,omitempty"`
	IPv6 []string `msgpack:"ipv6,omitempty"`
}

// VDISpec describes a replica VDI to create on the destination SR.
type VDISpec struct {
	SRRef       string
	NameLabel   string
	Description string
	VirtualSize int64
	OtherConfig map[string]string
}

// MigrateArgs are the arguments of VM.assert_can_migrate and VM.migrate_send
// (vgpu_map omitted, i.e. {}).
type MigrateArgs struct {
	VM      string
	Dest    map[string]string // the (rewritten) host.migrate_receive result
	Live    bool
	VDIMap  map[string]string // source VDI ref → destination SR ref
	VIFMap  map[string]string // source VIF ref → destination network ref
	Options map[string]string
}

// TaskStatus is xapi's task_status_type.
type TaskStatus string

// The xapi task states.
const (
	TaskPending   TaskStatus = "pending"
	TaskSuccess   TaskStatus = "success"
	TaskFailure   TaskStatus = "failure"
	TaskCancelled TaskStatus = "cancelled"
)

// TaskRecord is the part of a task record the engine reads.
type TaskRecord struct {
	Status            TaskStatus
	Progress          float64
	Result            string   // for VM.migrate_send: the destination VM ref (decoded from the XML-RPC value string)
	ErrorInfo         []string // code then params
	CurrentOperations map[string]string
	OtherConfig       map[string]string
}

// SourcePool is the source pool's xapi as the engine uses it.
type SourcePool interface {
	// VMByUUID returns the VM, or an error wrapping ErrNotFound when this pool
	// has no VM with that UUID (e.g. after it migrated away).
	VMByUUID(ctx context.Context, uuid string) (VMRecord, error)
	// VMDisks lists the VM's disk VDIs (VBD type Disk, not CDs).
	VMDisks(ctx context.Context, vm string) ([]Disk, error)
	VMVIFs(ctx context.Context, vm string) ([]VIF, error)
	PoolOtherConfig(ctx context.Context) (map[string]string, error)

	EnableCBT(ctx context.Context, vdi string) error
	DisableCBT(ctx context.Context, vdi string) error
	// SnapshotVDI calls VDI.snapshot(vdi, {}) and then adds tags to the new
	// snapshot's other_config (remove-then-add). Returns the snapshot ref.
	SnapshotVDI(ctx context.Context, vdi string, tags map[string]string) (string, error)
	// VDIContentID returns other_config["content_id"] of a VDI ("" if unset).
	VDIContentID(ctx context.Context, vdi string) (string, error)
	// SetVDIContentID sets other_config["content_id"] (remove-then-add).
	SetVDIContentID(ctx context.Context, vdi, contentID string) error
	// ListChangedBlocks is VDI.list_changed_blocks(from, to): a base64 bitmap,
	// one bit per 64 KiB block, most significant bit first.
	ListChangedBlocks(ctx context.Context, from, to string) (string, error)
	DataDestroyVDI(ctx context.Context, vdi string) error
	// DestroyVDI destroys a VDI; an error wrapping ErrNotFound counts as done.
	DestroyVDI(ctx context.Context, vdi string) error

	AssertCanMigrate(ctx context.Context, args MigrateArgs) error
	// MigrateSend starts Async.VM.migrate_send and returns its task ref.
	MigrateSend(ctx context.Context, args MigrateArgs) (string, error)
}

// DestPool is the destination pool's xapi as the engine uses it.
type DestPool interface {
	VMByUUID(ctx context.Context, uuid string) (VMRecord, error)
	PoolOtherConfig(ctx context.Context) (map[string]string, error)
	// PoolMaster returns the destination pool coordinator's host ref.
	PoolMaster(ctx context.Context) (string, error)
	// DefaultSRFor returns the SR new disks for host go to: pool.default_SR
	// when host can use it, else a shared SR, else an SR plugged on host
	// ("" host: the coordinator).
	DefaultSRFor(ctx context.Context, host string) (string, error)
	// ManagementNetwork returns the network of the host's management PIF.
	ManagementNetwork(ctx context.Context, host string) (string, error)
	// CreateVDI creates an empty VDI and returns its ref and uuid.
	CreateVDI(ctx context.Context, spec VDISpec) (ref, uuid string, err error)
	// DestroyVDI destroys a VDI; an error wrapping ErrNotFound counts as done.
	DestroyVDI(ctx context.Context, vdi string) error
	// SetVDIContentID sets other_config["content_id"] (remove-then-add).
	SetVDIContentID(ctx context.Context, vdi, contentID string) error
	// MigrateReceive is host.migrate_receive(host, network, options).
	MigrateReceive(ctx context.Context, host, network string, options map[string]string) (map[string]string, error)
}

// Tasks is the task API of the source pool (where the engine's own task
// lives and where VM.migrate_send's task runs).
type Tasks interface {
	CreateTask(ctx context.Context, label, description string) (string, error)
	// AddTaskOtherConfig is remove-then-add of one other_config key.
	AddTaskOtherConfig(ctx context.Context, task, key, value string) error
	SetTaskProgress(ctx context.Context, task string, progress float64) error
	SetTaskStatus(ctx context.Context, task string, status TaskStatus) error
	SetTaskResult(ctx context.Context, task, result string) error
	SetTaskErrorInfo(ctx context.Context, task string, info []string) error
	// TaskRecord returns the task; an error wrapping ErrNotFound when gone.
	TaskRecord(ctx context.Context, task string) (TaskRecord, error)
}

// DiskKey names one disk of one migration for the storage backend.
type DiskKey struct {
	MigrationID string
	DiskID      string // source VDI uuid
}

// ReceiverSpec asks the destination side to get ready to fill a replica
// (the engine has created the replica VDI).
type ReceiverSpec struct {
	Key         DiskKey
	Backend     string
	Disk        Disk   // the source disk
	ReplicaVDI  string // ref
	ReplicaUUID string
	DestSR      string // ref
}

// ReceiverInfo is what the destination side answers.
type ReceiverInfo struct {
	// Address is where the receiver listens at the destination site
	// ("host:port"); the engine makes it reachable from the source through
	// the WAN gateway (Gateway.Forward). Empty when the backend needs no
	// channel of its own.
	Address string
	// Endpoint is the rest of the receiver's endpoint (token, parameters),
	// opaque to the engine and handed to the sender.
	Endpoint []byte
	// State is the backend's opaque handle state, kept in the checkpoint.
	State []byte
}

// Peer is the receiver as the source sees it.
type Peer struct {
	Address  string // local end of the gateway channel to ReceiverInfo.Address ("" if none)
	Endpoint []byte // ReceiverInfo.Endpoint
}

// SenderSpec asks the source side to get ready to send a VDI.
type SenderSpec struct {
	Key                  DiskKey
	Backend              string
	Disk                 Disk
	Peer                 Peer
	Streams              int
	Compression          string
	BandwidthBytesPerSec int64
}

// SyncSpec is one seed round for one disk: make the replica equal to
// Snapshot, copying everything allocated (Full) or only the blocks set in
// Bitmap (BlockSize bytes per bit, most significant bit first).
type SyncSpec struct {
	Key               DiskKey
	Round             int
	Snapshot          string // source snapshot ref (Sk)
	SnapshotContentID string
	Full              bool
	Bitmap            []byte
	BlockSize         int
}

// SyncResult reports a finished round of one disk.
type SyncResult struct {
	BytesToCopy int64
	BytesCopied int64
	BytesOnWire int64
	State       []byte // new sender state (nil: unchanged)
}

// SyncStatus is the progress of a disk's round in flight.
type SyncStatus struct {
	Round       int
	BytesToCopy int64
	BytesCopied int64
	BytesOnWire int64
	Error       string
}

// StorageBackend is the storage strategy as driven through the site agents
// (one source and one destination handle per disk, kept by the adapter and
// re-bound from the checkpointed states after a controller restart).
// Every method is idempotent for the same arguments.
type StorageBackend interface {
	PrepareReceiver(ctx context.Context, spec ReceiverSpec) (ReceiverInfo, error)
	// PrepareSender returns the sender's opaque state.
	PrepareSender(ctx context.Context, spec SenderSpec) ([]byte, error)
	// SyncRound runs one round and returns once the receiver made it
	// durable. Called again for the same round after an interruption, it
	// redoes only what is missing.
	SyncRound(ctx context.Context, spec SyncSpec) (SyncResult, error)
	// SyncStatus reports progress; called while SyncRound runs.
	SyncStatus(ctx context.Context, key DiskKey) (SyncStatus, error)
	// Finalize runs before Handoff: wait until the replica equals the last
	// synced snapshot and hand it over to xapi (detached from the backend,
	// kept). Returns the new receiver state (nil: unchanged).
	Finalize(ctx context.Context, key DiskKey) ([]byte, error)
	// RecoverReceiver re-binds the destination handle; the receiver may
	// listen somewhere new.
	RecoverReceiver(ctx context.Context, key DiskKey, state []byte) (ReceiverInfo, error)
	// RecoverSender re-binds the source handle with the current peer.
	RecoverSender(ctx context.Context, key DiskKey, state []byte, peer Peer) error
	// Abort stops any work on the disk at once.
	Abort(ctx context.Context, key DiskKey) error
	// Cleanup frees what the backend holds for the disk (never the replica
	// VDI: the engine destroys it). Works from the states alone.
	Cleanup(ctx context.Context, key DiskKey, receiverState, senderState []byte) error
}

// NetSpec is the request to a network backend.
type NetSpec struct {
	MigrationID string
	Backend     string
	VMUUID      string
	VMName      string
	VIFs        []VIF
	VIFMap      map[string]string // VIF ref → destination network ref
	State       []byte            // opaque state from the last call (nil before Prepare)
}

// NetworkBackend is the network strategy as driven through the site agents
// (both sites; the adapter exchanges endpoints through the gateway). Each
// method returns the new opaque state (nil: unchanged) and is idempotent.
type NetworkBackend interface {
	Prepare(ctx context.Context, spec NetSpec) ([]byte, error)
	// Recover re-binds after a controller restart.
	Recover(ctx context.Context, spec NetSpec) ([]byte, error)
	Activate(ctx context.Context, spec NetSpec) ([]byte, error) // at the destination
	Release(ctx context.Context, spec NetSpec) ([]byte, error)  // at the source
	Cleanup(ctx context.Context, spec NetSpec) error
}

// GatewaySpec configures the WAN gateway pair for one migration.
type GatewaySpec struct {
	MigrationID          string
	Listen               string // destination gateway listen address
	Advertise            string // address the source dials
	Streams              int
	Compression          string
	BandwidthBytesPerSec int64
}

// GatewayStats are cumulative byte counters of a migration's gateway.
type GatewayStats struct {
	BytesOffered int64 `msgpack:"bytes_offered"` // payload handed to the gateway
	BytesOnWire  int64 `msgpack:"bytes_on_wire"` // after compression and framing
}

// Gateway is the WAN data plane between the two sites.
type Gateway interface {
	Start(ctx context.Context, spec GatewaySpec) error
	// Forward returns the "host:port" of a local end at the source site
	// (reachable by the source host's xapi and backends) whose TCP
	// connections are tunnelled to target ("host:port" at the destination
	// site). Idempotent: the same target gives the same local end.
	Forward(ctx context.Context, migrationID, target string) (string, error)
	Stats(ctx context.Context, migrationID string) (GatewayStats, error)
	Stop(ctx context.Context, migrationID string) error
}

// AgentSpec says which agents a migration needs.
type AgentSpec struct {
	MigrationID    string
	SourceHost     string
	DestHost       string
	StorageBackend string
	NetworkBackend string
	// SourceConfig and DestConfig are each site's backend configurations
	// (its pool's wanmotion:config sections, raw JSON by backend name).
	SourceConfig, DestConfig map[string][]byte
}

// Agents starts and stops the site agents. Start is idempotent and
// re-attaches to running agents after a controller restart.
type Agents interface {
	Start(ctx context.Context, spec AgentSpec) error
	Stop(ctx context.Context, migrationID string) error
}

// Installed lists the installed backends by name.
type Installed struct {
	Storage []string `json:"storage"`
	Network []string `json:"network"`
}

// Catalog reports the installed backends.
type Catalog interface {
	Installed(ctx context.Context) (Installed, error)
}

// HostCatalog is implemented by a Catalog whose backends run on the pools'
// hosts: it reports what is installed on both hosts a migration uses (the
// VM's host in the source pool, the destination host).
type HostCatalog interface {
	InstalledOn(ctx context.Context, sourceHost, destHost string) (Installed, error)
}

// ThrottleState is what undoing a guest throttle needs; the engine keeps
// it in the checkpoint so a resumed or cancelled migration can release the
// throttle after a controller crash.
type ThrottleState struct {
	Host      string `msgpack:"host" json:"host"`           // host ref the domain ran on when throttled
	Domid     int64  `msgpack:"domid" json:"domid"`         // the throttled domain
	VCPUs     int64  `msgpack:"vcpus" json:"vcpus"`         // its vCPUs (cap 100 = one full CPU)
	Scheduler string `msgpack:"scheduler" json:"scheduler"` // Xen scheduler: credit | credit2
	PrevCap   int64  `msgpack:"prev_cap" json:"prev_cap"`   // the cap before wanmotion touched it (0: none)
	Percent   int    `msgpack:"percent" json:"percent"`     // throttle applied: share of CPU time taken away
	Cap       int64  `msgpack:"cap" json:"cap"`             // the cap set, in percent of one CPU
}

// GuestThrottle slows a running guest at the source for the "throttle"
// convergence policy, as QEMU's auto-converge and vMotion's SDPS do: it
// caps the domain's vCPU time in the Xen scheduler, so a guest that
// dirties disk blocks faster than the link carries them issues fewer
// writes. Nothing in the XenAPI rate-limits a VBD's writes.
type GuestThrottle interface {
	// ThrottleGuest caps the VM's domain to (100-percent)% of its vCPUs'
	// time. prev is nil the first time; later calls pass the state
	// returned before, so the original cap stays known.
	ThrottleGuest(ctx context.Context, vmUUID string, percent int, prev *ThrottleState) (ThrottleState, error)
	// ReleaseThrottle puts back st.PrevCap if the VM still runs as the
	// same domain on the same host (a migrated or restarted domain has
	// left the cap behind with the old domain).
	ReleaseThrottle(ctx context.Context, vmUUID string, st ThrottleState) error
}

// ThrottleChecker is implemented by a GuestThrottle that can tell, while
// planning, whether it will be able to slow the VM (e.g. the host plugin
// and xl are there and the scheduler has a cap), so that policy throttle
// fails before any copy instead of in the middle of the seed.
type ThrottleChecker interface {
	CheckThrottle(ctx context.Context, vmUUID string) error
}

// ThrottleReader is implemented by a GuestThrottle that can read the VM's
// domain and its cap without changing it (Percent 0, PrevCap = the cap
// now). The engine checkpoints that before the first throttle, so a
// controller that dies between setting the cap and saving still knows the
// cap to put back.
type ThrottleReader interface {
	ReadThrottle(ctx context.Context, vmUUID string) (ThrottleState, error)
}

// IntegrityRequest names the disks to compare after the move.
type IntegrityRequest struct {
	MigrationID string
	VMUUID      string
	DestVM      string
	Disks       []DiskState
}

// IntegrityChecker compares source and destination disk content.
type IntegrityChecker interface {
	Check(ctx context.Context, req IntegrityRequest) (ok bool, err error)
}

// PauseMeter reports how long the guest was paused during Handoff, when
// something measured it.
type PauseMeter interface {
	GuestPause(ctx context.Context, migrationID, vmUUID string) (d time.Duration, measured bool, err error)
}

// VDIFinder may be implemented by the SourcePool and DestPool adapters.
// With it, a resumed engine finds a snapshot or replica it created just
// before a crash (tagged in other_config with wanmotion:migration_id,
// wanmotion:source_vdi and, for snapshots, wanmotion:round) instead of
// creating a second one.
type VDIFinder interface {
	// FindVDIs returns ref → uuid of the VDIs (snapshots included, destroyed
	// ones excluded) whose other_config holds every entry of match.
	FindVDIs(ctx context.Context, match map[string]string) (map[string]string, error)
}

// TaskDestroyer may be implemented by the Tasks adapter. With it, the
// engine destroys a task it owns (other_config TaskOwnerKey =
// TaskOwnerController) once the migration stopped and the task's final
// status, result and error_info were set, after Deps.TaskLinger: xapi's
// task.set_status does not set the task's finished time, and XenCenter
// counts a task as complete only when finished is set or the task is gone.
type TaskDestroyer interface {
	// DestroyTask calls task.destroy; an error wrapping ErrNotFound when
	// the task is already gone.
	DestroyTask(ctx context.Context, task string) error
}

// TaskFinder may be implemented by the Tasks adapter, so a resumed engine
// adopts the task it created just before a crash.
type TaskFinder interface {
	// FindPendingTasks returns the refs of pending tasks whose
	// name_description equals description.
	FindPendingTasks(ctx context.Context, description string) ([]string, error)
}
