package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
)

// scope is a testing.TB whose cleanups and temp dirs end with the scope,
// not with the benchmark: each benchmark iteration builds its own envs
// (simulator, gate, link) and must stop them before the next one starts.
type scope struct {
	testing.TB
	cleanups []func()
}

func newScope(tb testing.TB) *scope { return &scope{TB: tb} }

func (s *scope) Cleanup(f func()) { s.cleanups = append(s.cleanups, f) }

func (s *scope) TempDir() string {
	s.Helper()
	dir, err := os.MkdirTemp("", "wanmotion-e2e-bench-")
	require.NoError(s, err)
	s.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// close runs the cleanups, last registered first.
func (s *scope) close() {
	for i := len(s.cleanups) - 1; i >= 0; i-- {
		s.cleanups[i]()
	}
	s.cleanups = nil
}

// policyRun is what one migration under one policy measured.
type policyRun struct {
	pauseMS      float64
	residual     float64
	total        float64
	handoff      float64 // seconds of the handoff phase (xapi copies the residual there)
	seedRounds   float64
	wire         float64
	throttledSec float64 // seconds of the seed rounds run with a guest throttle
	maxThrottle  float64 // largest throttle percent
	lostSec      float64 // Σ round seconds × throttle share: guest run time taken away
}

func (r *policyRun) add(o policyRun) {
	r.pauseMS += o.pauseMS
	r.residual += o.residual
	r.total += o.total
	r.handoff += o.handoff
	r.seedRounds += o.seedRounds
	r.wire += o.wire
	r.throttledSec += o.throttledSec
	r.maxThrottle += o.maxThrottle
	r.lostSec += o.lostSec
}

// migratePolicy runs one migration of demo-vm, whose guest out-writes the
// link, under policy on a fresh env, and checks that it succeeded.
func migratePolicy(b *testing.B, iter int, policy string) policyRun {
	b.Helper()
	s := newScope(b)
	defer s.close()
	e := newEnv(s)
	e.guestStart(siteA, fastGuest)
	id := fmt.Sprintf("wm-bench-%s-%d", policy, iter)
	rep, code := e.migrate(id, "--policy", policy, "--downtime-target", "300ms").report(s)
	require.Equal(s, 0, code, "%s: report %+v", policy, rep)
	require.Equal(s, "success", rep.Result)
	require.Equal(s, "ok", rep.Integrity, "%s: integrity", policy)
	e.settled(siteB)
	require.False(s, s.Failed(), "%s: the migration did not settle", policy)

	r := policyRun{
		pauseMS:     float64(rep.GuestPauseMS),
		residual:    float64(rep.ResidualBytes),
		total:       rep.TotalSeconds,
		seedRounds:  float64(rep.SeedRounds),
		wire:        float64(rep.BytesOnWire),
		maxThrottle: float64(rep.GuestThrottlePercent),
	}
	for _, ph := range rep.Phases {
		if ph.Name == engine.PhaseHandoff.String() {
			r.handoff += ph.Seconds
		}
	}
	rounds := ""
	for _, rd := range rep.Rounds {
		if rd.ThrottlePercent > 0 {
			r.throttledSec += rd.Seconds
			r.lostSec += rd.Seconds * float64(rd.ThrottlePercent) / 100
		}
		rounds += fmt.Sprintf(" r%d:%.1fMiB/%.2fs/%d%%", rd.Round, float64(rd.ChangedBytes)/(1<<20), rd.Seconds, rd.ThrottlePercent)
	}
	b.Logf("iter %d %-10s pause %d ms (measured %v), residual %.1f MiB, total %.1f s, handoff %.1f s, rounds %d, wire %.1f MiB, throttled %.1f s (max %d%%, %.1f s of guest time taken), write rate %.1f MiB/s, convergence %q;%s",
		iter, policy, rep.GuestPauseMS, rep.GuestPauseMeasured, r.residual/(1<<20), r.total, r.handoff, rep.SeedRounds,
		r.wire/(1<<20), r.throttledSec, rep.GuestThrottlePercent, r.lostSec, float64(rep.GuestWriteBytesPerSec)/(1<<20), rep.Convergence, rounds)
	assert.True(s, rep.GuestPauseMeasured, "the simulator measured the pause")
	return r
}

// BenchmarkConvergencePolicy compares --policy throttle with keep-going
// against a guest that writes faster than the emulated link carries
// (fastGuest on 200 Mbit/s), both with a 300 ms downtime target. Each
// iteration migrates on a fresh env per policy, alternating which policy
// goes first. Reported per policy: guest pause, residual handed to xapi,
// total and handoff time, seed rounds, bytes on the wire, and for throttle
// the seconds the guest ran throttled; plus the ratios throttle/keep-going
// (the peer runs in the same benchmark, so the ratios are what to read).
func BenchmarkConvergencePolicy(b *testing.B) {
	var kg, th policyRun
	for i := 0; i < b.N; i++ {
		order := []string{"keep-going", "throttle"}
		if i%2 == 1 {
			order[0], order[1] = order[1], order[0]
		}
		for _, policy := range order {
			r := migratePolicy(b, i, policy)
			if policy == "throttle" {
				th.add(r)
			} else {
				kg.add(r)
			}
		}
	}
	n := float64(b.N)
	for _, p := range []struct {
		name string
		r    policyRun
	}{{"keepgoing", kg}, {"throttle", th}} {
		b.ReportMetric(p.r.pauseMS/n, p.name+"-pause-ms")
		b.ReportMetric(p.r.residual/n, p.name+"-residual-B")
		b.ReportMetric(p.r.total/n, p.name+"-total-s")
		b.ReportMetric(p.r.handoff/n, p.name+"-handoff-s")
		b.ReportMetric(p.r.seedRounds/n, p.name+"-rounds")
		b.ReportMetric(p.r.wire/n, p.name+"-wire-B")
	}
	b.ReportMetric(th.throttledSec/n, "throttle-throttled-s")
	b.ReportMetric(th.maxThrottle/n, "throttle-max-%")
	b.ReportMetric(th.lostSec/n, "throttle-guest-time-taken-s")
	ratio := func(a, c float64) float64 {
		if c == 0 {
			return 0
		}
		return a / c
	}
	b.ReportMetric(ratio(th.pauseMS, kg.pauseMS), "pause-throttle/keepgoing")
	b.ReportMetric(ratio(th.residual, kg.residual), "residual-throttle/keepgoing")
	b.ReportMetric(ratio(th.total, kg.total), "total-throttle/keepgoing")
	b.ReportMetric(ratio(th.handoff, kg.handoff), "handoff-throttle/keepgoing")
	// wall time per iteration is two envs and two migrations: not a metric
	b.ReportMetric(0, "ns/op")
}
