package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

// pluginRow is one backend in `plugins list --json` and `plugins check --json`.
type pluginRow struct {
	Kind            string   `json:"kind"`
	Name            string   `json:"name"`
	Version         string   `json:"version,omitempty"`
	Description     string   `json:"description,omitempty"`
	APIVersions     []string `json:"api_versions"`
	Capabilities    []string `json:"capabilities"`
	Path            string   `json:"path"`
	SHA256          string   `json:"sha256"`
	ProtocolVersion int      `json:"protocol_version,omitempty"`
	APIVersion      string   `json:"api_version,omitempty"` // check only: negotiated
	Warnings        []string `json:"warnings,omitempty"`
	Error           string   `json:"error,omitempty"`
}

func runPlugins(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	usage := func() {
		fmt.Fprintln(stderr, `Usage:
  wanmotion plugins list  [--dir D] [--json]            list installed backends (launches each to ask it)
  wanmotion plugins check NAME [--kind K] [--dir D] [--json]
                                                        launch a backend, negotiate, configure, report

Backends are executables named wanmotion-<kind>-<name> (kind: storage or network) in the
install directory (--dir, else $WANMOTION_PLUGIN_DIR, else /opt/wanmotion/plugins) and in
the directory of the wanmotion binary.`)
	}
	if len(args) == 0 {
		usage()
		return fmt.Errorf("%w: plugins needs a subcommand (list or check)", errUsage)
	}
	switch args[0] {
	case "list":
		return pluginsList(ctx, args[1:], stdout, stderr)
	case "check":
		return pluginsCheck(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		usage()
		return nil
	}
	usage()
	return fmt.Errorf("%w: unknown plugins subcommand %q", errUsage, args[0])
}

type pluginFlags struct {
	fs       *flag.FlagSet
	dir      *string
	asJSON   *bool
	timeout  *time.Duration
	logLevel *string
}

func newPluginFlags(name string, stderr io.Writer) pluginFlags {
	fs := flag.NewFlagSet("plugins "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return pluginFlags{
		fs:       fs,
		dir:      fs.String("dir", "", "backend install directory (default $"+host.EnvPluginDir+" or "+host.DefaultInstallDir+")"),
		asJSON:   fs.Bool("json", false, "print JSON"),
		timeout:  fs.Duration("timeout", host.DefaultStartTimeout, "how long a backend may take to start"),
		logLevel: fs.String("log-level", "warn", "log level for backend logs relayed to stderr"),
	}
}

func (f pluginFlags) options(stderr io.Writer) host.Options {
	return host.Options{
		Logger:       hclog.New(&hclog.LoggerOptions{Name: "wanmotion", Level: hclog.LevelFromString(*f.logLevel), Output: stderr}),
		StartTimeout: *f.timeout,
	}
}

func rowOf(b host.Binary) pluginRow {
	return pluginRow{Kind: string(b.Kind), Name: b.Name, Path: b.Path, SHA256: b.SHA256, APIVersions: []string{}, Capabilities: []string{}}
}

func (r *pluginRow) fill(inst *host.Instance) {
	r.Version, r.Description = inst.Info.Version, inst.Info.Description
	r.APIVersions = append([]string{}, inst.Info.APIVersions...)
	r.Capabilities = inst.Info.Capabilities.Names()
	r.ProtocolVersion, r.APIVersion, r.Warnings = inst.ProtocolVersion, inst.APIVersion, inst.Warnings
}

func parsePluginFlags(f pluginFlags, args []string) ([]string, error) {
	// Allow flags after positional arguments (plugins check NAME --kind K).
	var pos []string
	for {
		if err := f.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, flag.ErrHelp
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		args = f.fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func pluginsList(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newPluginFlags("list", stderr)
	pos, err := parsePluginFlags(f, args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: plugins list takes no arguments", errUsage)
	}
	dirs := host.SearchDirs(*f.dir)
	bins, err := host.Discover(dirs)
	if err != nil {
		return err
	}
	warnDiscovery(stderr, dirs, *f.dir != "" || os.Getenv(host.EnvPluginDir) != "")
	opts := f.options(stderr)
	opts.SkipConfigure = true
	rows := []pluginRow{}
	for _, b := range bins {
		row := rowOf(b)
		inst, err := host.Launch(ctx, b, opts)
		if err != nil {
			row.Error = err.Error()
		} else {
			row.fill(inst)
			inst.Close()
		}
		rows = append(rows, row)
	}
	if *f.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rows)
	}
	if len(rows) == 0 {
		fmt.Fprintf(stdout, "no backends found in %s\n", strings.Join(dirs, ", "))
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "KIND\tNAME\tVERSION\tAPI\tCAPABILITIES\tPATH\tSHA256")
	for _, r := range rows {
		ver, caps := r.Version, strings.Join(r.Capabilities, ",")
		if r.Error != "" {
			ver, caps = "?", "error: "+firstLine(r.Error)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Kind, r.Name, ver, strings.Join(r.APIVersions, ","),
			caps, r.Path, r.SHA256[:12])
	}
	return tw.Flush()
}

// warnDiscovery tells on stderr why backends may be missing: the install
// directory does not exist, or a file named like a backend is not an
// executable (discovery skips both silently). A missing install directory
// is only worth a word when the user named it (--dir, $WANMOTION_PLUGIN_DIR).
func warnDiscovery(stderr io.Writer, dirs []string, named bool) {
	if named && len(dirs) > 0 {
		if _, err := os.Stat(dirs[0]); errors.Is(err, os.ErrNotExist) {
			fmt.Fprintf(stderr, "warning: plugin directory %s does not exist (set --dir or %s)\n", dirs[0], host.EnvPluginDir)
		}
	}
	for _, dir := range dirs {
		entries, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range entries {
			name := e.Name()
			if !strings.HasPrefix(name, host.BinaryPrefix) {
				continue
			}
			p := filepath.Join(dir, name)
			if _, _, ok := host.ParseBinaryName(name); !ok {
				if strings.HasPrefix(name, host.BinaryPrefix+"storage-") || strings.HasPrefix(name, host.BinaryPrefix+"network-") {
					fmt.Fprintf(stderr, "warning: %s skipped: a backend name is lower-case letters, digits, '-', '_' or '.'\n", p)
				}
				continue
			}
			fi, err := os.Stat(p)
			switch {
			case err != nil:
				fmt.Fprintf(stderr, "warning: %s skipped: %v\n", p, err)
			case !fi.Mode().IsRegular():
				fmt.Fprintf(stderr, "warning: %s skipped: not a regular file\n", p)
			case fi.Mode().Perm()&0o111 == 0:
				fmt.Fprintf(stderr, "warning: %s skipped: not executable (chmod 0755 %s)\n", p, p)
			}
		}
	}
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}

func pluginsCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	f := newPluginFlags("check", stderr)
	kindFlag := f.fs.String("kind", "", "backend kind (storage or network); needed when both kinds have NAME")
	pos, err := parsePluginFlags(f, args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("%w: plugins check takes exactly one backend NAME", errUsage)
	}
	name := pos[0]
	kinds := contract.Kinds()
	if *kindFlag != "" {
		k, err := contract.ParseKind(*kindFlag)
		if err != nil {
			return fmt.Errorf("%w: --kind: %v", errUsage, err)
		}
		kinds = []contract.Kind{k}
	}
	dirs := host.SearchDirs(*f.dir)
	bins, err := host.Discover(dirs)
	if err != nil {
		return err
	}
	warnDiscovery(stderr, dirs, *f.dir != "" || os.Getenv(host.EnvPluginDir) != "")
	var found []host.Binary
	var lastErr error
	for _, k := range kinds {
		b, err := host.Resolve(bins, k, name)
		if err != nil {
			lastErr = err
			continue
		}
		found = append(found, b)
	}
	switch {
	case len(found) == 0 && len(kinds) == 1:
		return lastErr
	case len(found) == 0:
		var have []string
		for _, b := range bins {
			have = append(have, b.ID())
		}
		if len(have) == 0 {
			have = []string{"none"}
		}
		return fmt.Errorf("backend %q (installed: %s): %w", name, strings.Join(have, ", "), host.ErrBackendNotFound)
	case len(found) > 1:
		return fmt.Errorf("%w: both a storage and a network backend are named %q; add --kind", errUsage, name)
	}
	b := found[0]
	stateDir, err := os.MkdirTemp("", "wanmotion-plugin-check-")
	if err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	defer os.RemoveAll(stateDir)
	opts := f.options(stderr)
	opts.StateDir = stateDir
	row := rowOf(b)
	inst, lerr := host.Launch(ctx, b, opts)
	if lerr != nil {
		row.Error = lerr.Error()
	} else {
		row.fill(inst)
		inst.Close()
	}
	if *f.asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(row); err != nil {
			return err
		}
	} else {
		tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "backend:\t%s/%s\n", row.Kind, row.Name)
		fmt.Fprintf(tw, "path:\t%s\n", row.Path)
		fmt.Fprintf(tw, "sha256:\t%s\n", row.SHA256)
		if lerr == nil {
			fmt.Fprintf(tw, "version:\t%s\n", row.Version)
			fmt.Fprintf(tw, "protocol version:\t%d (host accepts %v)\n", row.ProtocolVersion, contract.AcceptedProtocolVersions)
			fmt.Fprintf(tw, "api versions:\t%s (host supports %s)\n", strings.Join(row.APIVersions, ", "), strings.Join(contract.HostAPIVersions, ", "))
			fmt.Fprintf(tw, "negotiated api:\t%s\n", row.APIVersion)
			fmt.Fprintf(tw, "capabilities:\t%s\n", strings.Join(row.Capabilities, ", "))
			for _, w := range row.Warnings {
				fmt.Fprintf(tw, "warning:\t%s\n", w)
			}
			fmt.Fprintf(tw, "result:\tok\n")
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	if lerr != nil {
		return fmt.Errorf("check %s: %w", b.ID(), lerr)
	}
	return nil
}
