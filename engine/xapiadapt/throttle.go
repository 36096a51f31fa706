package xapiadapt

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi"
)

// Errors of the guest throttle.
var (
	// ErrVMNotRunning: the VM has no running domain to throttle.
	ErrVMNotRunning = errors.New("vm is not running")
	// ErrNoHostPlugin: the host the VM runs on has no wanmotion host plugin
	// (or one without the throttle function).
	ErrNoHostPlugin = errors.New("wanmotion host plugin missing on the vm's host")
)

// Throttle implements engine.GuestThrottle through the wanmotion host
// plugin's "throttle" function on the host the VM runs on, which sets the
// domain's Xen scheduler cap with dom0's xl.
type Throttle struct {
	c   *xapi.Client
	log hclog.Logger
}

var (
	_ engine.GuestThrottle   = (*Throttle)(nil)
	_ engine.ThrottleChecker = (*Throttle)(nil)
	_ engine.ThrottleReader  = (*Throttle)(nil)
)

// NewThrottle returns the guest throttle of the pool c is logged in to (the
// source pool). A nil logger discards.
func NewThrottle(c *xapi.Client, logger hclog.Logger) *Throttle {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &Throttle{c: c, log: logger.Named("throttle")}
}

// guestDomain is where a VM's domain runs now.
type guestDomain struct {
	host  xapi.HostRef
	domid int64
	vcpus int64
	// paused: the domain exists but is paused (domain returns
	// ErrVMNotRunning with it; a release still applies).
	paused bool
}

func (t *Throttle) domain(ctx context.Context, vmUUID string) (guestDomain, error) {
	ref, err := t.c.VMGetByUUID(ctx, vmUUID)
	if err != nil {
		return guestDomain{}, fmt.Errorf("VM.get_by_uuid %s: %w", vmUUID, mapErr(err))
	}
	rec, err := t.c.VMGetRecord(ctx, ref)
	if err != nil {
		return guestDomain{}, fmt.Errorf("VM.get_record %s: %w", vmUUID, mapErr(err))
	}
	d := guestDomain{host: rec.ResidentOn, domid: rec.Domid}
	hasDomain := !xapi.IsNullRef(string(rec.ResidentOn)) && rec.Domid > 0
	d.vcpus = t.vcpus(ctx, vmUUID, rec, hasDomain)
	switch {
	case rec.PowerState == xapi.VMPowerStatePaused && hasDomain:
		d.paused = true
		return d, fmt.Errorf("vm %s: power state Paused, not Running: %w", vmUUID, ErrVMNotRunning)
	case rec.PowerState != xapi.VMPowerStateRunning:
		return d, fmt.Errorf("vm %s: power state %s, not Running: %w", vmUUID, rec.PowerState, ErrVMNotRunning)
	case !hasDomain:
		return d, fmt.Errorf("vm %s: Running but resident_on %q, domid %d: %w", vmUUID, rec.ResidentOn, rec.Domid, ErrVMNotRunning)
	}
	return d, nil
}

// vcpus is how many vCPUs the VM's domain has now: VM_metrics.VCPUs_number
// (the live count, which VM.set_VCPUs_number_live changes and which
// VM.VCPUs_at_startup, the count for the next boot, need not match while
// the VM runs) when the VM has a domain and metrics that say at least 1;
// otherwise VCPUs_at_startup, else VCPUs_max, at least 1. Missing or
// unreadable metrics only make it fall back.
func (t *Throttle) vcpus(ctx context.Context, vmUUID string, rec xapi.VMRecord, hasDomain bool) int64 {
	if hasDomain && !rec.Metrics.IsNull() {
		n, err := t.c.VMMetricsGetVCPUsNumber(ctx, rec.Metrics)
		switch {
		case err == nil && n >= 1:
			return n
		case err != nil:
			t.log.Debug("vm metrics unreadable; vcpu count from the vm record", "vm_uuid", vmUUID, "error", err.Error())
		}
	}
	n := rec.VCPUsAtStartup
	if n < 1 {
		n = rec.VCPUsMax
	}
	return max(n, 1)
}

