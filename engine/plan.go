package engine

import (
	"fmt"
	"math"
	"time"
)

// Link describes the WAN between the sites.
type Link struct {
	BandwidthBytesPerSec int64
	RTT                  time.Duration
}

// Planner assumptions (documented in docs/engine.md).
const (
	// fixedPhaseSeconds is the assumed time of each of plan, prepare,
	// switch, verify and cleanup (agent start, API round trips).
	fixedPhaseSeconds = 3.0
	// pauseOverhead is the assumed fixed part of the guest pause (device
	// model hand-over, unpause) on top of the stop-and-copy transfer.
	pauseOverhead = 300 * time.Millisecond
	// memPrecopyIterations is how many pre-copy iterations xenguest makes
	// at most before stop-and-copy.
	memPrecopyIterations = 5
)

// PlanInput are the planner's inputs.
type PlanInput struct {
	Link Link
	// BytesToMove is what round 0 copies: the allocated bytes of all disks.
	BytesToMove int64
	MemoryBytes int64
	// GuestWriteBytesPerSec is the guest's disk write rate (0 if unknown).
	GuestWriteBytesPerSec int64
	// MemoryDirtyBytesPerSec is the memory dirty rate; 0 uses the disk write rate.
	MemoryDirtyBytesPerSec int64
	DowntimeTarget         time.Duration
	MaxRounds              int
	// CompressionRatio ≥ 1 multiplies the effective link rate (1 if unknown).
	CompressionRatio float64
}

// Estimate is the planner's result (kept in the checkpoint; the progress
// weights come from it).
type Estimate struct {
	LinkBytesPerSec       int64   `msgpack:"link_bytes_per_sec" json:"link_bytes_per_sec"`
	RTTSeconds            float64 `msgpack:"rtt_seconds" json:"rtt_seconds"`
	BytesToMove           int64   `msgpack:"bytes_to_move" json:"bytes_to_move"`
	MemoryBytes           int64   `msgpack:"memory_bytes" json:"memory_bytes"`
	GuestWriteBytesPerSec int64   `msgpack:"guest_write_bytes_per_sec" json:"guest_write_bytes_per_sec"`
	HandoffThresholdBytes int64   `msgpack:"handoff_threshold_bytes" json:"handoff_threshold_bytes"`
	SeedRounds            int     `msgpack:"seed_rounds" json:"seed_rounds"`
	SeedSeconds           float64 `msgpack:"seed_seconds" json:"seed_seconds"`
	ResidualBytes         int64   `msgpack:"residual_bytes" json:"residual_bytes"`
	HandoffSeconds        float64 `msgpack:"handoff_seconds" json:"handoff_seconds"`
	TotalSeconds          float64 `msgpack:"total_seconds" json:"total_seconds"`
	DowntimeSeconds       float64 `msgpack:"downtime_seconds" json:"downtime_seconds"`
	Converges             bool    `msgpack:"converges" json:"converges"`
	Advice                string  `msgpack:"advice" json:"advice,omitempty"`
}

// HandoffThreshold is the delta size under which Seed hands off: what the
// link moves within the downtime target.
func HandoffThreshold(linkBytesPerSec int64, target time.Duration) int64 {
	return int64(float64(linkBytesPerSec) * target.Seconds())
}

