// Command wanmotion is the one user-facing binary of wanmotion: the CLI, the
// xapi host-plugin entry, the hook entry, the site agent and the simulator.
//
// Each subcommand lives in its own file (sim.go, plugins.go, migrate.go, ...)
// and is listed in the commands table below.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"syscall"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "0.1.0-dev"

type command struct {
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() map[string]command {
	return map[string]command{
		"agent":     {"run a site agent (started by the engine)", runAgent},
		"demo":      {"run the end-to-end demo on two simulated pools", runDemo},
		"hook":      {"entry point for xapi's vm-pre-migrate/vm-post-migrate hooks", runHook},
		"migrate":   {"live-migrate a VM to another pool over the WAN", runMigrate},
		"plugins":   {"list or check installed backends", runPlugins},
		"pool":      {"show or configure a pool's wanmotion settings", runPool},
		"sim":       {"run the xapi simulator (two pools, a running demo VM)", runSim},
		"version":   {"print the version", runVersion},
		"xencenter": {"XenCenter menu item: start a WAN migration of the selected VM", runXencenter},
		"doctor":    {"check this host's wanmotion installation", runDoctor},
	}
}

// errUsage marks an error caused by bad command-line input (exit code 2).
var errUsage = errors.New("usage")

func main() {
	os.Exit(realMain(os.Args[1:], os.Stdout, os.Stderr))
}

func realMain(args []string, stdout, stderr io.Writer) int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	// xapi runs the binary as /etc/xapi.d/plugins/wanmotion with one
	// methodCall argument (hostplugin.go); that is not a subcommand.
	if code, ok := hostPluginEntry(ctx, args, stdout, stderr); ok {
		return code
	}

	cmds := commands()
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr, cmds)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	c, ok := cmds[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "wanmotion: unknown command %q\n\n", args[0])
		usage(stderr, cmds)
		return 2
	}
	if err := c.run(ctx, args[1:], stdout, stderr); err != nil {
		fmt.Fprintf(stderr, "wanmotion %s: %v\n", args[0], err)
		var ec interface{ ExitCode() int }
		if errors.As(err, &ec) {
			return ec.ExitCode()
		}
		if errors.Is(err, errUsage) {
			return 2
		}
		return 1
	}
	return 0
}

func usage(w io.Writer, cmds map[string]command) {
	fmt.Fprintln(w, "wanmotion — WAN live migration for XenServer / XCP-ng pools")
	fmt.Fprintln(w, "\nUsage: wanmotion <command> [flags]\n\nCommands:")
	names := make([]string, 0, len(cmds))
	for n := range cmds {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, cmds[n].summary)
	}
	fmt.Fprintln(w, "\nRun 'wanmotion <command> -h' for a command's flags.")
}

func runVersion(_ context.Context, _ []string, stdout, _ io.Writer) error {
	fmt.Fprintf(stdout, "wanmotion %s\n", version)
	return nil
}