// ThrottleCap is the cap that takes percent of the CPU time of vcpus
// vCPUs away: max(1, vcpus*(100-percent)), in percent of one CPU.
func ThrottleCap(vcpus int64, percent int) int64 {
	return max(1, vcpus*int64(100-percent))
}

// ThrottleGuest implements engine.GuestThrottle.
func (t *Throttle) ThrottleGuest(ctx context.Context, vmUUID string, percent int, prev *engine.ThrottleState) (engine.ThrottleState, error) {
	if percent < 0 || percent > 100 {
		return engine.ThrottleState{}, fmt.Errorf("throttle vm %s: percent %d outside 0..100: %w", vmUUID, percent, engine.ErrConfig)
	}
	d, err := t.domain(ctx, vmUUID)
	if err != nil {
		return engine.ThrottleState{}, err
	}
	capPct := ThrottleCap(d.vcpus, percent)
	if capPct > hostplugin.MaxCap {
		return engine.ThrottleState{}, fmt.Errorf("throttle vm %s: %d vCPUs need cap %d, above the %d the host plugin accepts: %w",
			vmUUID, d.vcpus, capPct, hostplugin.MaxCap, engine.ErrConfig)
	}
	same := prev != nil && prev.Host == string(d.host) && prev.Domid == d.domid
	if prev != nil && !same {
		t.log.Info("vm runs as another domain since its last throttle; the old cap went with the old domain",
			"vm_uuid", vmUUID, "old_host", prev.Host, "old_domid", prev.Domid, "host", string(d.host), "domid", d.domid)
	}
	expect := int64(-1)
	if same {
		expect = prev.Cap // the cap wanmotion read or set last
	}
	res, err := t.call(ctx, d, capPct, expect)
	if err != nil {
		return engine.ThrottleState{}, fmt.Errorf("throttle vm %s (domain %d) to %d%%: %w", vmUUID, d.domid, percent, err)
	}
	st := engine.ThrottleState{Host: string(d.host), Domid: d.domid, VCPUs: d.vcpus, Scheduler: res.Scheduler,
		PrevCap: res.PreviousCap, Percent: percent, Cap: res.Cap}
	if same {
		st.PrevCap = prev.PrevCap
	}
	t.log.Info("guest throttled", "vm_uuid", vmUUID, "host", st.Host, "domid", st.Domid, "vcpus", st.VCPUs,
		"percent", percent, "cap", st.Cap, "prev_cap", st.PrevCap, "scheduler", st.Scheduler)
	return st, nil
}

// CheckThrottle implements engine.ThrottleChecker: the VM runs, and the
// host plugin on its host reads its domain's cap (plugin and xl present,
// a scheduler with a cap), setting nothing.
func (t *Throttle) CheckThrottle(ctx context.Context, vmUUID string) error {
	d, err := t.domain(ctx, vmUUID)
	if err != nil {
		return err
	}
	args := map[string]string{hostplugin.ArgDomid: strconv.FormatInt(d.domid, 10), hostplugin.ArgCheck: "true"}
	res, err := t.callArgs(ctx, d, args)
	if err != nil {
		return fmt.Errorf("vm %s (domain %d): %w", vmUUID, d.domid, err)
	}
	if res.Domid != d.domid {
		return fmt.Errorf("vm %s: host plugin throttle check answered for domain %d, not %d", vmUUID, res.Domid, d.domid)
	}
	if c := ThrottleCap(d.vcpus, engine.DefaultThrottleInitial); c > hostplugin.MaxCap {
		return fmt.Errorf("vm %s: its %d vCPUs need caps up to %d, above the %d the host plugin accepts: %w", vmUUID, d.vcpus, c, hostplugin.MaxCap, engine.ErrConfig)
	}
	t.log.Debug("guest throttle possible", "vm_uuid", vmUUID, "host", string(d.host), "domid", d.domid, "scheduler", res.Scheduler, "cap", res.Cap)
	return nil
}

