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
		var st map[string]string
		require.Eventually(t, func() bool {
			st = e.guestStats(siteB)
			return st["cap"] == "0" && st["effective_rate"] == st["rate"]
		}, 10*time.Second, 50*time.Millisecond, "the destination guest runs at full speed: %v", st)
	})

	t.Run("cancel-releases", func(t *testing.T) {
		e := newEnv(t)
		e.guestStart(siteA, fastGuest)
		id := "wm-throttle-cancel"
		// at most 40 % throttle the guest still writes ~19 MiB/s of random
		// blocks: the seed cannot get under a 100 ms pause and keeps going
		// (8 delta rounds of seconds each) while we cancel
		p := e.migrate(id, "--policy", "throttle", "--downtime-target", "100ms", "--throttle-max", "40")
		cp := e.waitFor(id, p, "a guest throttle", func(cp *engine.Checkpoint) bool { return cp.Seed.Throttle != nil && !cp.Seed.ThrottleRemoved })
		host, domid := e.domain(siteA)
		require.Equal(t, cp.Seed.Throttle.Domid, domid)
		assert.Equal(t, strconv.FormatInt(cp.Seed.Throttle.Cap, 10), e.xlCap(host, domid), "xl shows the cap the controller set")
		// the simulated guest reads its domain's cap every 250 ms
		var st map[string]string
		require.Eventually(t, func() bool {
			st = e.guestStats(siteA)
			return st["cap"] == strconv.FormatInt(cp.Seed.Throttle.Cap, 10) && st["effective_rate"] != st["rate"]
		}, 10*time.Second, 50*time.Millisecond, "the guest is slowed: %v", st)

		c := e.start(id+"-cancel", "migrate", "cancel", id, "--state-dir", e.stateDir)
		require.Equal(t, 0, c.wait(t), "cancel: %s", c.stderrText())
		rep, code := p.report(t)
		assert.Equal(t, 3, code, "report %+v", rep)
		assert.Equal(t, "cancelled", rep.Result)
		e.settled(siteA)
		assert.Equal(t, "0", e.xlCap(host, domid), "the original cap is back")
		require.Eventually(t, func() bool {
			st = e.guestStats(siteA)
			return st["cap"] == "0" && st["effective_rate"] == st["rate"]
		}, 10*time.Second, 50*time.Millisecond, "the guest runs at full speed again: %v", st)
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
