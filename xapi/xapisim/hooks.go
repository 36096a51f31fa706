package xapisim

// xenopsd VM hooks (xenapi-facts §3, xenops_hooks.ml): every entry of
// <etc>/xapi.d/<hook>/ runs in filename order with argv
// -vmuuid U -reason R [-vmdomid D]; exit 0 is success, 1 is logged and
// ignored, anything else aborts with XAPI_HOOK_FAILED.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
)

// xenopsd hook directories.
const (
	HookVMPreStart    = "vm-pre-start"
	HookVMPreShutdown = "vm-pre-shutdown"
	HookVMPostDestroy = "vm-post-destroy"
	HookVMPreReboot   = "vm-pre-reboot"
	HookVMPreSuspend  = "vm-pre-suspend"
	HookVMPreResume   = "vm-pre-resume"
	HookVMPostResume  = "vm-post-resume"
	HookVMPreMigrate  = "vm-pre-migrate"  // source host, reason "source", before memory is sent
	HookVMPostMigrate = "vm-post-migrate" // destination host, reason "destination", after the VM runs
)

// hookExitLogAndContinue is xenopsd's exitcode_log_and_continue.
const hookExitLogAndContinue = 1

// hookReasonFirst holds, per *Sim, whether hooks get "-reason R -vmuuid U"
// (the order xenopsd's design doc shows) instead of the code's
// "-vmuuid U -reason R".
var hookReasonFirst sync.Map

// SetHookReasonFirst makes the hook runner pass "-reason R -vmuuid U ..."
// (the order of xenopsd's doc/content/xenopsd/design/hooks.md) instead of
// xenopsd's actual "-vmuuid U -reason R ...", so tests can check that a
// hook parses its flags by name.
func (s *Sim) SetHookReasonFirst(on bool) { hookReasonFirst.Store(s, on) }

// RunHooks runs the xenopsd hook scripts of hook (e.g. HookVMPreMigrate)
// on host (a ref, name_label or uuid) for the VM vmUUID: every entry of
// HookDir(host, hook) in filename order, argv "-vmuuid U -reason R" plus
// "-vmdomid D" when domid is not "" (xenopsd passes it while the domain
// exists), environment PATH only. Exit 1 is logged and the next script
// runs; another exit code stops with XAPI_HOOK_FAILED
// ["<hook>/<script>", reason, stdout, code]. A script that cannot be run
// or dies of a signal gives INTERNAL_ERROR. A missing directory runs
// nothing. Call it without the pool lock: hooks may call the API.
func (s *Sim) RunHooks(ctx context.Context, host, hook, vmUUID, reason, domid string) error {
	return s.runHooks(ctx, host, hook, vmUUID, reason, domid)
}

func (s *Sim) runHooks(ctx context.Context, host, hook, vmUUID, reason, domid string) error {
	dir := s.HookDir(host, hook)
	if dir == "" {
		return Errorf(ErrHandleInvalid, "host", host)
	}
	entries, err := os.ReadDir(dir) // sorted by file name
	if err != nil {
		return nil
	}
	args := []string{"-vmuuid", vmUUID, "-reason", reason}
	if v, ok := hookReasonFirst.Load(s); ok && v.(bool) {
		args = []string{"-reason", reason, "-vmuuid", vmUUID}
	}
	if domid != "" {
		args = append(args, "-vmdomid", domid)
	}
	rctx, cancel := s.runContext(ctx)
	defer cancel()
	for _, e := range entries {
		name := hook + "/" + e.Name()
		s.log.Debug("executing hook", "hook", name, "vm", vmUUID, "reason", reason)
		res, err := runForked(rctx, filepath.Join(dir, e.Name()), args...)
		switch {
		case err != nil:
			return Errorf(ErrInternal, fmt.Sprintf("hook %s: %v", name, err))
		case res.signal != "":
			return Errorf(ErrInternal, fmt.Sprintf("hook %s killed by signal %s", name, res.signal))
		case res.exit == 0:
		case res.exit == hookExitLogAndContinue:
			s.log.Info("hook logged and continued", "hook", name, "vm", vmUUID, "output", res.stdout)
		default:
			return Errorf(ErrHookFailed, name, reason, res.stdout, strconv.Itoa(res.exit))
		}
	}
	return nil
}

// powerHookPlan says which hooks a VM power operation runs: pre hooks
// before the state changes (a failure aborts the operation), post hooks
// after (a failure only makes the call fail), as xenopsd orders them.
type powerHookPlan struct {
	pre  []hookStep
	post []hookStep
}

type hookStep struct {
	hook, reason string
	domid        bool // pass -vmdomid (the domain exists at that point)
}