// ReadThrottle implements engine.ThrottleReader: the VM's domain and its
// cap now (as PrevCap, Percent 0), set nothing.
func (t *Throttle) ReadThrottle(ctx context.Context, vmUUID string) (engine.ThrottleState, error) {
	d, err := t.domain(ctx, vmUUID)
	if err != nil {
		return engine.ThrottleState{}, err
	}
	args := map[string]string{hostplugin.ArgDomid: strconv.FormatInt(d.domid, 10), hostplugin.ArgCheck: "true"}
	res, err := t.callArgs(ctx, d, args)
	if err != nil {
		return engine.ThrottleState{}, fmt.Errorf("read the cap of vm %s (domain %d): %w", vmUUID, d.domid, err)
	}
	if res.Domid != d.domid {
		return engine.ThrottleState{}, fmt.Errorf("vm %s: host plugin answered for domain %d, not %d", vmUUID, res.Domid, d.domid)
	}
	return engine.ThrottleState{Host: string(d.host), Domid: d.domid, VCPUs: d.vcpus, Scheduler: res.Scheduler,
		PrevCap: res.Cap, Cap: res.Cap}, nil
}

// ReleaseThrottle implements engine.GuestThrottle. A paused domain keeps
// its cap, so it is released too.
func (t *Throttle) ReleaseThrottle(ctx context.Context, vmUUID string, st engine.ThrottleState) error {
	d, err := t.domain(ctx, vmUUID)
	if d.paused {
		err = nil
	}
	switch {
	case errors.Is(err, engine.ErrNotFound), errors.Is(err, ErrVMNotRunning):
		t.log.Info("guest throttle needs no release: the throttled domain is gone", "vm_uuid", vmUUID, "domid", st.Domid, "reason", err.Error())
		return nil
	case err != nil:
		return fmt.Errorf("release throttle of vm %s: %w", vmUUID, err)
	case string(d.host) != st.Host || d.domid != st.Domid:
		t.log.Info("guest throttle needs no release: the vm runs as another domain; the cap went with the old one",
			"vm_uuid", vmUUID, "old_host", st.Host, "old_domid", st.Domid, "host", string(d.host), "domid", d.domid)
		return nil
	}
	res, err := t.call(ctx, d, st.PrevCap, st.Cap)
	if errors.Is(err, errDomainGone) {
		// xl could not read the domain: trust that only if xapi agrees
		// it is no longer the throttled one
		now, derr := t.domain(ctx, vmUUID)
		if derr == nil && string(now.host) == st.Host && now.domid == st.Domid {
			return fmt.Errorf("release throttle of vm %s: xl on its host could not read domain %d although xapi says the vm runs as it (retry with resume, or run xl sched-%s -d %d -c %d in that host's dom0): %w",
				vmUUID, st.Domid, schedName(st.Scheduler), st.Domid, st.PrevCap, err)
		}
		t.log.Info("guest throttle needs no release: the domain went away", "vm_uuid", vmUUID, "domid", st.Domid)
		return nil
	}
	if err != nil {
		return fmt.Errorf("release throttle of vm %s (domain %d, cap back to %d): %w", vmUUID, d.domid, st.PrevCap, err)
	}
	t.log.Info("guest throttle released", "vm_uuid", vmUUID, "host", st.Host, "domid", st.Domid, "cap", res.Cap, "was", res.PreviousCap)
	return nil
}

// errDomainGone: the host plugin found no such domain.
var errDomainGone = errors.New("domain not on the host")

