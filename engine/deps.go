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
	// DefaultSR returns pool.default_SR.
	DefaultSR(ctx context.Context) (string, error)
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

// ReceiverSpec asks the destination side to get ready to fill a replica.
type ReceiverSpec struct {
	Key         DiskKey
	Backend     string
	ReplicaVDI  string // ref
	ReplicaUUID string
	DestSR      string
	VirtualSize int64
}

// ReceiverInfo is what the destination side answers.
type ReceiverInfo struct {
	Endpoint string // opaque to the engine, passed to the sender
	State    []byte // opaque backend state, kept in the checkpoint for Recover
}

// SenderSpec asks the source side to get ready to send a VDI.
type SenderSpec struct {
	Key                  DiskKey
	Backend              string
	SourceVDI            string
	ReceiverEndpoint     string
	Streams              int
	Compression          string
	BandwidthBytesPerSec int64
}

// SyncSpec starts one seed round for one disk: make the replica equal to
// Snapshot, copying everything allocated (Full) or only the blocks set in
// Bitmap (BlockSize bytes per bit, MSB first).
type SyncSpec struct {
	Key       DiskKey
	Round     int
	Snapshot  string // source snapshot ref (Sk)
	Full      bool
	Bitmap    []byte
	BlockSize int
}

// SyncState is the state of a disk's current round.
type SyncState string

// Sync states.
const (
	SyncIdle    SyncState = "idle" // nothing running (e.g. after an agent restart)
	SyncRunning SyncState = "running"
	SyncDone    SyncState = "done"
	SyncFailed  SyncState = "failed"
)

// SyncStatus reports one disk's round.
type SyncStatus struct {
	Round       int
	State       SyncState
	BytesDone   int64
	BytesTotal  int64
	BytesOnWire int64
	Error       string
	// BackendState, when non-nil, replaces the opaque state kept for Recover.
	BackendState []byte
}

// StorageBackend is the storage strategy as driven through the site agents.
// Every method is idempotent for the same arguments.
type StorageBackend interface {
	PrepareReceiver(ctx context.Context, spec ReceiverSpec) (ReceiverInfo, error)
	PrepareSender(ctx context.Context, spec SenderSpec) error
	// StartSync starts a round and returns at once; poll SyncStatus.
	StartSync(ctx context.Context, spec SyncSpec) error
	SyncStatus(ctx context.Context, key DiskKey) (SyncStatus, error)
	Abort(ctx context.Context, key DiskKey) error
	Cleanup(ctx context.Context, key DiskKey) error
	// Recover re-attaches to a disk's transfer after a controller restart,
	// from the opaque state last returned by the backend.
	Recover(ctx context.Context, key DiskKey, state []byte) error
}

// NetSpec is the request to a network backend.
type NetSpec struct {
	MigrationID string
	Backend     string
	VMUUID      string
	VIFs        []VIF
	VIFMap      map[string]string // VIF ref → destination network ref
	State       []byte            // from Prepare
}

// NetworkBackend is the network strategy as driven through the site agents.
type NetworkBackend interface {
	Prepare(ctx context.Context, spec NetSpec) ([]byte, error)
	Activate(ctx context.Context, spec NetSpec) error // at the destination
	Release(ctx context.Context, spec NetSpec) error  // at the source
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
	// Forward returns the base URL ("scheme://host:port") of a local end
	// reachable by the source host's xapi that tunnels to target ("host:port"
	// at the destination site).
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
}

// Agents starts and stops the site agents. Start is idempotent and
// re-attaches to running agents after a controller restart.
type Agents interface {
	Start(ctx context.Context, spec AgentSpec) error
	Stop(ctx context.Context, migrationID string) error
}

// Installed lists the installed backends by name.
type Installed struct {
	Storage []string
	Network []string
}

// Catalog reports the installed backends.
type Catalog interface {
	Installed(ctx context.Context) (Installed, error)
}

// GuestThrottle limits a guest's disk write rate at the source (for the
// "throttle" convergence policy). bytesPerSec 0 removes the limit.
type GuestThrottle interface {
	ThrottleGuest(ctx context.Context, migrationID, vmUUID string, bytesPerSec int64) error
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
