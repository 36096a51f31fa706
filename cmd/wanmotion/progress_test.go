package main

import (
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
)

type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }
func newClock() *fakeClock                   { return &fakeClock{t: time.Date(2026, 11, 22, 1, 0, 0, 0, time.UTC)} }
func seed(round int, done, wire int64) engine.Progress {
	return engine.Progress{Phase: engine.PhaseSeed, Round: round, Overall: 0.5, BytesDone: done, BytesTotal: 100 << 20,
		BytesOnWire: wire, ETA: 90 * time.Second}
}

func TestProgressTerminal(t *testing.T) {
	var b strings.Builder
	clk := newClock()
	v := newProgressView(&b, true, clk.now)
	v.Observe(engine.Progress{Phase: engine.PhasePlan, Overall: 0})
	v.Observe(engine.Progress{Phase: engine.PhasePrepare, Overall: 0.05})
	v.Observe(seed(0, 10<<20, 10<<20))
	clk.advance(time.Second)
	v.Observe(seed(0, 20<<20, 30<<20))
	v.Done()
	out := b.String()

	// Redrawn in place: every update starts with \r; a phase change keeps
	// the finished line (newline) and the display ends with a newline.
	assert.Equal(t, 4, strings.Count(out, "\r"))
	assert.Equal(t, 3, strings.Count(out, "\n"), "%q", out)
	assert.True(t, strings.HasSuffix(out, "\n"))
	last := out[strings.LastIndex(out, "\r")+1:]
	assert.Contains(t, last, "seed round 0")
	assert.Contains(t, last, "[############------------]")
	assert.Contains(t, last, " 50%")
	assert.Contains(t, last, "20.0 MiB/100.0 MiB")
	assert.Contains(t, last, "30.0 MiB/s", "rate: 30 MiB on the wire in the one second since the first update")
	assert.Contains(t, last, "ETA 1m30s")
	assert.Contains(t, last, "wire 30.0 MiB")
	assert.NotContains(t, out, "2026-", "no timestamps on a terminal")

	// A shorter line pads over the previous one.
	b.Reset()
	v = newProgressView(&b, true, clk.now)
	v.Observe(seed(1, 50<<20, 50<<20))
	first := b.Len() - 1
	v.Observe(engine.Progress{Phase: engine.PhaseSeed, Round: 1, Overall: 0.6})
	second := b.Len() - first - 2
	assert.GreaterOrEqual(t, second, first, "the redraw covers the old line")
}

func TestProgressPlain(t *testing.T) {
	var b strings.Builder
	clk := newClock()
	v := newProgressView(&b, false, clk.now)
	v.Observe(engine.Progress{Phase: engine.PhasePlan})
	v.Observe(seed(0, 1<<20, 1<<20))
	clk.advance(2 * time.Second)
	v.Observe(seed(0, 2<<20, 2<<20)) // same phase and round, too soon: not printed
	clk.advance(9 * time.Second)
	v.Observe(seed(0, 3<<20, 3<<20)) // 11 s after the last line: printed
	v.Observe(seed(1, 0, 3<<20))     // a new round: printed at once
	v.Observe(engine.Progress{Phase: engine.PhaseDone, Overall: 1})
	v.Done()
	out := b.String()
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	require.Len(t, lines, 5, "%q", out)
	assert.NotContains(t, out, "\r")
	assert.NotContains(t, out, "[#", "no bar in plain mode")
	for _, l := range lines {
		_, err := time.Parse(time.RFC3339, strings.Fields(l)[0])
		assert.NoError(t, err, "timestamped: %q", l)
	}
	assert.Contains(t, lines[0], "plan")
	assert.Contains(t, lines[2], "3.0 MiB/100.0 MiB")
	assert.Contains(t, lines[3], "seed round 1")
	assert.Contains(t, lines[4], "done")
	assert.Contains(t, lines[4], "100%")
	assert.NotContains(t, lines[4], "ETA")
}
