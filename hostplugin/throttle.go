package hostplugin

// The dom0 side of the guest throttle (convergence_policy throttle): the
// Xen scheduler cap of a domain, read and set with xl. cap is in percent of
// one physical CPU; 0 means no cap. Only the credit and credit2 schedulers
// have one (xl sched-credit / sched-credit2 -d D -c CAP).

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// Xen schedulers with a cap.
const (
	SchedCredit  = "credit"
	SchedCredit2 = "credit2"
)

// MaxCap is the largest cap the plugin accepts (64 full CPUs).
const MaxCap = 6400

// DomidMax is the largest guest domid (DOMID_FIRST_RESERVED - 1).
const DomidMax = 0x7FEF

// ErrSchedulerUnsupported: the host's Xen scheduler has no cap wanmotion
// can set (rtds, arinc653, null...). errors.As gives *SchedulerError.
var ErrSchedulerUnsupported = errors.New("xen scheduler has no cap")

// SchedulerError names the scheduler that has no cap.
type SchedulerError struct{ Scheduler string }

func (e *SchedulerError) Error() string {
	return fmt.Sprintf("xen scheduler %q: setting a vCPU cap is not supported (the throttle needs credit or credit2)", e.Scheduler)
}

// Is makes errors.Is(err, ErrSchedulerUnsupported) true.
func (e *SchedulerError) Is(target error) bool { return target == ErrSchedulerUnsupported }

// ErrXLOutput: xl printed something the parser does not understand.
var ErrXLOutput = errors.New("unexpected xl output")

// ErrCapNotApplied: xl set the cap without error but reading it back gave
// another value.
var ErrCapNotApplied = errors.New("cap not applied")

// XLError is a failed xl run: its arguments, trimmed stderr and the exec
// error (an *exec.ExitError when xl exited non-zero).
type XLError struct {
	Args   []string
	Stderr string
	Err    error
}

func (e *XLError) Error() string {
	s := "xl " + strings.Join(e.Args, " ") + ": " + e.Err.Error()
	if e.Stderr != "" {
		s += ": " + e.Stderr
	}
	return s
}

func (e *XLError) Unwrap() error { return e.Err }

// XL runs dom0's xl.
type XL struct {
	// Path is the xl binary (XLPathForEtc; "/usr/sbin/xl" on a host).
	Path string
	// Run runs name with args and returns its output; nil runs it with
	// os/exec. err is non-nil when it could not start or exited non-zero.
	Run func(ctx context.Context, name string, args ...string) (stdout, stderr string, err error)
	// Sched is the scheduler Cap and SetCap use (SchedCredit or
	// SchedCredit2); empty: they ask xl info each time (see Scheduler).
	Sched string
}

// XLPathForEtc returns xl's path for a host whose /etc is etcDir: the
// sibling <root>/usr/sbin/xl ("/etc" → "/usr/sbin/xl"; the simulator's
// per-host root holds its xl stand-in there).
func XLPathForEtc(etcDir string) string {
	return filepath.Join(filepath.Dir(etcDir), "usr", "sbin", "xl")
}

func execRun(ctx context.Context, name string, args ...string) (string, string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	return out.String(), errOut.String(), err
}

func (x XL) run(ctx context.Context, args ...string) (string, error) {
	run := x.Run
	if run == nil {
		run = execRun
	}
	path := x.Path
	if path == "" {
		path = "/usr/sbin/xl"
	}
	out, stderr, err := run(ctx, path, args...)
	if err != nil {
		return out, &XLError{Args: args, Stderr: strings.TrimSpace(stderr), Err: err}
	}
	return out, nil
}

// Scheduler returns the host's Xen scheduler (xl info's xen_scheduler):
// credit or credit2; any other wraps ErrSchedulerUnsupported.
func (x XL) Scheduler(ctx context.Context) (string, error) {
	out, err := x.run(ctx, "info")
	if err != nil {
		return "", fmt.Errorf("xen scheduler: %w", err)
	}
	s, err := ParseXLInfoScheduler(out)
	if err != nil {
		return "", fmt.Errorf("xen scheduler: %w", err)
	}
	if s != SchedCredit && s != SchedCredit2 {
		return s, &SchedulerError{Scheduler: s}
	}
	return s, nil
}

// withSched returns x with Sched set (from xl info when empty).
func (x XL) withSched(ctx context.Context) (XL, error) {
	if x.Sched == "" {
		s, err := x.Scheduler(ctx)
		if err != nil {
			return x, err
		}
		x.Sched = s
	}
	return x, nil
}

func schedCmd(scheduler string) (string, error) {
	switch scheduler {
	case SchedCredit:
		return "sched-credit", nil
	case SchedCredit2:
		return "sched-credit2", nil
	}
	return "", &SchedulerError{Scheduler: scheduler}
}

