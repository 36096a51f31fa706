package main

// The plugin function "throttle": sets a guest domain's Xen scheduler cap
// with dom0's xl (<root>/usr/sbin/xl next to the plugin's etc) for the
// throttle convergence policy (engine/xapiadapt.Throttle calls it).

import (
	"context"
	"errors"
	"fmt"
	"os/exec"

	"github.com/wanmotion/wanmotion/hostplugin"
)

func (p *pluginCall) throttle(ctx context.Context) (string, error) {
	a, err := hostplugin.ParseThrottleArgs(p.call.Args)
	if err != nil {
		return "", perr(hostplugin.CodeInvalidArgument, err)
	}
	xl := hostplugin.XL{Path: hostplugin.XLPathForEtc(p.env.EtcDir)}
	res, err := hostplugin.Throttle(ctx, xl, a)
	if err != nil {
		return "", throttleError(xl.Path, a, err)
	}
	if a.Check {
		p.log.Debug("guest cap read", "domid", a.Domid, "cap", res.Cap, "scheduler", res.Scheduler)
	} else {
		p.log.Info("guest cap set", "domid", a.Domid, "cap", res.Cap, "previous_cap", res.PreviousCap, "scheduler", res.Scheduler)
	}
	return jsonString(res)
}

// throttleError gives a throttle failure its API error code.
func throttleError(xlPath string, a hostplugin.ThrottleArgs, err error) error {
	var xe *hostplugin.XLError
	var ee *exec.ExitError
	switch {
	case errors.Is(err, hostplugin.ErrCapChanged):
		return perr(hostplugin.CodeCapChanged, err)
	case errors.Is(err, hostplugin.ErrSchedulerUnsupported):
		return perr(hostplugin.CodeUnavailable, err)
	case errors.As(err, &xe) && !errors.As(err, &ee):
		// xl did not start (absent, not executable)
		return perr(hostplugin.CodeUnavailable, fmt.Errorf("dom0's xl (%s): %w", xlPath, err))
	case errors.As(err, &xe) && len(xe.Args) == 3:
		// xl sched-credit[2] -d D failed: no such domain on this host
		return perr(hostplugin.CodeNotFound, fmt.Errorf("domain %d on this host: %w", a.Domid, err), fmt.Sprint(a.Domid))
	}
	return perr(hostplugin.CodeInternal, fmt.Errorf("domain %d: %w", a.Domid, err))
}
