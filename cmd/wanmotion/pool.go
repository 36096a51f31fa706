package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/xapi"
)

const poolUsage = `Usage:
  wanmotion pool show      --url URL [--user root] [--json] [connection flags]
  wanmotion pool configure --url URL [--user root] [--storage NAME] [--network NAME]
                           [--set key=value ...] [--config-json FILE] [--plugin-dir D] [connection flags]

show prints the pool's wanmotion keys in pool.other_config (wanmotion:storage,
wanmotion:network, wanmotion:config). configure changes them (remove-then-add);
--set key= (empty value) removes a field, --storage= / --network= remove the key.
--config-json FILE replaces the whole wanmotion:config object (- reads stdin).

Connection flags: --insecure | --ca-file FILE | --thumbprint SHA256 (repeatable),
--credentials FILE. The password comes from $WANMOTION_PASSWORD, the credentials
file or a prompt; never from a flag.`

// configKeys are the wanmotion:config fields (docs/engine.md).
var configKeys = []string{"bandwidth", "streams", "compression", "gateway_listen", "gateway_advertise",
	"downtime_target", "convergence_policy", "max_rounds", "min_shrink", "throttle_max", "migration_network"}

func runPool(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprintln(stderr, poolUsage)
		return fmt.Errorf("%w: pool needs a subcommand (show or configure)", errUsage)
	}
	switch args[0] {
	case "show":
		return poolShow(ctx, args[1:], stdout, stderr)
	case "configure":
		return poolConfigure(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprintln(stdout, poolUsage)
		return nil
	}
	fmt.Fprintln(stderr, poolUsage)
	return fmt.Errorf("%w: unknown pool subcommand %q", errUsage, args[0])
}

// poolConn are the flags of one pool connection.
type poolConn struct {
	url, user, credentials, logLevel string
	tls                              tlsFlags
}

func (p *poolConn) register(fs *flag.FlagSet) {
	fs.StringVar(&p.url, "url", "", "pool coordinator URL (https://host)")
	fs.StringVar(&p.user, "user", "root", "user name")
	fs.StringVar(&p.credentials, "credentials", "", "credentials file (default ~/.config/wanmotion/credentials)")
	fs.StringVar(&p.logLevel, "log-level", "warn", "log level for stderr")
	p.tls.register(fs)
}

func (p *poolConn) open(ctx context.Context, stderr io.Writer) (*xapiadapt.Pool, func(), error) {
	if p.url == "" {
		return nil, nil, fmt.Errorf("%w: --url is required", errUsage)
	}
	if err := p.tls.check(); err != nil {
		return nil, nil, err
	}
	if err := checkLogLevel(p.logLevel); err != nil {
		return nil, nil, err
	}
	src := credSource{env: EnvPassword, file: p.credentials, fileGiven: p.credentials != "", label: "pool"}
	pw, err := src.password(p.url, p.user, stderr)
	if err != nil {
		return nil, nil, err
	}
	log := newCLILogger(p.logLevel, stderr)
	c, err := connect(ctx, p.url, p.user, pw, p.tls, log)
	if err != nil {
		return nil, nil, err
	}
	return xapiadapt.NewPool(c, log), func() { _ = c.Close(context.WithoutCancel(ctx)) }, nil
}

func parseFlags(fs *flag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, fs.Arg(0))
	}
	return nil
}

// poolView is `pool show --json`.
type poolView struct {
	Pool    string            `json:"pool"`
	UUID    string            `json:"uuid"`
	URL     string            `json:"url"`
	Storage string            `json:"storage"` // "" when the key is not set
	Network string            `json:"network"`
	Config  json.RawMessage   `json:"config"` // the wanmotion:config object, {} when unset
	Raw     map[string]string `json:"raw"`    // every wanmotion:* key as stored
	Error   string            `json:"error,omitempty"`
}

