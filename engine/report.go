package engine

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"time"
)

// Report results.
const (
	ResultSuccess   = "success"
	ResultFailed    = "failed"
	ResultCancelled = "cancelled"
	ResultRunning   = "running" // only for a migration that has not finished
)

// Integrity results.
const (
	IntegrityOK       = "ok"
	IntegrityMismatch = "mismatch"
	IntegritySkipped  = "skipped"
)

// PhaseTime is one entry of Report.Phases.
type PhaseTime struct {
	Name    string  `json:"name"`
	Seconds float64 `json:"seconds"`
}

// Report summarises a migration. Its JSON form is documented in
// docs/report-json.md; fields there are stable.
type Report struct {
	MigrationID    string      `json:"migration_id"`
	VMUUID         string      `json:"vm_uuid"`
	VMName         string      `json:"vm_name"`
	Result         string      `json:"result"`
	Phase          string      `json:"phase"`
	Error          string      `json:"error,omitempty"`
	StorageBackend string      `json:"storage_backend"`
	NetworkBackend string      `json:"network_backend"`
	Phases         []PhaseTime `json:"phases"`
	TotalSeconds   float64     `json:"total_seconds"`

	SeedRounds  int         `json:"seed_rounds"`
	Rounds      []RoundStat `json:"rounds"`
	Convergence string      `json:"convergence,omitempty"`
	// GuestWriteBytesPerSec is the guest write rate measured by the seed rounds.
	GuestWriteBytesPerSec int64 `json:"guest_write_bytes_per_sec"`
	// GuestThrottlePercent is the largest guest throttle applied (policy
	// throttle; 0: none): the share of the guest's CPU time taken away.
	GuestThrottlePercent int `json:"guest_throttle_percent"`
	// GuestThrottleActive: the guest is still throttled (the migration
	// stopped before it could give the CPU back: resume or cancel does).
	GuestThrottleActive bool `json:"guest_throttle_active"`

	BytesToMove      int64   `json:"bytes_to_move"`
	BytesOffered     int64   `json:"bytes_offered"`
	BytesOnWire      int64   `json:"bytes_on_wire"`
	ResidualBytes    int64   `json:"residual_bytes"`
	CompressionRatio float64 `json:"compression_ratio"`

	LinkBytesPerSec      int64   `json:"link_bytes_per_sec"`
	EffectiveBytesPerSec float64 `json:"effective_bytes_per_sec"`
	LinkUtilisation      float64 `json:"link_utilisation"`

	GuestPauseMS       int64  `json:"guest_pause_ms"`
	GuestPauseMeasured bool   `json:"guest_pause_measured"`
	Integrity          string `json:"integrity"`

	Estimate Estimate `json:"estimate"`
}

// BuildReport derives the report from a checkpoint.
func BuildReport(c *Checkpoint) Report {
	r := Report{
		MigrationID:           c.MigrationID,
		VMUUID:                c.Request.VMUUID,
		VMName:                c.VMName,
		Phase:                 c.Phase.String(),
		Error:                 c.Error,
		StorageBackend:        c.Settings.Storage,
		NetworkBackend:        c.Settings.Network,
		SeedRounds:            len(c.Seed.Rounds),
		Rounds:                append([]RoundStat{}, c.Seed.Rounds...),
		Convergence:           c.Seed.Decision,
		GuestWriteBytesPerSec: c.Seed.WriteRate,
		LinkBytesPerSec:       c.Plan.LinkBytesPerSec,
		Integrity:             c.Integrity,
		Estimate:              c.Plan,
	}
	if c.Seed.Throttle != nil {
		r.GuestThrottlePercent = c.Seed.Throttle.Percent
		r.GuestThrottleActive = c.Seed.Throttle.Percent > 0 && !c.Seed.ThrottleRemoved && c.Phase != PhaseDone
	}
	switch c.Phase {
	case PhaseDone:
		r.Result = ResultSuccess
	case PhaseRolledBack:
		r.Result = ResultFailed
		if c.Cancelled {
			r.Result = ResultCancelled
		}
	case PhaseFailed:
		r.Result = ResultFailed
	default:
		r.Result = ResultRunning
	}
	for _, p := range WorkPhases {
		s := c.Timings[p.String()]
		r.Phases = append(r.Phases, PhaseTime{Name: p.String(), Seconds: ms(s)})
		r.TotalSeconds += s
	}
	r.TotalSeconds = ms(r.TotalSeconds + c.Timings[PhaseRollingBack.String()])
	for _, d := range c.Disks {
		r.BytesToMove += allocated(d.Disk)
	}
	if len(c.Seed.Rounds) > 0 && c.Phase != PhaseRolledBack && c.Phase != PhaseRollingBack {
		// the changed set of the last seed round is what xapi copied at
		// Handoff; a rolled-back migration never handed off.
		r.ResidualBytes = c.Seed.Rounds[len(c.Seed.Rounds)-1].ChangedBytes
	}
	r.BytesOffered, r.BytesOnWire = c.Stats.BytesOffered, c.Stats.BytesOnWire
	if r.BytesOnWire == 0 { // no gateway counters: use the storage backend's
		for _, rs := range c.Seed.Rounds {
			r.BytesOnWire += rs.BytesOnWire
		}
	}
	if r.BytesOnWire > 0 && r.BytesOffered > 0 {
		r.CompressionRatio = float64(r.BytesOffered) / float64(r.BytesOnWire)
	}
	moving := c.Timings[PhaseSeed.String()] + c.Timings[PhaseHandoff.String()]
	if moving > 0 {
		r.EffectiveBytesPerSec = float64(r.BytesOnWire) / moving
	}
	if r.LinkBytesPerSec > 0 {
		r.LinkUtilisation = r.EffectiveBytesPerSec / float64(r.LinkBytesPerSec)
	}
	if c.PauseMeasured {
		r.GuestPauseMS, r.GuestPauseMeasured = time.Duration(c.PauseNS).Milliseconds(), true
	} else if !neverHandedOff(c) {
		r.GuestPauseMS = int64(c.Plan.DowntimeSeconds * 1000)
	}
	if r.Integrity == "" {
		r.Integrity = IntegritySkipped
	}
	return r
}