// call runs the host plugin's throttle function on d's host.
// expect (>= 0) is the cap the domain must have now: the plugin changes
// nothing otherwise (engine.ErrThrottleConflict), so wanmotion never
// overwrites a cap someone else set meanwhile.
func (t *Throttle) call(ctx context.Context, d guestDomain, capPct, expect int64) (hostplugin.ThrottleResult, error) {
	args := map[string]string{hostplugin.ArgDomid: strconv.FormatInt(d.domid, 10), hostplugin.ArgCap: strconv.FormatInt(capPct, 10)}
	if expect >= 0 && expect != capPct {
		args[hostplugin.ArgExpectCap] = strconv.FormatInt(expect, 10)
	}
	res, err := t.callArgs(ctx, d, args)
	if errors.Is(err, engine.ErrThrottleConflict) {
		// A replay after a crash finds the cap it set before: done.
		now, rerr := t.callArgs(ctx, d, map[string]string{hostplugin.ArgDomid: strconv.FormatInt(d.domid, 10), hostplugin.ArgCheck: "true"})
		if rerr == nil && now.Domid == d.domid && now.Cap == capPct {
			return hostplugin.ThrottleResult{Scheduler: now.Scheduler, Domid: d.domid, PreviousCap: capPct, Cap: capPct}, nil
		}
		return res, err
	}
	if err == nil && (res.Domid != d.domid || res.Cap != capPct) {
		return res, fmt.Errorf("host plugin throttle answered domain %d cap %d for domain %d cap %d", res.Domid, res.Cap, d.domid, capPct)
	}
	return res, err
}

func (t *Throttle) callArgs(ctx context.Context, d guestDomain, args map[string]string) (hostplugin.ThrottleResult, error) {
	out, err := t.c.HostCallPlugin(ctx, d.host, hostplugin.PluginName, hostplugin.FnThrottle, args)
	if err != nil {
		return hostplugin.ThrottleResult{}, t.pluginErr(ctx, d.host, err)
	}
	var res hostplugin.ThrottleResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		return res, fmt.Errorf("host plugin throttle answered %q: %w", out, err)
	}
	return res, nil
}

// pluginErr explains a failed host.call_plugin.
func (t *Throttle) pluginErr(ctx context.Context, host xapi.HostRef, err error) error {
	ae, ok := xapi.AsAPIError(err)
	if !ok {
		return err
	}
	switch ae.Code {
	case xapi.CodeXenAPIMissingPlugin:
		return fmt.Errorf("%w: host %s has no wanmotion host plugin, through which the throttle convergence policy sets the guest's CPU cap; install wanmotion on that host (the make dist tarball or make install, i.e. packaging/install.sh; docs/operator-guide.md) and check it with wanmotion doctor: %w",
			ErrNoHostPlugin, t.hostName(ctx, host), err)
	case hostplugin.CodeUnknownFunction:
		return fmt.Errorf("%w: the wanmotion host plugin on host %s is older and has no throttle function; upgrade wanmotion on that host (packaging/install.sh; docs/operator-guide.md): %w",
			ErrNoHostPlugin, t.hostName(ctx, host), err)
	case hostplugin.CodeNotFound:
		return fmt.Errorf("%w: host %s: %w", errDomainGone, t.hostName(ctx, host), err)
	case hostplugin.CodeCapChanged:
		return fmt.Errorf("%w: host %s: %w", engine.ErrThrottleConflict, t.hostName(ctx, host), err)
	}
	return fmt.Errorf("host %s: %w", t.hostName(ctx, host), err)
}

// hostName is "name_label (ref)" for messages, or the ref alone.
func (t *Throttle) hostName(ctx context.Context, host xapi.HostRef) string {
	rec, err := t.c.HostGetRecord(ctx, host)
	if err != nil || rec.NameLabel == "" {
		return string(host)
	}
	return fmt.Sprintf("%s (%s)", rec.NameLabel, host)
}

func schedName(s string) string {
	if s == "" {
		return hostplugin.SchedCredit
	}
	return s
}
