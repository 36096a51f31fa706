package main

// `wanmotion doctor`: checks this host's installation (binary, host
// plugin, hooks, configuration, backends, state directory, xapi) and says
// what is missing and what to do about it.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/xapi"
)

// Install layout (packaging/install.sh).
const (
	installBinary  = "/usr/lib/wanmotion/wanmotion"
	hookScriptName = "50wanmotion"
)

// doctorCheck is one line of the report.
type doctorCheck struct {
	Name   string `json:"name"`
	Status string `json:"status"` // ok, warn, fail
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

type doctorReport struct {
	Version string        `json:"version"`
	OK      bool          `json:"ok"`
	Checks  []doctorCheck `json:"checks"`
}

func (r *doctorReport) add(name, status, detail, fix string) {
	r.Checks = append(r.Checks, doctorCheck{Name: name, Status: status, Detail: detail, Fix: fix})
	if status == "fail" {
		r.OK = false
	}
}

// errDoctor: at least one check failed (exit 1).
var errDoctor = errors.New("problems found")

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("doctor", flag.ContinueOnError)
	fs.SetOutput(stderr)
	root := fs.String("root", "/", "install root to check (a DESTDIR)")
	etc := fs.String("etc", "", "the host's etc (default <root>/etc)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *etc == "" {
		*etc = filepath.Join(*root, "etc")
	}
	rep := doctor(ctx, *root, *etc)
	if *asJSON {
		if err := writeJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		for _, c := range rep.Checks {
			fmt.Fprintf(stdout, "%-4s  %-22s %s\n", c.Status, c.Name, c.Detail)
			if c.Fix != "" {
				fmt.Fprintf(stdout, "      %-22s fix: %s\n", "", c.Fix)
			}
		}
	}
	if !rep.OK {
		return errDoctor
	}
	return nil
}

func executable(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", p)
	}
	return nil
}

// rooted resolves a symlink whose absolute target is meant inside root
// (an install tree under a DESTDIR).
func rooted(root, p string) string {
	t, err := os.Readlink(p)
	if err != nil || root == "/" || !filepath.IsAbs(t) || strings.HasPrefix(t, root) {
		return p
	}
	return filepath.Join(root, t)
}

func doctor(ctx context.Context, root, etc string) doctorReport {
	rep := doctorReport{Version: version, OK: true}
	self, _ := os.Executable()
	rep.add("wanmotion", "ok", fmt.Sprintf("version %s (%s)", version, self), "")

	bin := filepath.Join(root, installBinary)
	if err := executable(bin); err != nil {
		rep.add("binary", "fail", err.Error(), "install wanmotion: make install, or unpack the release tarball into /")
	} else {
		rep.add("binary", "ok", bin, "")
	}

	plugin := filepath.Join(etc, "xapi.d", "plugins", hostplugin.PluginName)
	switch err := executable(rooted(root, plugin)); {
	case err != nil:
		rep.add("host plugin", "fail", err.Error(), fmt.Sprintf("ln -s %s %s", installBinary, plugin))
	default:
		detail := plugin
		if t, err := os.Readlink(plugin); err == nil {
			detail += " -> " + t
		}
		rep.add("host plugin", "ok", detail, "")
	}

	for _, h := range []string{hookPreMigrate, hookPostMigrate} {
		p := filepath.Join(etc, "xapi.d", h, hookScriptName)
		if err := executable(p); err != nil {
			rep.add("hook "+h, "warn", err.Error()+" (network continuity for migrations xapi runs itself is off)",
				"install the hook from packaging/hook.sh.in (make install does)")
			continue
		}
		b, _ := os.ReadFile(p)
		if !strings.Contains(string(b), "hook "+h) {
			rep.add("hook "+h, "warn", p+" does not call `wanmotion hook "+h+"`", "reinstall it from packaging/hook.sh.in")
			continue
		}
		rep.add("hook "+h, "ok", p, "")
	}

	cfg, err := hostplugin.LoadConfig(hostplugin.ConfigCandidates(etc, bin))
	switch {
	case err != nil:
		rep.add("config", "fail", err.Error(), "fix the file (see packaging/wanmotion.conf)")
	case cfg.Path == "":
		rep.add("config", "warn", "no "+filepath.Join(etc, "wanmotion", hostplugin.ConfigFileName)+"; using defaults",
			"install the default configuration (make install does)")
	default:
		rep.add("config", "ok", cfg.Path, "")
	}

	pluginDir := cfg.PluginDir
	if root != "/" && strings.HasPrefix(pluginDir, "/") && !strings.HasPrefix(pluginDir, root) {
		pluginDir = filepath.Join(root, pluginDir)
	}
	bins, err := host.Discover([]string{pluginDir})
	var storage, network []string
	for _, b := range bins {
		if b.Kind == contract.KindStorage {
			storage = append(storage, b.Name)
		} else {
			network = append(network, b.Name)
		}
	}
	switch {
	case err != nil:
		rep.add("backends", "fail", err.Error(), "check "+pluginDir)
	case len(storage) == 0:
		rep.add("backends", "fail", "no storage backend in "+pluginDir, "install wanmotion-storage-* binaries into "+pluginDir)
	default:
		rep.add("backends", "ok", fmt.Sprintf("storage: %s; network: %s (%s)", strings.Join(storage, ", "),
			strings.Join(append([]string{"none"}, network...), ", "), pluginDir), "")
	}

	xlPath := hostplugin.XLPathForEtc(etc) // etc is under root already
	if err := executable(xlPath); err != nil {
		rep.add("xl", "warn", err.Error()+" (convergence_policy throttle cannot slow guests on this host)",
			"run doctor in dom0 of a XenServer / XCP-ng host, or use convergence_policy keep-going or stop")
	} else if sched, err := (hostplugin.XL{Path: xlPath}).Scheduler(ctx); err != nil {
		rep.add("xl", "warn", err.Error()+" (convergence_policy throttle cannot slow guests on this host)",
			"use the credit or credit2 scheduler, or convergence_policy keep-going or stop")
	} else {
		rep.add("xl", "ok", fmt.Sprintf("%s, scheduler %s (guest throttle available)", xlPath, sched), "")
	}

	stateDir := cfg.StateDir
	if root != "/" && !strings.HasPrefix(stateDir, root) {
		stateDir = filepath.Join(root, stateDir)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		rep.add("state dir", "fail", err.Error(), "create "+stateDir+" (root, mode 0700) or set state_dir")
	} else {
		rep.add("state dir", "ok", stateDir, "")
	}

	env, err := hostplugin.Discover(plugin)
	if err != nil {
		rep.add("xapi", "fail", err.Error(), "check "+filepath.Join(etc, "xensource-inventory"))
		return rep
	}
	var c *xapi.Client
	where := env.Socket
	if env.Sim {
		where = env.PoolURL
		c, err = xapi.New(xapi.Config{URL: env.PoolURL, DisableMemberDiscovery: true})
	} else {
		c, err = xapi.NewLocal(env.Socket, xapi.Config{})
	}
	if err == nil {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		_, err = c.ListMethods(cctx)
		cancel()
		_ = c.Close(context.Background())
	}
	if err != nil {
		rep.add("xapi", "fail", fmt.Sprintf("%s: %v", where, err), "run doctor in dom0 of a XenServer/XCP-ng host with xapi running")
	} else {
		detail := where
		if env.Sim {
			detail += " (simulator)"
		}
		rep.add("xapi", "ok", detail, "")
	}
	return rep
}