// neverHandedOff reports a migration that rolled back (or is rolling back):
// xapi never paused its guest.
func neverHandedOff(c *Checkpoint) bool {
	return c.Phase == PhaseRollingBack || c.Phase == PhaseRolledBack ||
		c.Phase == PhaseFailed && c.FailedIn == PhaseRollingBack
}

// JSON renders the report as one JSON object (no trailing newline).
func (r Report) JSON() ([]byte, error) {
	if r.Phases == nil {
		r.Phases = []PhaseTime{}
	}
	if r.Rounds == nil {
		r.Rounds = []RoundStat{}
	}
	return json.Marshal(r)
}

// Text renders the report for people.
func (r Report) Text() string {
	var b strings.Builder
	name := r.VMName
	if name == "" {
		name = r.VMUUID
	}
	fmt.Fprintf(&b, "migration %s of VM %s (%s): %s\n", r.MigrationID, name, r.VMUUID, strings.ToUpper(r.Result))
	if r.Error != "" {
		fmt.Fprintf(&b, "  error:           %s\n", r.Error)
	}
	fmt.Fprintf(&b, "  backends:        storage %s, network %s\n", r.StorageBackend, r.NetworkBackend)
	fmt.Fprintf(&b, "  phases:         ")
	for _, p := range r.Phases {
		fmt.Fprintf(&b, " %s %s", p.Name, fmtSeconds(p.Seconds))
	}
	fmt.Fprintf(&b, "\n  total time:      %s\n", fmtSeconds(r.TotalSeconds))
	fmt.Fprintf(&b, "  to move:         %s (allocated)\n", HumanBytes(r.BytesToMove))
	fmt.Fprintf(&b, "  on the wire:     %s", HumanBytes(r.BytesOnWire))
	if r.CompressionRatio > 0 {
		fmt.Fprintf(&b, " (compression %.2fx of %s offered)", r.CompressionRatio, HumanBytes(r.BytesOffered))
	}
	fmt.Fprintf(&b, "\n  rate:            %s/s effective", HumanBytes(int64(r.EffectiveBytesPerSec)))
	if r.LinkBytesPerSec > 0 {
		fmt.Fprintf(&b, " vs link %s/s (%.0f%%)", HumanBytes(r.LinkBytesPerSec), 100*r.LinkUtilisation)
	}
	fmt.Fprintf(&b, "\n  seed rounds:     %d", r.SeedRounds)
	for _, rs := range r.Rounds {
		fmt.Fprintf(&b, " [%d: %s in %s", rs.Round, HumanBytes(rs.ChangedBytes), fmtSeconds(rs.Seconds))
		if rs.ThrottlePercent > 0 {
			fmt.Fprintf(&b, ", guest throttled %d%%", rs.ThrottlePercent)
		}
		b.WriteString("]")
	}
	fmt.Fprintf(&b, "\n  residual delta:  %s\n", HumanBytes(r.ResidualBytes))
	if r.Convergence != "" {
		fmt.Fprintf(&b, "  convergence:     %s\n", r.Convergence)
	}
	if r.GuestWriteBytesPerSec > 0 {
		fmt.Fprintf(&b, "  guest writes:    %s/s (measured)\n", HumanBytes(r.GuestWriteBytesPerSec))
	}
	switch {
	case r.GuestThrottleActive:
		fmt.Fprintf(&b, "  guest throttle:  STILL IN FORCE: vCPUs slowed by %d%%; wanmotion migrate resume %s (or cancel) gives the guest its CPU back\n", r.GuestThrottlePercent, r.MigrationID)
	case r.GuestThrottlePercent > 0:
		fmt.Fprintf(&b, "  guest throttle:  vCPUs slowed by up to %d%% until the hand-over\n", r.GuestThrottlePercent)
	}
	pause := "estimated"
	if r.GuestPauseMeasured {
		pause = "measured"
	}
	if r.GuestPauseMS == 0 && !r.GuestPauseMeasured && (r.Phase == PhaseRolledBack.String() || r.Phase == PhaseRollingBack.String()) {
		fmt.Fprintf(&b, "  guest pause:     none (rolled back)\n")
	} else {
		fmt.Fprintf(&b, "  guest pause:     %d ms (%s)\n", r.GuestPauseMS, pause)
	}
	fmt.Fprintf(&b, "  integrity:       %s\n", r.Integrity)
	return b.String()
}

// ms rounds seconds to milliseconds (no float noise in JSON).
func ms(s float64) float64 { return math.Round(s*1000) / 1000 }

func fmtSeconds(s float64) string {
	return (time.Duration(s * float64(time.Second))).Round(time.Millisecond).String()
}

// allocated returns the bytes a sparse full copy moves for a disk.
func allocated(d Disk) int64 {
	a := d.PhysicalUtilisation
	if a <= 0 || (d.VirtualSize > 0 && a > d.VirtualSize) {
		a = d.VirtualSize
	}
	return a
}
