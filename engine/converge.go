package engine

import (
	"encoding/base64"
	"fmt"
	"math/bits"
	"time"
)

// CBTBlockSize is the size of one bit of a VDI.list_changed_blocks bitmap.
const CBTBlockSize = 64 << 10

// DecodeCBTBitmap decodes list_changed_blocks' base64 bitmap.
func DecodeCBTBitmap(s string) ([]byte, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("decode changed-block bitmap: %w", err)
	}
	return b, nil
}

// ChangedBytes returns the bytes covered by the set bits of a bitmap (bit i,
// MSB first, is block i), capped at virtualSize when > 0.
func ChangedBytes(bitmap []byte, virtualSize int64) int64 {
	var n int64
	for i, b := range bitmap {
		if b == 0 {
			continue
		}
		// The last block of a disk may be short; count exactly.
		for j := 0; j < 8; j++ {
			if b&(0x80>>j) == 0 {
				continue
			}
			start := int64(i*8+j) * CBTBlockSize
			if virtualSize > 0 && start >= virtualSize {
				continue
			}
			end := start + CBTBlockSize
			if virtualSize > 0 && end > virtualSize {
				end = virtualSize
			}
			n += end - start
		}
	}
	return n
}

// popcount counts set bits (used in tests and for messages).
func popcount(b []byte) int {
	n := 0
	for _, x := range b {
		n += bits.OnesCount8(x)
	}
	return n
}

// RoundStat is one completed seed round (all disks together).
type RoundStat struct {
	Round        int     `msgpack:"round" json:"round"`
	ChangedBytes int64   `msgpack:"changed_bytes" json:"changed_bytes"`
	Seconds      float64 `msgpack:"seconds" json:"seconds"`
	BytesOnWire  int64   `msgpack:"bytes_on_wire" json:"bytes_on_wire"`
}

// Action is a convergence decision.
type Action uint8

// Convergence actions.
const (
	ActionContinue Action = iota // make another delta round
	ActionHandoff                // hand off now
	ActionThrottle               // throttle the guest, then make another round
	ActionStop                   // give up (ErrNotConverging), roll back
)

func (a Action) String() string {
	return [...]string{"continue", "handoff", "throttle", "stop"}[a]
}

// ConvergeInput is what Decide looks at.
type ConvergeInput struct {
	// Rounds are the completed rounds, round 0 (the full copy) first.
	Rounds          []RoundStat
	LinkBytesPerSec int64
	DowntimeTarget  time.Duration
	// MinShrink: a delta round that is not at least this fraction smaller
	// than the previous one counts as "stopped shrinking".
	MinShrink float64
	// MaxRounds caps the delta rounds (round 0 not counted).
	MaxRounds int
	Policy    ConvergencePolicy
	Throttled bool
}

// Decision is Decide's answer.
type Decision struct {
	Action          Action
	Reason          string
	ThresholdBytes  int64
	WriteRate       int64 // estimated guest write rate, bytes/s (0 before round 1)
	ThrottleBytesPS int64 // for ActionThrottle: the guest write cap to ask for
	Advice          string
}

// Decide is the convergence controller, called after each completed round.
//
//  1. After round 0 always make a delta round (it measures the write rate).
//  2. Delta under the threshold (link rate × downtime target) → hand off.
//  3. Guest writes at least as fast as the link (delta of round k divided by
//     the duration of round k−1, during which those writes happened) →
//     policy: stop → stop with advice; throttle → throttle once, then
//     behave as keep-going; keep-going → continue until the round cap, then
//     hand off.
//  4. Round cap reached → hand off.
//  5. Delta not at least MinShrink smaller than the previous → hand off
//     (more rounds would not help).
//  6. Otherwise continue.
func Decide(in ConvergeInput) Decision {
	d := Decision{ThresholdBytes: HandoffThreshold(in.LinkBytesPerSec, in.DowntimeTarget)}
	n := len(in.Rounds)
	if n == 0 {
		d.Action, d.Reason = ActionContinue, "no round completed"
		return d
	}
	if n == 1 {
		d.Action, d.Reason = ActionContinue, "full copy done; measuring the delta"
		return d
	}
	last, prev := in.Rounds[n-1], in.Rounds[n-2]
	if prev.Seconds > 0 {
		d.WriteRate = int64(float64(last.ChangedBytes) / prev.Seconds)
	}
	deltaRounds := n - 1
	maxRounds := in.MaxRounds
	if maxRounds <= 0 {
		maxRounds = DefaultMaxRounds
	}
	if last.ChangedBytes <= d.ThresholdBytes {
		d.Action = ActionHandoff
		d.Reason = fmt.Sprintf("converged: delta %s under threshold %s", HumanBytes(last.ChangedBytes), HumanBytes(d.ThresholdBytes))
		return d
	}
	if in.LinkBytesPerSec > 0 && d.WriteRate >= in.LinkBytesPerSec {
		d.Advice = fmt.Sprintf("the guest writes about %s/s and the link carries %s/s; raise the bandwidth, reduce the guest's writes, or use convergence_policy keep-going (it hands off after max_rounds, with a longer guest pause)",
			HumanBytes(d.WriteRate), HumanBytes(in.LinkBytesPerSec))
		switch in.Policy {
		case PolicyStop:
			d.Action, d.Reason = ActionStop, "guest writes faster than the link"
			return d
		case PolicyThrottle:
			if !in.Throttled {
				d.Action, d.Reason = ActionThrottle, "guest writes faster than the link; throttling"
				d.ThrottleBytesPS = max(1, in.LinkBytesPerSec/2)
				return d
			}
		}
		if deltaRounds >= maxRounds {
			d.Action, d.Reason = ActionHandoff, fmt.Sprintf("round cap %d reached while the guest writes faster than the link", maxRounds)
			return d
		}
		d.Action, d.Reason = ActionContinue, "guest writes faster than the link; keep going"
		return d
	}
	if deltaRounds >= maxRounds {
		d.Action, d.Reason = ActionHandoff, fmt.Sprintf("round cap %d reached", maxRounds)
		return d
	}
	if float64(last.ChangedBytes) > float64(prev.ChangedBytes)*(1-in.MinShrink) {
		d.Action = ActionHandoff
		d.Reason = fmt.Sprintf("delta stopped shrinking (%s after %s)", HumanBytes(last.ChangedBytes), HumanBytes(prev.ChangedBytes))
		return d
	}
	d.Action, d.Reason = ActionContinue, "delta shrinking"
	return d
}
