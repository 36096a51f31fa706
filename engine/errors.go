package engine

import (
	"errors"
	"fmt"
)

// Sentinel errors. Adapters map their own errors onto ErrNotFound and
// ErrCBTEnabled (wrap with %w) so the engine can recognise them.
var (
	// ErrNotFound: an object (VM, VDI, task, checkpoint) does not exist.
	// xapi adapters map HANDLE_INVALID and UUID_INVALID onto it.
	ErrNotFound = errors.New("not found")
	// ErrCBTEnabled: xapi refused because a VDI has CBT enabled (VDI_CBT_ENABLED).
	ErrCBTEnabled = errors.New("vdi has cbt enabled")
	// ErrCancelled: the migration was cancelled (xapi task.cancel or Engine.Cancel).
	ErrCancelled = errors.New("migration cancelled")
	// ErrBadTransition: a phase change not in the transition table.
	ErrBadTransition = errors.New("invalid phase transition")
	// ErrCheckpointVersion: a checkpoint written by a newer wanmotion.
	ErrCheckpointVersion = errors.New("checkpoint version not supported")
	// ErrCheckpointCorrupt: a checkpoint that cannot be decoded.
	ErrCheckpointCorrupt = errors.New("checkpoint corrupt")
	// ErrExists: a migration with this id already has a checkpoint.
	ErrExists = errors.New("migration already exists")
	// ErrInterrupted: the engine stopped without changing phase (context
	// cancelled or checkpoint store failure); resume from the checkpoint.
	ErrInterrupted = errors.New("migration interrupted; resume it")
	// ErrNotConverging: the guest writes faster than the link carries and the
	// convergence policy is "stop".
	ErrNotConverging = errors.New("seed does not converge")
	// ErrThrottleConflict: the guest's CPU cap is not the one wanmotion set
	// (an administrator or another tool changed it meanwhile); wanmotion
	// leaves it alone.
	ErrThrottleConflict = errors.New("the guest's CPU cap was changed by someone else")
	// ErrUnknownBackend: a configured backend is not installed.
	ErrUnknownBackend = errors.New("unknown backend")
	// ErrConfig: invalid wanmotion configuration.
	ErrConfig = errors.New("invalid configuration")
	// ErrHandoffFailed: VM.migrate_send failed; the VM still runs at the source
	// and the replica is kept so a retry sends only the delta.
	ErrHandoffFailed = errors.New("handoff failed; vm still runs at the source")
	// ErrVMLocation: the engine could not establish where the VM runs.
	ErrVMLocation = errors.New("vm location unknown")
	// ErrNotResumable: the checkpoint is in a phase that cannot be resumed.
	ErrNotResumable = errors.New("migration cannot be resumed")
)

// PhaseError records the phase a step failed in.
type PhaseError struct {
	Phase Phase
	Err   error
}

func (e *PhaseError) Error() string { return fmt.Sprintf("%s: %v", e.Phase, e.Err) }
func (e *PhaseError) Unwrap() error { return e.Err }