func poolShow(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if err := refusePasswordFlags(args, EnvPassword); err != nil {
		return err
	}
	fs := flag.NewFlagSet("pool show", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var pc poolConn
	pc.register(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	p, closeFn, err := pc.open(ctx, stderr)
	if err != nil {
		return err
	}
	defer closeFn()
	v, err := readPoolView(ctx, p, pc.url)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	fmt.Fprint(stdout, v.text())
	return nil
}

func readPoolView(ctx context.Context, p *xapiadapt.Pool, poolURL string) (poolView, error) {
	ref, err := p.PoolRef(ctx)
	if err != nil {
		return poolView{}, err
	}
	rec, err := p.Client().PoolGetRecord(ctx, ref)
	if err != nil {
		return poolView{}, fmt.Errorf("pool.get_record: %w", err)
	}
	v := poolView{Pool: rec.NameLabel, UUID: rec.UUID, URL: poolURL, Raw: map[string]string{}, Config: json.RawMessage("{}")}
	for k, val := range rec.OtherConfig {
		if strings.HasPrefix(k, "wanmotion:") {
			v.Raw[k] = val
		}
	}
	v.Storage, v.Network = strings.TrimSpace(rec.OtherConfig[engine.KeyStorage]), strings.TrimSpace(rec.OtherConfig[engine.KeyNetwork])
	if raw := strings.TrimSpace(rec.OtherConfig[engine.KeyConfig]); raw != "" {
		if _, perr := engine.ParseConfigJSON(raw); perr != nil {
			v.Error = perr.Error()
		}
		if json.Valid([]byte(raw)) {
			v.Config = json.RawMessage(raw)
		}
	}
	return v, nil
}

func (v poolView) text() string {
	var b strings.Builder
	fmt.Fprintf(&b, "pool %s (%s) at %s\n", v.Pool, v.UUID, v.URL)
	show := func(key, val, def string) {
		if val == "" {
			val = "(not set; default " + def + ")"
		}
		fmt.Fprintf(&b, "  %-20s %s\n", key, val)
	}
	show(engine.KeyStorage, v.Storage, engine.DefaultStorage)
	show(engine.KeyNetwork, v.Network, engine.DefaultNetwork)
	var cfg map[string]any
	_ = json.Unmarshal(v.Config, &cfg)
	if len(cfg) == 0 {
		fmt.Fprintf(&b, "  %-20s (not set; defaults)\n", engine.KeyConfig)
	} else {
		fmt.Fprintf(&b, "  %s:\n", engine.KeyConfig)
		ks := make([]string, 0, len(cfg))
		for k := range cfg {
			ks = append(ks, k)
		}
		sort.Strings(ks)
		for _, k := range ks {
			js, _ := json.Marshal(cfg[k])
			fmt.Fprintf(&b, "    %-20s %s\n", k, js)
		}
	}
	if v.Error != "" {
		fmt.Fprintf(&b, "  INVALID: %s\n", v.Error)
	}
	return b.String()
}

// setFlags collects --set key=value.
type setFlags []string

func (s *setFlags) String() string     { return strings.Join(*s, ",") }
func (s *setFlags) Set(v string) error { *s = append(*s, v); return nil }

func poolConfigure(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if err := refusePasswordFlags(args, EnvPassword); err != nil {
		return err
	}
	fs := flag.NewFlagSet("pool configure", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var pc poolConn
	pc.register(fs)
	storage := fs.String("storage", "", "storage backend name (empty value removes the key)")
	network := fs.String("network", "", "network backend name, or none (empty value removes the key)")
	var sets setFlags
	fs.Var(&sets, "set", "set a wanmotion:config field, key=value (repeatable; key= removes it)")
	configJSON := fs.String("config-json", "", "file with the whole wanmotion:config JSON object (- for stdin)")
	pluginDir := fs.String("plugin-dir", "", "backend install directory (default $"+host.EnvPluginDir+" or "+host.DefaultInstallDir+")")
	asJSON := fs.Bool("json", false, "print the resulting settings as JSON")
	if err := parseFlags(fs, args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	if !given["storage"] && !given["network"] && len(sets) == 0 && !given["config-json"] {
		return fmt.Errorf("%w: nothing to configure: give --storage, --network, --set or --config-json", errUsage)
	}
	var fileJSON string
	if given["config-json"] {
		b, err := readConfigFile(*configJSON)
		if err != nil {
			return err
		}
		fileJSON = string(b)
		if _, err := engine.ParseConfigJSON(fileJSON); err != nil {
			return fmt.Errorf("%s: %w", *configJSON, err)
		}
	}
	// Check names here (CLI-run migrations run the backends on this
	// machine) and on the pool's hosts (migrations started through the host
	// plugin or XenCenter run them there).
	checkNames := (given["storage"] && *storage != "") || (given["network"] && *network != "" && *network != engine.NetworkNone)
	var localErr error
	if checkNames {
		inst, err := installedBackends(*pluginDir)
		if err != nil {
			return err
		}
		localErr = checkBackendNames(inst, given["storage"], *storage, given["network"], *network)
	}
	p, closeFn, err := pc.open(ctx, stderr)
	if err != nil {
		return err
	}
	defer closeFn()
	if checkNames {
		found, asked, warnings := backendsOnHosts(ctx, p.Client(), given["storage"], *storage, given["network"], *network)
		if localErr != nil && !found {
			for _, w := range warnings {
				fmt.Fprintf(stderr, "warning: %s\n", w)
			}
			if asked == 0 {
				return fmt.Errorf("%w; and no host of the pool could be asked (see the warnings)", localErr)
			}
			return fmt.Errorf("%w; not installed on the pool's hosts either", localErr)
		}
		if localErr != nil {
			warnings = append(warnings, fmt.Sprintf("on this machine: %v; migrations started with this CLI from here need it in --plugin-dir", localErr))
		}
		for _, w := range warnings {
			fmt.Fprintf(stderr, "warning: %s\n", w)
		}
	}
	cur, err := p.PoolOtherConfig(ctx)
	if err != nil {
		return err
	}
	entries, err := newPoolEntries(cur, given["storage"], *storage, given["network"], *network, given["config-json"], fileJSON, sets)
	if err != nil {
		return err
	}
	if err := p.SetPoolOtherConfig(ctx, entries); err != nil {
		return err
	}
	v, err := readPoolView(ctx, p, pc.url)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	fmt.Fprint(stdout, v.text())
	return nil
}

func readConfigFile(name string) ([]byte, error) {
	if name == "-" {
		return io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return nil, fmt.Errorf("--config-json: %w", err)
	}
	return b, nil
}

// installedBackends discovers the installed backends (plugins/host).
func installedBackends(pluginDir string) (engine.Installed, error) {
	return pluginCatalog{dirs: host.SearchDirs(pluginDir)}.Installed(context.Background())
}

func checkBackendNames(inst engine.Installed, setStorage bool, storage string, setNetwork bool, network string) error {
	if !setStorage {
		storage = ""
	}
	if !setNetwork {
		network = ""
	}
	return inst.Check(storage, network)
}

// newPoolEntries computes the wanmotion:* entries to write from the
// current other_config and the requested changes, validated with
// engine.ParseConfigJSON / engine.PoolConfigEntries.
func newPoolEntries(cur map[string]string, setStorage bool, storage string, setNetwork bool, network string,
	replaceConfig bool, fileJSON string, sets []string) (map[string]string, error) {
	fields := map[string]any{}
	base := cur[engine.KeyConfig]
	if replaceConfig {
		base = fileJSON
	}
	if strings.TrimSpace(base) != "" {
		if _, err := engine.ParseConfigJSON(base); err != nil {
			return nil, fmt.Errorf("current %s is invalid (replace it with --config-json): %w", engine.KeyConfig, err)
		}
		if err := json.Unmarshal([]byte(base), &fields); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", engine.ErrConfig, engine.KeyConfig, err)
		}
	}
	for _, kv := range sets {
		k, val, ok := strings.Cut(kv, "=")
		if !ok {
			return nil, fmt.Errorf("%w: --set %q: want key=value", errUsage, kv)
		}
		if !slices.Contains(configKeys, k) {
			return nil, fmt.Errorf("%w: --set: unknown field %q (fields: %s)", errUsage, k, strings.Join(configKeys, ", "))
		}
		if val == "" {
			delete(fields, k)
			continue
		}
		switch k {
		case "streams", "max_rounds", "throttle_max":
			n, err := strconv.Atoi(val)
			if err != nil {
				return nil, fmt.Errorf("%w: --set %s=%q: want an integer", errUsage, k, val)
			}
			fields[k] = n
		case "min_shrink":
			f, err := strconv.ParseFloat(val, 64)
			if err != nil {
				return nil, fmt.Errorf("%w: --set %s=%q: want a number", errUsage, k, val)
			}
			fields[k] = f
		default:
			fields[k] = val
		}
	}
	js, err := json.Marshal(fields)
	if err != nil {
		return nil, err
	}
	o, err := engine.ParseConfigJSON(string(js))
	if err != nil {
		return nil, err
	}
	st, nw := strings.TrimSpace(cur[engine.KeyStorage]), strings.TrimSpace(cur[engine.KeyNetwork])
	if setStorage {
		st = storage
	}
	if setNetwork {
		nw = network
	}
	if st != "" {
		o.Storage = &st
	}
	if nw != "" {
		o.Network = &nw
	}
	return engine.PoolConfigEntries(o)
}

// backendsOnHosts asks the wanmotion host plugin of every host of the pool
// which backends it has. found: some host has every named backend; asked:
// how many hosts answered. warnings name the hosts that lack one, or that
// have no plugin.
func backendsOnHosts(ctx context.Context, c *xapi.Client, setStorage bool, storage string, setNetwork bool, network string) (bool, int, []string) {
	recs, err := c.HostGetAllRecords(ctx)
	if err != nil {
		return false, 0, []string{fmt.Sprintf("cannot list the pool's hosts to check their backends: %v", err)}
	}
	asked := 0
	var refs []xapi.HostRef
	for r := range recs {
		refs = append(refs, r)
	}
	slices.Sort(refs)
	found := false
	var noPlugin, lacking []string
	var warnings []string
	for _, r := range refs {
		name := recs[r].NameLabel
		inst, err := hostBackends(ctx, c, r)
		switch {
		case xapi.IsCode(err, xapi.CodeXenAPIMissingPlugin):
			noPlugin = append(noPlugin, name)
			continue
		case err != nil:
			warnings = append(warnings, fmt.Sprintf("host %s: cannot ask its wanmotion host plugin for its backends: %v", name, err))
			continue
		}
		asked++
		if err := checkBackendNames(inst, setStorage, storage, setNetwork, network); err != nil {
			lacking = append(lacking, fmt.Sprintf("%s (%v)", name, err))
			continue
		}
		found = true
	}
	if len(noPlugin) > 0 {
		warnings = append(warnings, fmt.Sprintf("the wanmotion host plugin is not installed on %s: migrations started through XenAPI or XenCenter cannot run there (packaging/install.sh)", strings.Join(noPlugin, ", ")))
	}
	for _, l := range lacking {
		warnings = append(warnings, "backend missing on host "+l+": migrations started through XenAPI or XenCenter that use this host fail")
	}
	return found, asked, warnings
}