// Cap returns domain domid's cap (xl sched-credit[2] -d D).
func (x XL) Cap(ctx context.Context, domid int64) (int64, error) {
	x, err := x.withSched(ctx)
	if err != nil {
		return 0, err
	}
	sub, err := schedCmd(x.Sched)
	if err != nil {
		return 0, err
	}
	d := strconv.FormatInt(domid, 10)
	out, err := x.run(ctx, sub, "-d", d)
	if err != nil {
		return 0, fmt.Errorf("cap of domain %d: %w", domid, err)
	}
	row, err := ParseSchedCredit(out, domid)
	if err != nil {
		return 0, fmt.Errorf("cap of domain %d: %w", domid, err)
	}
	return row.Cap, nil
}

// SetCap sets domain domid's cap (weight untouched), then reads it back:
// a different value wraps ErrCapNotApplied. dom0 (domid 0) is refused.
func (x XL) SetCap(ctx context.Context, domid, capPct int64) error {
	x, err := x.withSched(ctx)
	if err != nil {
		return err
	}
	sub, err := schedCmd(x.Sched)
	if err != nil {
		return err
	}
	if domid <= 0 {
		return fmt.Errorf("set cap of domain %d: only guest domains (domid > 0): %w", domid, ErrInvalidArgument)
	}
	if capPct < 0 || capPct > MaxCap {
		return fmt.Errorf("set cap of domain %d: cap %d outside 0..%d: %w", domid, capPct, MaxCap, ErrInvalidArgument)
	}
	d, c := strconv.FormatInt(domid, 10), strconv.FormatInt(capPct, 10)
	if _, err := x.run(ctx, sub, "-d", d, "-c", c); err != nil {
		return fmt.Errorf("set cap of domain %d to %d: %w", domid, capPct, err)
	}
	got, err := x.Cap(ctx, domid)
	if err != nil {
		return fmt.Errorf("set cap of domain %d to %d: read back: %w", domid, capPct, err)
	}
	if got != capPct {
		return fmt.Errorf("set cap of domain %d to %d: xl reports %d: %w", domid, capPct, got, ErrCapNotApplied)
	}
	return nil
}

// ParseXLInfoScheduler returns the value of xl info's xen_scheduler line
// ("xen_scheduler          : credit").
func ParseXLInfoScheduler(out string) (string, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || strings.TrimSpace(k) != "xen_scheduler" {
			continue
		}
		v = strings.TrimSpace(v)
		if v == "" || strings.ContainsAny(v, " \t") {
			return "", fmt.Errorf("xl info: xen_scheduler %q: %w", v, ErrXLOutput)
		}
		return v, nil
	}
	if err := sc.Err(); err != nil {
		return "", fmt.Errorf("xl info: %w: %w", ErrXLOutput, err)
	}
	return "", fmt.Errorf("xl info: no xen_scheduler line: %w", ErrXLOutput)
}

// SchedRow is one domain's row of xl sched-credit / sched-credit2.
type SchedRow struct {
	Name   string
	ID     int64
	Weight int64
	Cap    int64
}

// ParseSchedCredit finds domid's row in the output of
// `xl sched-credit[2] -d D`: a header "Name ID Weight Cap" then rows whose
// last three fields are ID, Weight and Cap (a name may contain spaces).
// Lines that are not such a row (the header, cpupool lines) are skipped.
func ParseSchedCredit(out string, domid int64) (SchedRow, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	sc.Buffer(make([]byte, 0, 4096), 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 4 {
			continue
		}
		n := len(f)
		id, err1 := strconv.ParseInt(f[n-3], 10, 64)
		w, err2 := strconv.ParseInt(f[n-2], 10, 64)
		c, err3 := strconv.ParseInt(f[n-1], 10, 64)
		if err1 != nil || err2 != nil || err3 != nil || id != domid {
			continue
		}
		if c < 0 || w < 0 {
			return SchedRow{}, fmt.Errorf("xl sched-credit: domain %d: weight %d cap %d: %w", domid, w, c, ErrXLOutput)
		}
		return SchedRow{Name: strings.Join(f[:n-3], " "), ID: id, Weight: w, Cap: c}, nil
	}
	if err := sc.Err(); err != nil {
		return SchedRow{}, fmt.Errorf("xl sched-credit: %w: %w", ErrXLOutput, err)
	}
	return SchedRow{}, fmt.Errorf("xl sched-credit: no row for domain %d: %w", domid, ErrXLOutput)
}

// The plugin function that sets a guest's cap:
// host.call_plugin(VM.resident_on, "wanmotion", "throttle",
// {"domid": D, "cap": C [, "expect_cap": E]}) → ThrottleResult as JSON.
const FnThrottle = "throttle"

