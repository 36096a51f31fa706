package engine

import (
	"encoding/base64"
	"fmt"
	"math"
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
	// ThrottlePercent is the guest throttle in force during the round.
	ThrottlePercent int `msgpack:"throttle_percent,omitempty" json:"throttle_percent,omitempty"`
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
	// ThrottlePercent is the guest throttle in force (0: none).
	ThrottlePercent int
	// ThrottleDisabled: no (more) throttling, e.g. someone else took over
	// the guest's cap; policy throttle then behaves as keep-going.
	ThrottleDisabled bool
	// Throttle steps (policy throttle; 0 takes the defaults).
	ThrottleInitial, ThrottleStep, ThrottleMax int
}

// Decision is Decide's answer.
type Decision struct {
	Action          Action
	Reason          string
	ThresholdBytes  int64
	WriteRate       int64 // estimated guest write rate, bytes/s (0 before round 1)
	ThrottlePercent int   // for ActionThrottle: the throttle to apply (share of CPU time taken away)
	Advice          string
}

// Guest throttle steps of the "throttle" policy (QEMU auto-converge's
// defaults for the first two): the first throttle takes this share of the
// guest's CPU time, each later one this much more, up to ThrottleMax.
const (
	DefaultThrottleInitial = 20
	DefaultThrottleStep    = 10
	DefaultThrottleMax     = 90
)

// nextThrottle is the throttle to apply after in.ThrottlePercent (0 when
// the maximum is reached).
func nextThrottle(in ConvergeInput) int {
	initial, step, maxP := in.ThrottleInitial, in.ThrottleStep, in.ThrottleMax
	if initial <= 0 {
		initial = DefaultThrottleInitial
	}
	if step <= 0 {
		step = DefaultThrottleStep
	}
	if maxP <= 0 {
		maxP = DefaultThrottleMax
	}
	if in.ThrottlePercent >= maxP {
		return 0
	}
	if in.ThrottlePercent <= 0 {
		return min(initial, maxP)
	}
	return min(in.ThrottlePercent+step, maxP)
}

// Decide is the convergence controller, called after each completed round.
//
//  1. After round 0 always make a delta round (it measures the write rate).
//  2. Delta under the threshold (link rate × downtime target) → hand off.
//  3. Guest writes at least as fast as the link (delta of round k divided by
//     the duration of round k−1, during which those writes happened) →
//     policy: stop → stop with advice; throttle → throttle the guest one
//     step more (until the maximum), then behave as keep-going;
//     keep-going → continue until the round cap, then hand off.
//  4. Round cap reached → hand off.
//  5. Delta not at least MinShrink smaller than the previous → throttle
//     one step more (policy throttle, below the maximum), else hand off
//     (more rounds would not help).
//  6. Policy throttle, below the maximum: if at the last round's shrink
//     rate the delta would not get under the threshold before the round
//     cap → throttle one step more.
//  7. Otherwise continue.
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
	next := 0
	if in.Policy == PolicyThrottle && !in.ThrottleDisabled && deltaRounds < maxRounds {
		next = nextThrottle(in)
	}
	if in.LinkBytesPerSec > 0 && d.WriteRate >= in.LinkBytesPerSec {
		d.Advice = fmt.Sprintf("the guest writes about %s/s and the link carries %s/s; raise the bandwidth, reduce the guest's writes, or use convergence_policy keep-going (it hands off after max_rounds, with a longer guest pause) or throttle (it slows the guest's vCPUs)",
			HumanBytes(d.WriteRate), HumanBytes(in.LinkBytesPerSec))
		switch {
		case in.Policy == PolicyStop:
			d.Action, d.Reason = ActionStop, "guest writes faster than the link"
			return d
		case next > 0:
			d.Action, d.ThrottlePercent = ActionThrottle, next
			d.Reason = fmt.Sprintf("guest writes faster than the link; throttling its vCPUs by %d%%", next)
			return d
		}
		if deltaRounds >= maxRounds {
			d.Action, d.Reason = ActionHandoff, fmt.Sprintf("round cap %d reached while the guest writes faster than the link", maxRounds)
			return d
		}
		d.Action, d.Reason = ActionContinue, "guest writes faster than the link; keep going"
		if in.Policy == PolicyThrottle {
			d.Reason = fmt.Sprintf("guest writes faster than the link at the maximum throttle (%d%%); keep going", in.ThrottlePercent)
		}
		return d
	}
	if deltaRounds >= maxRounds {
		d.Action, d.Reason = ActionHandoff, fmt.Sprintf("round cap %d reached", maxRounds)
		return d
	}
	if float64(last.ChangedBytes) > float64(prev.ChangedBytes)*(1-in.MinShrink) {
		if next > 0 {
			d.Action, d.ThrottlePercent = ActionThrottle, next
			d.Reason = fmt.Sprintf("delta stopped shrinking (%s after %s) above the threshold %s; throttling the guest's vCPUs by %d%%",
				HumanBytes(last.ChangedBytes), HumanBytes(prev.ChangedBytes), HumanBytes(d.ThresholdBytes), next)
			return d
		}
		d.Action = ActionHandoff
		d.Reason = fmt.Sprintf("delta stopped shrinking (%s after %s)", HumanBytes(last.ChangedBytes), HumanBytes(prev.ChangedBytes))
		return d
	}
	if next > 0 && d.ThresholdBytes > 0 && prev.ChangedBytes > 0 {
		// Shrinking, but at this pace will the delta get under the
		// threshold before the round cap? If not, slow the guest now
		// rather than hand off a large residual.
		q := float64(last.ChangedBytes) / float64(prev.ChangedBytes)
		need := math.Log(float64(d.ThresholdBytes)/float64(last.ChangedBytes)) / math.Log(q)
		if left := maxRounds - deltaRounds; q > 0 && need > float64(left) {
			d.Action, d.ThrottlePercent = ActionThrottle, next
			d.Reason = fmt.Sprintf("delta shrinks too slowly (%s after %s; about %.0f more rounds to get under %s, %d left); throttling the guest's vCPUs by %d%%",
				HumanBytes(last.ChangedBytes), HumanBytes(prev.ChangedBytes), math.Ceil(need), HumanBytes(d.ThresholdBytes), left, next)
			return d
		}
	}
	d.Action, d.Reason = ActionContinue, "delta shrinking"
	return d
}