// EstimateMigration predicts rounds, duration and downtime. Disk rounds:
// round 0 copies BytesToMove; each next round copies what the guest wrote
// during the previous one, until that is under the handoff threshold or
// MaxRounds delta rounds were made. Handoff: xapi copies the residual
// delta, then pre-copies memory (up to 5 iterations) and pauses the guest
// for the last dirty set.
func EstimateMigration(in PlanInput) (Estimate, error) {
	if in.Link.BandwidthBytesPerSec <= 0 {
		return Estimate{}, fmt.Errorf("%w: link bandwidth unknown: set a bandwidth", ErrConfig)
	}
	if in.BytesToMove < 0 || in.MemoryBytes < 0 || in.GuestWriteBytesPerSec < 0 {
		return Estimate{}, fmt.Errorf("%w: negative sizes", ErrConfig)
	}
	ratio := in.CompressionRatio
	if ratio < 1 || math.IsNaN(ratio) || math.IsInf(ratio, 0) {
		ratio = 1
	}
	maxRounds := in.MaxRounds
	if maxRounds <= 0 {
		maxRounds = DefaultMaxRounds
	}
	target := in.DowntimeTarget
	if target <= 0 {
		target = DefaultDowntimeTarget
	}
	L := float64(in.Link.BandwidthBytesPerSec) * ratio
	W := float64(in.GuestWriteBytesPerSec)
	e := Estimate{
		LinkBytesPerSec:       in.Link.BandwidthBytesPerSec,
		RTTSeconds:            in.Link.RTT.Seconds(),
		BytesToMove:           in.BytesToMove,
		MemoryBytes:           in.MemoryBytes,
		GuestWriteBytesPerSec: in.GuestWriteBytesPerSec,
		HandoffThresholdBytes: HandoffThreshold(in.Link.BandwidthBytesPerSec, target),
		Converges:             W < L,
	}
	thr := float64(e.HandoffThresholdBytes)
	t := float64(in.BytesToMove) / L
	e.SeedSeconds, e.SeedRounds = t, 1
	B := float64(in.BytesToMove)
	residual := math.Min(W*t, B)
	for r := 1; r <= maxRounds; r++ {
		delta := math.Min(W*t, B)
		e.SeedRounds++ // as Decide: at least one delta round after round 0
		if delta <= 0 {
			residual = 0
			break
		}
		t = delta / L
		e.SeedSeconds += t
		residual = math.Min(W*t, B)
		if delta <= thr {
			break
		}
	}
	e.ResidualBytes = int64(residual)
	// Handoff: residual disk copy, memory pre-copy, stop-and-copy.
	D := float64(in.MemoryDirtyBytesPerSec)
	if D <= 0 {
		D = W
	}
	mem := float64(in.MemoryBytes)
	mt := mem / L
	handoff := float64(e.ResidualBytes)/L + mt
	dirty := math.Min(mem, D*mt)
	for i := 1; i < memPrecopyIterations && dirty > 0; i++ {
		mt = dirty / L
		handoff += mt
		dirty = math.Min(mem, D*mt)
	}
	stopCopy := dirty / L
	e.DowntimeSeconds = stopCopy + 2*in.Link.RTT.Seconds() + pauseOverhead.Seconds()
	e.HandoffSeconds = handoff + e.DowntimeSeconds + 4*in.Link.RTT.Seconds()
	e.TotalSeconds = 5*fixedPhaseSeconds + e.SeedSeconds + e.HandoffSeconds
	if !e.Converges {
		e.Advice = fmt.Sprintf("the guest writes %s/s but the link carries %s/s: seed rounds cannot converge; raise the bandwidth or lower the guest's write rate (convergence_policy keep-going hands off anyway after max_rounds, with a longer guest pause)",
			HumanBytes(in.GuestWriteBytesPerSec), HumanBytes(int64(L)))
	} else if e.DowntimeSeconds > target.Seconds()*1.5 {
		e.Advice = fmt.Sprintf("expected guest pause %.1fs exceeds the downtime target %s (memory dirty rate vs link)", e.DowntimeSeconds, target)
	}
	return e, nil
}

// phaseWeights returns the expected seconds of each work phase, used to
// spread task progress 0..1 across the whole migration.
func phaseWeights(e Estimate) map[Phase]float64 {
	seed, hand := e.SeedSeconds, e.HandoffSeconds
	if seed <= 0 {
		seed = fixedPhaseSeconds
	}
	if hand <= 0 {
		hand = fixedPhaseSeconds
	}
	return map[Phase]float64{
		PhasePlan: 1, PhasePrepare: fixedPhaseSeconds, PhaseSeed: seed, PhaseHandoff: hand,
		PhaseSwitch: 1, PhaseVerify: 1, PhaseCleanup: 1,
	}
}

// OverallProgress maps (phase, fraction of that phase) to 0..1.
func OverallProgress(e Estimate, p Phase, frac float64) float64 {
	w := phaseWeights(e)
	var total, done float64
	for _, ph := range WorkPhases {
		total += w[ph]
		if ph < p {
			done += w[ph]
		}
	}
	switch {
	case p == PhaseDone:
		return 1
	case p < PhasePlan || p > PhaseCleanup:
		return math.Min(1, done/total)
	}
	frac = math.Max(0, math.Min(1, frac))
	return math.Min(1, (done+frac*w[p])/total)
}

// HumanBytes formats a byte count with binary units.
func HumanBytes(n int64) string {
	const unit = 1024
	if n < unit && n > -unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit || m <= -unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
