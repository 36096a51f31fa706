package l2tunnel

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Selection chooses tunnels for RemoveTunnels: those of one migration
// (MigrationID, optionally one Role), or every kept tunnel (AllKept).
type Selection struct {
	MigrationID string
	Role        contract.Role // "": both roles
	AllKept     bool
}

func (s Selection) validate() error {
	switch {
	case s.MigrationID == "" && !s.AllKept:
		return invalid("select tunnels with a migration id or all kept ones")
	case s.MigrationID != "" && s.AllKept:
		return invalid("select tunnels with a migration id or all kept ones, not both")
	case s.Role != "" && s.Role != contract.RoleSource && s.Role != contract.RoleDestination:
		return invalid("role %q: want source or destination", s.Role)
	case s.Role != "" && s.AllKept:
		return invalid("a role only goes with a migration id")
	}
	return nil
}

// matches: a tunnel of the migration is one named after it (IfPrefix)
// whose marker names no other migration, or one whose marker names it.
func (s Selection) matches(f FoundTunnel) bool {
	if s.AllKept {
		return f.Marked && f.Marker.Kept
	}
	for _, r := range []contract.Role{contract.RoleSource, contract.RoleDestination} {
		if s.Role != "" && s.Role != r {
			continue
		}
		if f.Marked && f.Marker.MigrationID == s.MigrationID && f.Marker.Role == r {
			return true
		}
		named := strings.HasPrefix(f.Name, IfPrefix(s.MigrationID, r))
		if named && (!f.Marked || f.Marker.MigrationID == "" || f.Marker.MigrationID == s.MigrationID) {
			return true
		}
	}
	return false
}

// adminPlane opens the data plane of cfg for the admin commands.
func adminPlane(cfg Config) (dataplane, error) {
	if cfg.Mode == ModeTAP {
		return nil, invalid("tap mode tunnels vanish with their process; there is nothing to list or remove")
	}
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	return newPlane(cfg)
}

// ListTunnels returns the tunnels of this backend on the host (or in
// cfg.Netns) in cfg.Mode (kernel or ovs), kept or not, sorted by name.
func ListTunnels(ctx context.Context, cfg Config) ([]FoundTunnel, error) {
	dp, err := adminPlane(cfg)
	if err != nil {
		return nil, err
	}
	defer dp.close()
	found, err := dp.list(ctx)
	sort.Slice(found, func(i, j int) bool { return found[i].Name < found[j].Name })
	return found, err
}

// RemoveTunnels deletes the tunnels sel chooses (with dryRun, only finds
// them) and returns them. Nothing matching is not an error: it is
// idempotent.
func RemoveTunnels(ctx context.Context, cfg Config, sel Selection, dryRun bool) ([]FoundTunnel, error) {
	if err := sel.validate(); err != nil {
		return nil, err
	}
	dp, err := adminPlane(cfg)
	if err != nil {
		return nil, err
	}
	defer dp.close()
	found, err := dp.list(ctx)
	if err != nil {
		return nil, err
	}
	sort.Slice(found, func(i, j int) bool { return found[i].Name < found[j].Name })
	var out []FoundTunnel
	var errs []error
	for _, f := range found {
		if !sel.matches(f) {
			continue
		}
		if !dryRun {
			if err := dp.removeName(ctx, f.Name); err != nil {
				errs = append(errs, err)
				continue
			}
		}
		out = append(out, f)
	}
	return out, errors.Join(errs...)
}

const cliUsage = `usage: wanmotion-network-l2tunnel list   [options]
       wanmotion-network-l2tunnel remove --migration ID [--role source|destination] [--dry-run] [options]
       wanmotion-network-l2tunnel remove --all-kept [--dry-run] [options]

Lists or removes the tunnels of the l2tunnel network strategy on this host
(run it in dom0 on each site). Tunnels kept after a migration
(keep_after_migration) stay until removed here. Without arguments the
binary serves the site agent as a plugin.

options:
`

