package e2e

import (
	"context"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
)

// fastGuest makes demo-vm's guest write faster than the emulated link
// carries (200 Mbit/s = 25 MB/s).
const fastGuest = "32MiB/s"

// TestThrottlePolicy runs the real CLI with --policy throttle against a
// guest that out-writes the link: the controller slows the guest's vCPUs
// through the host plugin and the simulated host's xl, and gives the CPU
// back before the VM moves, or when the migration is cancelled.
func TestThrottlePolicy(t *testing.T) {
	t.Run("success", func(t *testing.T) {
		e := newEnv(t)
		e.guestStart(siteA, fastGuest)
		rep, code := e.migrate("wm-throttle", "--policy", "throttle", "--downtime-target", "300ms").report(t)
		require.Equal(t, 0, code, "report %+v", rep)
		assert.Equal(t, "success", rep.Result)
		assert.Equal(t, "ok", rep.Integrity)
		assert.GreaterOrEqual(t, rep.GuestThrottlePercent, engine.DefaultThrottleInitial, "the guest was throttled")
		throttled := 0
		for _, r := range rep.Rounds {
			if r.ThrottlePercent > 0 {
				throttled++
			}
		}
		assert.Positive(t, throttled, "rounds ran throttled: %+v", rep.Rounds)
		e.settled(siteB)
		// the destination domain runs at full speed
		e.pollGuest(siteB, "the destination guest runs at full speed", func(st map[string]string) bool {
			return st["cap"] == "0" && st["effective_rate"] == st["rate"]
		})
	})

	t.Run("cancel-releases", func(t *testing.T) {
		e := newEnv(t)
		e.guestStart(siteA, fastGuest)
		id := "wm-throttle-cancel"
		// at most 40 % throttle the guest still writes ~19 MiB/s of random
		// blocks: the seed cannot get under a 100 ms pause and keeps going
		// (8 delta rounds of seconds each) while we cancel
		p := e.migrate(id, "--policy", "throttle", "--downtime-target", "100ms", "--throttle-max", "40")
		// (the checkpoint holds the domain's cap before the first step, with
		// percent 0, then each step)
		cp := e.waitFor(id, p, "a guest throttle", func(cp *engine.Checkpoint) bool {
			return cp.Seed.Throttle != nil && cp.Seed.Throttle.Percent > 0 && !cp.Seed.ThrottleRemoved
		})
		host, domid := e.domain(siteA)
		require.Equal(t, cp.Seed.Throttle.Domid, domid)
		assert.Equal(t, int64(0), cp.Seed.Throttle.PrevCap, "the cap before the migration")
		capNow, err := strconv.ParseInt(e.xlCap(host, domid), 10, 64)
		require.NoError(t, err)
		assert.Positive(t, capNow, "xl shows a cap set by the controller")
		assert.LessOrEqual(t, capNow, cp.Seed.Throttle.Cap, "the cap only goes down while the seed runs")
		// the simulated guest reads its domain's cap every 250 ms (the
		// controller may have stepped the throttle further meanwhile)
		e.pollGuest(siteA, "the guest is slowed", func(st map[string]string) bool {
			return st["cap"] != "0" && st["cap"] != "" && st["effective_rate"] != st["rate"]
		})

		c := e.start(id+"-cancel", "migrate", "cancel", id, "--state-dir", e.stateDir)
		require.Equal(t, 0, c.wait(t), "cancel: %s", c.stderrText())
		rep, code := p.report(t)
		assert.Equal(t, 3, code, "report %+v", rep)
		assert.Equal(t, "cancelled", rep.Result)
		e.settled(siteA)
		assert.Equal(t, "0", e.xlCap(host, domid), "the original cap is back")
		e.pollGuest(siteA, "the guest runs at full speed again", func(st map[string]string) bool {
			return st["cap"] == "0" && st["effective_rate"] == st["rate"]
		})
		assert.True(t, e.checkpoint(id).Seed.ThrottleRemoved)
	})
}

// guestStart restarts demo-vm's guest at rate (random 64 KiB writes).
func (e *env) guestStart(site int, rate string) {
	e.t.Helper()
	var res any
	require.NoError(e.t, e.client(site).CallInto(context.Background(), &res, "sim.guest_start", e.vmUUID,
		map[string]string{"rate": rate, "dirty_rate": dirtyRate, "pattern": "random", "block_size": "64KiB"}))
}

// pollGuest polls sim.guest_stats of demo-vm until cond holds (20 s).
func (e *env) pollGuest(site int, what string, cond func(map[string]string) bool) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last map[string]string
	for time.Now().Before(deadline) {
		if last = e.guestStats(site); cond(last) {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	e.t.Fatalf("%s: not within 20 s; last sim.guest_stats: %v", what, last)
}

// guestStats is sim.guest_stats of demo-vm.
func (e *env) guestStats(site int) map[string]string {
	e.t.Helper()
	var res map[string]string
	require.NoError(e.t, e.client(site).CallInto(context.Background(), &res, "sim.guest_stats", e.vmUUID))
	return res
}

// domain returns the name of the host demo-vm runs on and its domid.
func (e *env) domain(site int) (string, int64) {
	e.t.Helper()
	c := e.client(site)
	ref, err := c.VMGetByUUID(context.Background(), e.vmUUID)
	require.NoError(e.t, err)
	rec, err := c.VMGetRecord(context.Background(), ref)
	require.NoError(e.t, err)
	h, err := c.HostGetRecord(context.Background(), rec.ResidentOn)
	require.NoError(e.t, err)
	return h.NameLabel, rec.Domid
}

// xlCap runs the simulated host's xl to read a domain's cap.
func (e *env) xlCap(host string, domid int64) string {
	e.t.Helper()
	out, err := exec.Command(filepath.Join(e.simDir, host, "usr", "sbin", "xl"), "sched-credit", "-d", strconv.FormatInt(domid, 10)).CombinedOutput()
	require.NoError(e.t, err, "xl: %s", out)
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	f := strings.Fields(lines[len(lines)-1])
	require.GreaterOrEqual(e.t, len(f), 3, "xl output %q", out)
	return f[len(f)-1]
}
