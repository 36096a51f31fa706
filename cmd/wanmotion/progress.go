package main

import (
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/wanmotion/wanmotion/engine"
)

// progressView renders engine.Progress: on a terminal one line redrawn in
// place with "\r" (phase, bar, rate, ETA, bytes on the wire); otherwise
// plain timestamped lines, at most one per plainEvery unless the phase or
// round changes.
type progressView struct {
	mu    sync.Mutex
	w     io.Writer
	tty   bool
	now   func() time.Time
	width int // bar width

	phase      engine.Phase
	round      int
	started    bool
	lastLen    int
	lastPrint  time.Time
	rateAt     time.Time
	rateBytes  int64
	rate       float64 // bytes/s on the wire, smoothed
	wire       int64   // most bytes on the wire seen
	plainEvery time.Duration
}

func newProgressView(w io.Writer, tty bool, now func() time.Time) *progressView {
	if now == nil {
		now = time.Now
	}
	return &progressView{w: w, tty: tty, now: now, width: 24, plainEvery: 10 * time.Second, phase: engine.PhaseUnknown, round: -1}
}

// Observe is the engine's Deps.Observe.
func (v *progressView) Observe(p engine.Progress) {
	v.mu.Lock()
	defer v.mu.Unlock()
	now := v.now()
	// Bytes on the wire are cumulative; updates outside Seed carry none.
	p.BytesOnWire = max(p.BytesOnWire, v.wire)
	v.wire = p.BytesOnWire
	v.updateRate(now, p.BytesOnWire)
	changed := !v.started || p.Phase != v.phase || (p.Phase == engine.PhaseSeed && p.Round != v.round)
	v.started = true
	if v.tty {
		if changed && v.lastLen > 0 && p.Phase != v.phase {
			fmt.Fprintln(v.w) // keep the finished phase's last line
			v.lastLen = 0
		}
		v.phase, v.round = p.Phase, p.Round
		line := v.line(p)
		pad := ""
		if n := v.lastLen - len(line); n > 0 {
			pad = strings.Repeat(" ", n)
		}
		fmt.Fprintf(v.w, "\r%s%s", line, pad)
		v.lastLen = len(line)
		return
	}
	if !changed && now.Sub(v.lastPrint) < v.plainEvery {
		return
	}
	v.phase, v.round = p.Phase, p.Round
	v.lastPrint = now
	fmt.Fprintf(v.w, "%s %s\n", now.UTC().Format(time.RFC3339), v.line(p))
}

// Done ends the display (a final newline on a terminal).
func (v *progressView) Done() {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.tty && v.lastLen > 0 {
		fmt.Fprintln(v.w)
		v.lastLen = 0
	}
}

func (v *progressView) updateRate(now time.Time, wire int64) {
	if v.rateAt.IsZero() || wire < v.rateBytes {
		v.rateAt, v.rateBytes = now, wire
		return
	}
	dt := now.Sub(v.rateAt).Seconds()
	if dt < 0.5 {
		return
	}
	r := float64(wire-v.rateBytes) / dt
	if v.rate == 0 {
		v.rate = r
	} else {
		v.rate = 0.7*v.rate + 0.3*r
	}
	v.rateAt, v.rateBytes = now, wire
}

func (v *progressView) line(p engine.Progress) string {
	var b strings.Builder
	phase := p.Phase.String()
	if p.Phase == engine.PhaseSeed {
		phase = fmt.Sprintf("seed round %d", p.Round)
	}
	fmt.Fprintf(&b, "%-13s", phase)
	if v.tty {
		fill := int(p.Overall*float64(v.width) + 0.5)
		fill = max(0, min(v.width, fill))
		fmt.Fprintf(&b, " [%s%s]", strings.Repeat("#", fill), strings.Repeat("-", v.width-fill))
	}
	fmt.Fprintf(&b, " %3.0f%%", 100*p.Overall)
	if p.BytesTotal > 0 {
		fmt.Fprintf(&b, "  %s/%s", engine.HumanBytes(p.BytesDone), engine.HumanBytes(p.BytesTotal))
	}
	if v.rate > 0 && p.Phase == engine.PhaseSeed { // only Seed reports bytes on the wire as they go
		fmt.Fprintf(&b, "  %s/s", engine.HumanBytes(int64(v.rate)))
	}
	if p.ETA > 0 && !p.Phase.Stopped() {
		fmt.Fprintf(&b, "  ETA %s", p.ETA.Round(time.Second))
	}
	fmt.Fprintf(&b, "  wire %s", engine.HumanBytes(p.BytesOnWire))
	if p.Message != "" && !v.tty {
		fmt.Fprintf(&b, "  %s", p.Message)
	}
	return b.String()
}
