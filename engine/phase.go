package engine

import "fmt"

// Phase is one state of a migration's state machine. The numeric values are
// stored in checkpoints (see docs/checkpoint-format.md) and must never be
// renumbered; add new phases at the end.
type Phase uint8

// The phases, in the order a successful migration visits them, then the
// rollback and terminal states.
const (
	PhaseUnknown     Phase = 0
	PhasePlan        Phase = 1
	PhasePrepare     Phase = 2
	PhaseSeed        Phase = 3
	PhaseHandoff     Phase = 4
	PhaseSwitch      Phase = 5
	PhaseVerify      Phase = 6
	PhaseCleanup     Phase = 7
	PhaseDone        Phase = 8
	PhaseRollingBack Phase = 9
	PhaseRolledBack  Phase = 10
	PhaseFailed      Phase = 11
)

var phaseNames = [...]string{
	PhaseUnknown:     "unknown",
	PhasePlan:        "plan",
	PhasePrepare:     "prepare",
	PhaseSeed:        "seed",
	PhaseHandoff:     "handoff",
	PhaseSwitch:      "switch",
	PhaseVerify:      "verify",
	PhaseCleanup:     "cleanup",
	PhaseDone:        "done",
	PhaseRollingBack: "rolling_back",
	PhaseRolledBack:  "rolled_back",
	PhaseFailed:      "failed",
}

// WorkPhases are the seven phases of a successful migration, in order; the
// report always lists them all.
var WorkPhases = []Phase{PhasePlan, PhasePrepare, PhaseSeed, PhaseHandoff, PhaseSwitch, PhaseVerify, PhaseCleanup}

// String returns the lowercase name of the phase.
func (p Phase) String() string {
	if int(p) < len(phaseNames) {
		return phaseNames[p]
	}
	return fmt.Sprintf("phase(%d)", uint8(p))
}

// ParsePhase is the inverse of String.
func ParsePhase(s string) (Phase, error) {
	for i, n := range phaseNames {
		if n == s && i != 0 {
			return Phase(i), nil
		}
	}
	return PhaseUnknown, fmt.Errorf("unknown phase %q", s)
}

// Valid reports whether p is one of the defined phases (not PhaseUnknown).
func (p Phase) Valid() bool { return p > PhaseUnknown && p <= PhaseFailed }

// Stopped reports whether the engine's loop stops in this phase: Done and
// RolledBack are final; Failed waits for an operator (resume or abort).
func (p Phase) Stopped() bool {
	return p == PhaseDone || p == PhaseRolledBack || p == PhaseFailed
}

// ForwardOnly reports whether the phase lies at or after Handoff, where the
// engine never rolls back: xapi owns the VM's location from Handoff on.
func (p Phase) ForwardOnly() bool { return p >= PhaseHandoff && p <= PhaseDone }

// transitions is the complete table of allowed phase changes. advance refuses
// anything else.
var transitions = map[Phase][]Phase{
	PhasePlan:        {PhasePrepare, PhaseRollingBack},
	PhasePrepare:     {PhaseSeed, PhaseRollingBack},
	PhaseSeed:        {PhaseHandoff, PhaseRollingBack},
	PhaseHandoff:     {PhaseSwitch, PhaseFailed},
	PhaseSwitch:      {PhaseVerify, PhaseFailed},
	PhaseVerify:      {PhaseCleanup, PhaseFailed},
	PhaseCleanup:     {PhaseDone, PhaseFailed},
	PhaseRollingBack: {PhaseRolledBack, PhaseFailed},
	// From Failed an operator either retries the phase that failed (resume)
	// or, while the VM is still at the source, aborts (rollback).
	PhaseFailed: {PhaseHandoff, PhaseSwitch, PhaseVerify, PhaseCleanup, PhaseRollingBack},
}

// CanTransition reports whether the table allows from → to.
func CanTransition(from, to Phase) bool {
	for _, t := range transitions[from] {
		if t == to {
			return true
		}
	}
	return false
}
