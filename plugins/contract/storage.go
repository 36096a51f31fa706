package contract

import (
	"context"
	"time"
)

// Storage is a storage strategy: it makes a replica of a source VDI on the
// destination SR equal to a snapshot Sk of that VDI, fully or from a
// changed-block bitmap, one round at a time (ARCHITECTURE §2 Seed, §5).
//
// The same binary runs on both sites: the destination agent calls
// PrepareReceiver, the source agent calls PrepareSender with the
// receiver's Endpoint (its Address rewritten by the engine to the local end
// of the WAN gateway channel), then SyncRound once per snapshot.
//
// Semantics every implementation follows (checked by the conformance suite):
//   - Handles are per (MigrationID, Disk.VDIUUID, role). Preparing the same
//     key again with an identical request returns the same handle
//     (Existing=true); with a different request it fails with ErrAlreadyExists.
//   - Calls on an unknown handle fail with ErrNotFound, except Cleanup,
//     which returns nil (it is idempotent, also across restarts: it works
//     from the Handle's State alone).
//   - All methods may be called concurrently; Status in particular is
//     called from other goroutines while SyncRound runs and must not block
//     on it.
//   - A cancelled ctx makes a call return promptly with an error matching
//     ErrCancelled; work already applied stays applied and the handle
//     stays usable (a later SyncRound of the same round redoes what is
//     missing).
//   - Abort stops the handle's work at once and is idempotent; Cleanup frees
//     everything the handle holds and is idempotent.
type Storage interface {
	Info(ctx context.Context) (Info, error)
	Configure(ctx context.Context, req ConfigureRequest) (ConfigureResponse, error)

	// PrepareReceiver (destination) creates or takes the replica VDI,
	// makes it writable for the backend and starts whatever receives blocks.
	PrepareReceiver(ctx context.Context, req PrepareReceiverRequest) (PrepareReceiverResponse, error)
	// PrepareSender (source) readies reading the source VDI's snapshots and
	// connects (or is ready to connect) to the receiver through Peer.
	PrepareSender(ctx context.Context, req PrepareSenderRequest) (PrepareSenderResponse, error)
	// SyncRound (source handle) makes the replica equal to the request's
	// snapshot and returns once the receiver has made it durable (flushed).
	SyncRound(ctx context.Context, req SyncRoundRequest) (SyncRoundResponse, error)
	// Status reports progress of either role's handle.
	Status(ctx context.Context, req StatusRequest) (StorageStatus, error)
	// Converge waits until no transfer is in flight and the replica equals
	// the last synced snapshot (for continuous backends: switches to
	// synchronous replication and waits until in sync).
	Converge(ctx context.Context, req ConvergeRequest) (ConvergeResponse, error)
	// Finalize (destination) hands the replica over to xapi for Handoff:
	// it detaches it from the backend (VBD unplug, servers stopped) and keeps it.
	Finalize(ctx context.Context, req FinalizeRequest) (FinalizeResponse, error)
	// Recover re-binds a handle from its persisted state (after a restart).
	// Recovering a handle this process already holds returns it unchanged.
	Recover(ctx context.Context, req RecoverRequest) (RecoverResponse, error)
	// Abort stops any work of the handle at once; the handle stays known
	// (Status reports StateAborted) until Cleanup.
	Abort(ctx context.Context, req AbortRequest) (AbortResponse, error)
	// Cleanup frees everything the handle holds and forgets it. With
	// DeleteReplica the replica VDI is destroyed too (rollback before Handoff).
	Cleanup(ctx context.Context, req CleanupRequest) (CleanupResponse, error)
}

// DiskInfo identifies the source disk of a migration.
type DiskInfo struct {
	VDIUUID     string // source VDI
	VDIRef      string
	VirtualSize int64  // bytes
	SRUUID      string // source SR
	Device      string // VBD userdevice, for messages
	Name        string // name_label, for messages
}

// PrepareReceiverRequest asks the destination to get a replica ready.
type PrepareReceiverRequest struct {
	MigrationID string
	Disk        DiskInfo
	DestSRUUID  string
	// ReplicaVDIUUID is an existing replica to take over (a retry after a
	// failed Handoff); empty means the backend creates one on DestSRUUID.
	ReplicaVDIUUID string
	// Listen is where the receiver should listen (host:port; "" means a
	// loopback address of the backend's choice). The WAN gateway forwards
	// the channel to it.
	Listen string
	XAPI   XAPIAccess
	// Options are per-disk backend options (msgpack), usually empty.
	Options []byte
}

// PrepareReceiverResponse returns the receiver handle and how to reach it.
type PrepareReceiverResponse struct {
	Handle         Handle
	Endpoint       Endpoint
	ReplicaVDIUUID string
	ReplicaVDIRef  string
	Existing       bool // the same request had been prepared already
}

