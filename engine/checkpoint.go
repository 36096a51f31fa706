package engine

import (
	"bytes"
	"context"
	"fmt"

	"github.com/vmihailenco/msgpack/v5"
)

// CheckpointVersion is the version this engine writes. Decoding a checkpoint
// with a higher version is an error (ErrCheckpointVersion), never a guess.
const CheckpointVersion = 1

// Checkpoint is the complete persistent state of one migration. It is
// written after every step (see docs/checkpoint-format.md). Fields are
// msgpack maps with named keys, so fields can be added without a version
// bump; removing or changing the meaning of one needs a bump.
type Checkpoint struct {
	Version     int    `msgpack:"version"`
	MigrationID string `msgpack:"migration_id"`
	Phase       Phase  `msgpack:"phase"`
	// FailedIn is the phase a Failed migration failed in (resume retries it).
	FailedIn Phase  `msgpack:"failed_in,omitempty"`
	Error    string `msgpack:"error,omitempty"`
	// ErrorInfo is xapi-style: a code then parameters.
	ErrorInfo []string `msgpack:"error_info,omitempty"`
	// Cancelled is set once a cancel was honoured (rollback under way/done).
	Cancelled bool `msgpack:"cancelled,omitempty"`
	// CancelIgnored is set once a cancel was seen after Handoff began.
	CancelIgnored bool `msgpack:"cancel_ignored,omitempty"`

	CreatedUnixNano int64 `msgpack:"created_unix_nano"`
	UpdatedUnixNano int64 `msgpack:"updated_unix_nano"`

	Request  RequestState `msgpack:"request"`
	Settings Settings     `msgpack:"settings"`
	Plan     Estimate     `msgpack:"plan"`

	VMRef       string            `msgpack:"vm_ref"`
	VMName      string            `msgpack:"vm_name"`
	MemoryBytes int64             `msgpack:"memory_bytes"`
	SourceHost  string            `msgpack:"source_host"`
	DestHost    string            `msgpack:"dest_host"`
	DestNetwork string            `msgpack:"dest_network"` // migration network for host.migrate_receive
	Disks       []DiskState       `msgpack:"disks"`
	VIFs        []VIF             `msgpack:"vifs"`
	VIFMap      map[string]string `msgpack:"vif_map"`

	Task          string `msgpack:"task"`
	TaskCreated   bool   `msgpack:"task_created"` // by this engine (else adopted)
	TaskFinished  bool   `msgpack:"task_finished"`
	TaskLabelled  bool   `msgpack:"task_labelled"` // applies_to set
	AgentsStarted bool   `msgpack:"agents_started"`
	// AgentsLaunching is set before Agents.Start is first called: a Start
	// that fails half-way (one agent up, the other or a backend not) still
	// has its agents stopped by the rollback.
	AgentsLaunching bool `msgpack:"agents_launching,omitempty"`
	GatewayUp       bool `msgpack:"gateway_up"`

	Seed    SeedState    `msgpack:"seed"`
	Handoff HandoffState `msgpack:"handoff"`
	Net     NetState     `msgpack:"net"`

	// Cleanup / rollback progress flags (each side effect at most once).
	AgentsStopped bool `msgpack:"agents_stopped"`
	GatewayDown   bool `msgpack:"gateway_down"`

	Timings       map[string]float64 `msgpack:"timings"` // phase name → seconds
	Integrity     string             `msgpack:"integrity"`
	Stats         GatewayStats       `msgpack:"stats"`
	PauseNS       int64              `msgpack:"pause_ns"`
	PauseMeasured bool               `msgpack:"pause_measured"`
	DestVM        string             `msgpack:"dest_vm"`
}

// RequestState is the part of the Request kept for resume.
type RequestState struct {
	VMUUID          string            `msgpack:"vm_uuid"`
	DestHost        string            `msgpack:"dest_host"`
	DestSR          string            `msgpack:"dest_sr"`
	SRMap           map[string]string `msgpack:"sr_map"`
	NetworkMap      map[string]string `msgpack:"network_map"`
	LinkBytesPerSec int64             `msgpack:"link_bytes_per_sec"`
	RTTNanos        int64             `msgpack:"rtt_ns"`
	GuestWriteRate  int64             `msgpack:"guest_write_rate"`
	SkipAssert      bool              `msgpack:"skip_assert"`
	MigrateOptions  map[string]string `msgpack:"migrate_options"`
	Overrides       Overrides         `msgpack:"overrides"`
	TaskRef         string            `msgpack:"task_ref"` // a task to adopt
}