// Arguments of throttle.
const (
	ArgDomid = "domid"
	ArgCap   = "cap"
	// ArgExpectCap (optional): set only when the domain's cap is this
	// value now (ErrCapChanged otherwise), so a release does not undo a
	// cap an administrator set meanwhile.
	ArgExpectCap = "expect_cap"
	// ArgCheck "true": read the scheduler and the domain's cap, set
	// nothing (cap and expect_cap must be absent); the result's cap is
	// the current one.
	ArgCheck = "check"
)

// CodeCapChanged is the plugin's error code for ErrCapChanged.
const CodeCapChanged = "WANMOTION_CAP_CHANGED"

// ErrCapChanged: the domain's cap is not the expect_cap given.
var ErrCapChanged = errors.New("cap changed")

// ThrottleArgs are throttle's checked arguments.
type ThrottleArgs struct {
	Domid     int64
	Cap       int64
	ExpectCap *int64
	Check     bool // read only
}

// ThrottleResult is throttle's result (JSON).
type ThrottleResult struct {
	Scheduler   string `json:"scheduler"`
	Domid       int64  `json:"domid"`
	PreviousCap int64  `json:"previous_cap"`
	Cap         int64  `json:"cap"`
}

// ParseThrottleArgs checks throttle's arguments: domid an integer > 0
// (dom0 is never touched), cap and expect_cap integers in 0..MaxCap.
// Errors wrap ErrInvalidArgument.
func ParseThrottleArgs(args map[string]string) (ThrottleArgs, error) {
	var a ThrottleArgs
	for k := range args {
		if k != ArgDomid && k != ArgCap && k != ArgExpectCap && k != ArgCheck {
			return a, fmt.Errorf("%w: unknown argument %q for %s (arguments: %s, %s, %s, %s)", ErrInvalidArgument, k, FnThrottle, ArgCap, ArgCheck, ArgDomid, ArgExpectCap)
		}
	}
	num := func(name string, lo, hi int64) (int64, error) {
		v, ok := args[name]
		if !ok {
			return 0, fmt.Errorf("%w: %s is required", ErrInvalidArgument, name)
		}
		n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%w: %s %q: not an integer", ErrInvalidArgument, name, v)
		}
		if n < lo || n > hi {
			return 0, fmt.Errorf("%w: %s %d: want %d..%d", ErrInvalidArgument, name, n, lo, hi)
		}
		return n, nil
	}
	var err error
	if a.Domid, err = num(ArgDomid, 0, DomidMax); err != nil {
		return a, err
	}
	if a.Domid == 0 {
		return a, fmt.Errorf("%w: %s 0 is dom0, which wanmotion never throttles", ErrInvalidArgument, ArgDomid)
	}
	switch v, ok := args[ArgCheck]; {
	case !ok || v == "false":
	case v == "true":
		_, hasCap := args[ArgCap]
		_, hasExpect := args[ArgExpectCap]
		if hasCap || hasExpect {
			return a, fmt.Errorf("%w: %s true sets nothing: give no %s or %s", ErrInvalidArgument, ArgCheck, ArgCap, ArgExpectCap)
		}
		a.Check = true
		return a, nil
	default:
		return a, fmt.Errorf("%w: %s %q: want true or false", ErrInvalidArgument, ArgCheck, v)
	}
	if a.Cap, err = num(ArgCap, 0, MaxCap); err != nil {
		return a, err
	}
	if _, ok := args[ArgExpectCap]; ok {
		e, err := num(ArgExpectCap, 0, MaxCap)
		if err != nil {
			return a, err
		}
		a.ExpectCap = &e
	}
	return a, nil
}

// Throttle sets a.Cap on domain a.Domid with x and returns the cap it had
// before (with a.Check it only reads it: the result's Cap is the current
// one). x.Sched, when empty, is read from xl info.
func Throttle(ctx context.Context, x XL, a ThrottleArgs) (ThrottleResult, error) {
	x, err := x.withSched(ctx)
	if err != nil {
		return ThrottleResult{}, err
	}
	res := ThrottleResult{Scheduler: x.Sched, Domid: a.Domid, Cap: a.Cap}
	if res.PreviousCap, err = x.Cap(ctx, a.Domid); err != nil {
		return res, err
	}
	if a.Check {
		res.Cap = res.PreviousCap
		return res, nil
	}
	if a.ExpectCap != nil && *a.ExpectCap != res.PreviousCap {
		return res, fmt.Errorf("domain %d has cap %d, not the expected %d (set by someone else?): %w", a.Domid, res.PreviousCap, *a.ExpectCap, ErrCapChanged)
	}
	if res.PreviousCap == a.Cap {
		return res, nil
	}
	if err := x.SetCap(ctx, a.Domid, a.Cap); err != nil {
		return res, err
	}
	return res, nil
}