// PrepareSenderRequest asks the source to get ready to send to Peer.
type PrepareSenderRequest struct {
	MigrationID string
	Disk        DiskInfo
	// Peer is the receiver's Endpoint as seen from the source: Address is
	// the local end of the WAN gateway channel, Token and Params are the
	// receiver's.
	Peer    Endpoint
	XAPI    XAPIAccess
	Options []byte
}

// PrepareSenderResponse returns the sender handle.
type PrepareSenderResponse struct {
	Handle   Handle
	Existing bool
}

// SnapshotRef identifies a snapshot Sk of the source VDI.
type SnapshotRef struct {
	UUID      string
	Ref       string
	ContentID string
}

// DefaultBlockSize is the CBT block size of VDI.list_changed_blocks.
const DefaultBlockSize = 64 * 1024

// SyncRoundRequest asks for one round: replica := Snapshot.
type SyncRoundRequest struct {
	Handle   string
	Round    int // 0 for the first (full) round, then 1, 2, ...
	Snapshot SnapshotRef
	// Full copies every (allocated) block; otherwise ChangedBlocks says
	// which blocks changed since the previous round's snapshot (an empty
	// ChangedBlocks with Full=false is ErrInvalidArgument; "nothing
	// changed" is an all-zero bitmap).
	Full bool
	// ChangedBlocks is the decoded VDI.list_changed_blocks bitmap: bit i
	// (most significant bit first in each byte) covers bytes
	// [i*BlockSize, (i+1)*BlockSize).
	ChangedBlocks []byte
	BlockSize     int64 // 0 means DefaultBlockSize
	// Verify asks for an end-of-round comparison and repair (CapVerify).
	Verify bool
}

// RoundStats are the counters of one round.
type RoundStats struct {
	Round       int
	BytesToCopy int64 // payload bytes the round has to move
	BytesCopied int64 // payload bytes applied at the receiver
	BytesOnWire int64 // bytes sent on the WAN channel (after compression)
	Duration    time.Duration
	Repaired    int64 // bytes repaired by Verify
}

// SyncRoundResponse reports the finished round and the state to checkpoint.
type SyncRoundResponse struct {
	Stats RoundStats
	State State
}

// StatusRequest names a handle.
type StatusRequest struct {
	Handle string
}

// HandleState is the lifecycle state of a handle.
type HandleState string

// Handle states.
const (
	StatePrepared   HandleState = "prepared"
	StateSyncing    HandleState = "syncing"
	StateIdle       HandleState = "idle" // between rounds
	StateConverged  HandleState = "converged"
	StateFinalized  HandleState = "finalized"
	StateActive     HandleState = "active"   // network: activated
	StateReleased   HandleState = "released" // network: released
	StateAborted    HandleState = "aborted"
	StateFailed     HandleState = "failed"
	StateRecovering HandleState = "recovering"
)

// StorageStatus is a progress snapshot of a handle.
type StorageStatus struct {
	Handle      string
	Role        Role
	State       HandleState
	Round       int // the current or last round
	BytesToCopy int64
	BytesCopied int64
	BytesOnWire int64
	RateBps     int64         // recent payload rate, bytes per second
	ETA         time.Duration // 0 when unknown or done
	LastError   string
}

// ConvergeRequest names a source or destination handle.
type ConvergeRequest struct {
	Handle string
}

// ConvergeResponse reports the state after convergence.
type ConvergeResponse struct {
	Status StorageStatus
	State  State
}

// FinalizeRequest names a destination handle.
type FinalizeRequest struct {
	Handle string
}

// FinalizeResponse names the replica handed over to xapi.
type FinalizeResponse struct {
	ReplicaVDIUUID string
	ReplicaVDIRef  string
	State          State
}

// RecoverRequest carries a handle with its last checkpointed State and
// fresh credentials (sessions do not survive a restart).
type RecoverRequest struct {
	Handle Handle
	XAPI   XAPIAccess
	// Peer is the current peer endpoint (source role); it may have changed.
	Peer Endpoint
}

// RecoverResponse returns the re-bound handle and where it stands:
// Status.Round is the last round completed before the restart.
type RecoverResponse struct {
	Handle   Handle
	Status   StorageStatus
	Endpoint Endpoint // destination role: where the receiver listens now
}

// AbortRequest names a handle.
type AbortRequest struct {
	Handle string
}

// AbortResponse is empty.
type AbortResponse struct{}

// CleanupRequest carries the whole handle so cleanup works after a restart.
type CleanupRequest struct {
	Handle        Handle
	DeleteReplica bool
	XAPI          XAPIAccess
}

// CleanupResponse is empty.
type CleanupResponse struct{}