// DiskState tracks one disk through the migration.
type DiskState struct {
	Disk             Disk            `msgpack:"disk"`
	DestSR           string          `msgpack:"dest_sr"`
	CBTWasEnabled    bool            `msgpack:"cbt_was_enabled"`
	CBTEnabled       bool            `msgpack:"cbt_enabled_by_us"`
	CBTDisabled      bool            `msgpack:"cbt_disabled"`
	ReplicaRef       string          `msgpack:"replica_ref"`
	ReplicaUUID      string          `msgpack:"replica_uuid"`
	ReplicaGone      bool            `msgpack:"replica_gone"`
	ReceiverReady    bool            `msgpack:"receiver_ready"`
	ReceiverAddress  string          `msgpack:"receiver_address"`
	ReceiverEndpoint []byte          `msgpack:"receiver_endpoint"`
	ReceiverState    []byte          `msgpack:"receiver_state"`
	PeerAddress      string          `msgpack:"peer_address"` // gateway's local end for the receiver
	SenderReady      bool            `msgpack:"sender_ready"`
	SenderState      []byte          `msgpack:"sender_state"`
	StorageClosed    bool            `msgpack:"storage_closed"`
	Finalized        bool            `msgpack:"finalized"`
	Snapshots        []SnapshotState `msgpack:"snapshots"`
	// SyncRound is the round the disk is in; SyncDone whether it finished.
	SyncRound    int   `msgpack:"sync_round"`
	SyncDone     bool  `msgpack:"sync_done"`
	RoundBytes   int64 `msgpack:"round_bytes"` // changed bytes of SyncRound
	RoundWire    int64 `msgpack:"round_wire"`
	ContentIDSet bool  `msgpack:"content_id_set"`
}

// SnapshotState is one source snapshot Sk of a disk.
type SnapshotState struct {
	Round         int    `msgpack:"round"`
	Ref           string `msgpack:"ref"`
	ContentID     string `msgpack:"content_id"`
	DataDestroyed bool   `msgpack:"data_destroyed"`
	Destroyed     bool   `msgpack:"destroyed"`
}

// SeedState tracks the rounds.
type SeedState struct {
	Round           int         `msgpack:"round"` // round in progress (or last, once finished)
	RoundStartNano  int64       `msgpack:"round_start_ns"`
	Rounds          []RoundStat `msgpack:"rounds"`    // completed rounds
	Throttled       bool        `msgpack:"throttled"` // a guest throttle is (or was) applied: Throttle holds it
	ThrottleRemoved bool        `msgpack:"throttle_removed"`
	// Throttle is the guest throttle in force (nil: none); kept after it is
	// released (ThrottleRemoved) for the report.
	Throttle *ThrottleState `msgpack:"throttle,omitempty"`
	// ThrottleConflict: someone else changed the guest's cap while it was
	// throttled; wanmotion left it alone and throttles no more.
	ThrottleConflict bool   `msgpack:"throttle_conflict,omitempty"`
	Finished         bool   `msgpack:"finished"`
	Decision         string `msgpack:"decision"`
	WriteRate        int64  `msgpack:"write_rate"` // last measured guest write rate, bytes/s
}

// HandoffState tracks the xapi migration.
type HandoffState struct {
	SendIntent bool    `msgpack:"send_intent"` // saved right before VM.migrate_send
	SendCalls  int     `msgpack:"send_calls"`
	Task       string  `msgpack:"task"`
	Progress   float64 `msgpack:"progress"`
	Done       bool    `msgpack:"done"`
	StartNano  int64   `msgpack:"start_ns"`
	Seconds    float64 `msgpack:"seconds"`
}

// NetState tracks the network backend.
type NetState struct {
	Prepared  bool   `msgpack:"prepared"`
	State     []byte `msgpack:"state"`
	Activated bool   `msgpack:"activated"`
	Released  bool   `msgpack:"released"`
	Cleaned   bool   `msgpack:"cleaned"`
}

// EncodeCheckpoint serialises a checkpoint (msgpack map with named keys).
func EncodeCheckpoint(c *Checkpoint) ([]byte, error) {
	var buf bytes.Buffer
	enc := msgpack.NewEncoder(&buf)
	enc.SetSortMapKeys(true)
	if err := enc.Encode(c); err != nil {
		return nil, fmt.Errorf("encode checkpoint: %w", err)
	}
	return buf.Bytes(), nil
}

// DecodeCheckpoint parses a checkpoint. A version newer than
// CheckpointVersion wraps ErrCheckpointVersion; undecodable input wraps
// ErrCheckpointCorrupt.
func DecodeCheckpoint(b []byte) (*Checkpoint, error) {
	var probe struct {
		Version int `msgpack:"version"`
	}
	if err := msgpack.Unmarshal(b, &probe); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCheckpointCorrupt, err)
	}
	switch {
	case probe.Version > CheckpointVersion:
		return nil, fmt.Errorf("%w: version %d, this wanmotion reads up to %d (upgrade wanmotion)", ErrCheckpointVersion, probe.Version, CheckpointVersion)
	case probe.Version < 1:
		return nil, fmt.Errorf("%w: missing or invalid version %d", ErrCheckpointCorrupt, probe.Version)
	}
	c := new(Checkpoint)
	if err := msgpack.Unmarshal(b, c); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrCheckpointCorrupt, err)
	}
	if c.MigrationID == "" || !c.Phase.Valid() {
		return nil, fmt.Errorf("%w: missing migration id or invalid phase %d", ErrCheckpointCorrupt, uint8(c.Phase))
	}
	return c, nil
}

// Store persists checkpoints.
type Store interface {
	// Save atomically replaces the checkpoint of c.MigrationID.
	Save(ctx context.Context, c *Checkpoint) error
	// Load returns the checkpoint, or an error wrapping ErrNotFound.
	Load(ctx context.Context, migrationID string) (*Checkpoint, error)
	// List returns the ids of all stored migrations, sorted.
	List(ctx context.Context) ([]string, error)
}