// RunCLI runs the admin commands of the backend binary (args without the
// program name) and returns the exit status: 0 done (also when nothing
// matched), 1 failed, 2 usage error.
func RunCLI(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 || (args[0] != "list" && args[0] != "remove") {
		fmt.Fprint(stderr, cliUsage)
		fmt.Fprintln(stderr, "  (run a command with -h for its options)")
		return 2
	}
	cmd := args[0]
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprint(stderr, cliUsage)
		fs.PrintDefaults()
	}
	var cfg Config
	var sel Selection
	var role string
	var dryRun bool
	fs.StringVar(&cfg.Mode, "mode", ModeKernel, "data plane: kernel (Linux bridges) or ovs (Open vSwitch, XenServer/XCP-ng default)")
	fs.StringVar(&cfg.Netns, "netns", "", "work in this network namespace (name under /run/netns or path)")
	fs.StringVar(&cfg.OVSVsctl, "ovs-vsctl", "ovs-vsctl", "ovs mode: the ovs-vsctl binary")
	fs.StringVar(&cfg.OVSDB, "ovs-db", "", "ovs mode: ovs-vsctl --db= value")
	fs.BoolVar(&cfg.OVSNoWait, "ovs-no-wait", false, "ovs mode: pass --no-wait (database without ovs-vswitchd)")
	if cmd == "remove" {
		fs.StringVar(&sel.MigrationID, "migration", "", "remove the tunnels of this migration id (kept or not)")
		fs.StringVar(&role, "role", "", "with --migration: only this site role's tunnels (source or destination)")
		fs.BoolVar(&sel.AllKept, "all-kept", false, "remove every tunnel kept after a migration")
		fs.BoolVar(&dryRun, "dry-run", false, "only show what would be removed")
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "%s: unexpected argument %q\n", cmd, fs.Arg(0))
		return 2
	}
	if cfg.Mode != ModeKernel && cfg.Mode != ModeOVS {
		fmt.Fprintf(stderr, "%s: --mode %q: want kernel or ovs (tap tunnels vanish with their process)\n", cmd, cfg.Mode)
		return 2
	}
	sel.Role = contract.Role(role)
	if cmd == "list" {
		found, err := ListTunnels(ctx, cfg)
		if err != nil {
			fmt.Fprintf(stderr, "list: %v\n", err)
			return 1
		}
		printTunnels(stdout, found)
		return 0
	}
	if err := sel.validate(); err != nil {
		fmt.Fprintf(stderr, "remove: %v\n", err)
		return 2
	}
	gone, err := RemoveTunnels(ctx, cfg, sel, dryRun)
	verb := "removed"
	if dryRun {
		verb = "would remove"
	}
	for _, f := range gone {
		fmt.Fprintf(stdout, "%s %s (%s)\n", verb, f.Name, describeFound(f))
	}
	if err != nil {
		fmt.Fprintf(stderr, "remove: %v\n", err)
		return 1
	}
	if len(gone) == 0 {
		fmt.Fprintf(stdout, "no %s tunnel matched (nothing to do)\n", cfg.Mode)
	}
	return 0
}

func markerState(f FoundTunnel) string {
	if !f.Marked {
		return "unmarked"
	}
	return f.Marker.state()
}

func describeFound(f FoundTunnel) string {
	parts := []string{markerState(f)}
	if f.Marker.MigrationID != "" {
		parts = append(parts, "migration "+f.Marker.MigrationID)
	}
	if f.Marker.Role != "" {
		parts = append(parts, string(f.Marker.Role))
	}
	if f.Bridge != "" {
		parts = append(parts, "on "+f.Bridge)
	}
	if f.VNI != 0 {
		parts = append(parts, "vni "+strconv.Itoa(f.VNI))
	}
	if f.Remote != "" {
		parts = append(parts, "remote "+f.Remote)
	}
	return strings.Join(parts, ", ")
}

func printTunnels(w io.Writer, found []FoundTunnel) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NAME\tSTATE\tMIGRATION\tROLE\tVM\tBRIDGE\tVNI\tREMOTE")
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	for _, f := range found {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", f.Name, markerState(f), dash(f.Marker.MigrationID),
			dash(string(f.Marker.Role)), dash(f.Marker.VMUUID), dash(f.Bridge), f.VNI, dash(f.Remote))
	}
	_ = tw.Flush()
}