var powerHookPlans = map[string]powerHookPlan{
	"start":    {pre: []hookStep{{HookVMPreStart, "none", false}}},
	"start_on": {pre: []hookStep{{HookVMPreStart, "none", false}}},
	"clean_shutdown": {pre: []hookStep{{HookVMPreShutdown, "clean-shutdown", true}},
		post: []hookStep{{HookVMPostDestroy, "clean-shutdown", false}}},
	"shutdown": {pre: []hookStep{{HookVMPreShutdown, "clean-shutdown", true}},
		post: []hookStep{{HookVMPostDestroy, "clean-shutdown", false}}},
	"hard_shutdown": {pre: []hookStep{{HookVMPreShutdown, "hard-shutdown", true}},
		post: []hookStep{{HookVMPostDestroy, "hard-shutdown", false}}},
	"clean_reboot": {pre: []hookStep{{HookVMPreShutdown, "clean-reboot", true}, {HookVMPostDestroy, "clean-reboot", false}, {HookVMPreReboot, "none", false}}},
	"hard_reboot":  {pre: []hookStep{{HookVMPreShutdown, "hard-reboot", true}, {HookVMPostDestroy, "hard-reboot", false}, {HookVMPreReboot, "none", false}}},
	"suspend": {pre: []hookStep{{HookVMPreSuspend, "suspend", true}, {HookVMPreShutdown, "suspend", true}},
		post: []hookStep{{HookVMPostDestroy, "suspend", false}}},
	"resume":    {pre: []hookStep{{HookVMPreResume, "none", false}}, post: []hookStep{{HookVMPostResume, "none", true}}},
	"resume_on": {pre: []hookStep{{HookVMPreResume, "none", false}}, post: []hookStep{{HookVMPostResume, "none", true}}},
}

// The power operations are wrapped with their hooks once the method table
// is complete: init functions run after every registrar (package variables
// first) and in file-name order, so after api_core.go's init that builds
// the table. Whatever registered VM.<op> (api_vm.go, guest_power.go) gets
// the hooks.
func init() { wrapPowerOpsWithHooks() }

func wrapPowerOpsWithHooks() {
	for op, plan := range powerHookPlans {
		m, ok := methods["VM."+op]
		if !ok {
			continue
		}
		inner, innerUnlocked := m.Handler, m.Unlocked
		m.Unlocked = true
		m.Handler = func(c *Call) (any, error) {
			// Where the hooks run and with which domid, read under the lock.
			c.Pool.mu.Lock()
			o, err := c.db().get("VM", c.Str(0))
			var uuid, host, domid string
			if err == nil {
				uuid = o.str("uuid")
				host = o.str("resident_on")
				if host == "" || host == NullRef {
					host = c.Pool.Coordinator().Ref
				}
				if (op == "start_on" || op == "resume_on") && len(c.Args) > 1 {
					host = c.Str(1)
				}
				if d := o.int("domid"); d >= 0 {
					domid = strconv.FormatInt(d, 10)
				}
			}
			// Hooks only run for real guests in a state the operation accepts.
			runs := err == nil && !o.bool("is_control_domain") && stateAllows(op, o.str("power_state"))
			c.Pool.mu.Unlock()
			if runs {
				for _, st := range plan.pre {
					if err := c.Sim.runHooks(c.Ctx, host, st.hook, uuid, st.reason, pick(st.domid, domid)); err != nil {
						return nil, err
					}
				}
			}
			if !innerUnlocked {
				c.Pool.mu.Lock()
			}
			v, err := inner(c)
			if !innerUnlocked {
				c.Pool.mu.Unlock()
			}
			if err == nil {
				c.Pool.mu.Lock()
				if o, gerr := c.db().get("VM", c.Str(0)); gerr == nil {
					if d := o.int("domid"); d >= 0 {
						domid = strconv.FormatInt(d, 10)
					}
				}
				c.Pool.mu.Unlock()
			}
			if err != nil || !runs {
				return v, err
			}
			for _, st := range plan.post {
				if err := c.Sim.runHooks(c.Ctx, host, st.hook, uuid, st.reason, pick(st.domid, domid)); err != nil {
					return nil, err
				}
			}
			return v, nil
		}
	}
}

func pick(want bool, domid string) string {
	if want {
		return domid
	}
	return ""
}

// stateAllows reports whether op is allowed from power state ps.
func stateAllows(op, ps string) bool {
	rule, ok := powerOps[op]
	if !ok {
		return false
	}
	for _, s := range rule.from {
		if s == ps {
			return true
		}
	}
	return false
}
