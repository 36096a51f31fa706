package main

// `wanmotion hook vm-pre-migrate|vm-post-migrate -vmuuid U -reason R
// [-vmdomid D] [-script PATH]`: the xenopsd migration hooks (xenapi-facts
// §3), installed as /etc/xapi.d/vm-pre-migrate/50wanmotion and
// /etc/xapi.d/vm-post-migrate/50wanmotion. For migrations xapi runs itself
// (not the ones wanmotion's engine drives, which handle the network), they
// ask the pool's network strategy (pool.other_config wanmotion:network) to
// prepare the source and to prepare and activate the destination.
//
// Exit codes have xapi's meaning: 0 success, 1 "log and continue". A hook
// never exits with anything else: our side being unavailable must never
// block a migration, so every failure (bad arguments included) is logged on
// stderr and exits 1.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
	"github.com/wanmotion/wanmotion/xapi"
)

// Hook names and the reasons xenopsd gives them.
const (
	hookPreMigrate  = "vm-pre-migrate"
	hookPostMigrate = "vm-post-migrate"
	reasonSource    = "source"
	reasonDest      = "destination"
)

// hookTimeout bounds a hook's work: xenopsd waits for it.
var hookTimeout = 60 * time.Second

// errHook marks a hook failure (exit 1, log and continue).
var errHook = errors.New("not run")

type hookArgs struct {
	hook, vmUUID, reason, script string
	domid                        int
	hasDomid                     bool
}

// parseHookArgs parses by flag name, in any order (xenopsd's code passes
// -vmuuid first, its design doc -reason first).
func parseHookArgs(args []string) (hookArgs, error) {
	var a hookArgs
	if len(args) == 0 {
		return a, fmt.Errorf("%w: want vm-pre-migrate or vm-post-migrate", errHook)
	}
	a.hook = args[0]
	if a.hook != hookPreMigrate && a.hook != hookPostMigrate {
		return a, fmt.Errorf("%w: unknown hook %q: want vm-pre-migrate or vm-post-migrate", errHook, a.hook)
	}
	fs := flag.NewFlagSet("hook", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&a.vmUUID, "vmuuid", "", "VM uuid")
	fs.StringVar(&a.reason, "reason", "", "reason")
	domid := fs.String("vmdomid", "", "domain id")
	fs.StringVar(&a.script, "script", "", "the hook script's path ($0), to find the host's etc")
	if err := fs.Parse(args[1:]); err != nil {
		return a, fmt.Errorf("%w: %v", errHook, err)
	}
	if fs.NArg() > 0 {
		return a, fmt.Errorf("%w: unexpected argument %q", errHook, fs.Arg(0))
	}
	if a.vmUUID == "" || a.reason == "" {
		return a, fmt.Errorf("%w: -vmuuid and -reason are required", errHook)
	}
	if *domid != "" {
		n, err := strconv.Atoi(*domid)
		if err != nil || n < 0 {
			return a, fmt.Errorf("%w: -vmdomid %q: not a domain id", errHook, *domid)
		}
		a.domid, a.hasDomid = n, true
	}
	return a, nil
}

// runHook never returns a usage error: realMain maps any error to exit 1.
func runHook(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	a, err := parseHookArgs(args)
	if err != nil {
		fmt.Fprintf(stderr, "wanmotion hook: %v (log and continue)\n", err)
		return err
	}
	script := a.script
	if script == "" {
		script = filepath.Join("/etc/xapi.d", a.hook, "50wanmotion")
	}
	env, err := hostplugin.Discover(script)
	if err != nil {
		return fmt.Errorf("%w: %v", errHook, err)
	}
	bin, _ := os.Executable()
	cfg, err := hostplugin.LoadConfig(hostplugin.ConfigCandidates(env.EtcDir, bin))
	if err != nil {
		return fmt.Errorf("%w: %v", errHook, err)
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "wanmotion-hook", Level: hclog.LevelFromString(cfg.LogLevel), Output: stderr}).
		With("hook", a.hook, "vm_uuid", a.vmUUID, "reason", a.reason)
	hctx, cancel := context.WithTimeout(ctx, hookTimeout)
	defer cancel()
	res, err := hookNetwork(hctx, a, env, cfg, log)
	if err != nil {
		log.Error("network continuity not arranged; the migration continues", "error", err)
		return fmt.Errorf("%w: %v", errHook, err)
	}
	log.Info("hook done", "result", res)
	fmt.Fprintln(stdout, res)
	return nil
}

// hookRecord is <state>/hooks/<vm-uuid>/<role>.json: the network handle a
// hook prepared (for a later cleanup and for operators).
type hookRecord struct {
	Hook        string          `json:"hook"`
	VMUUID      string          `json:"vm_uuid"`
	Role        contract.Role   `json:"role"`
	Backend     string          `json:"backend"`
	MigrationID string          `json:"migration_id"`
	Handle      contract.Handle `json:"handle"`
	Announced   []string        `json:"announced,omitempty"`
	At          time.Time       `json:"at"`
}

func hookStateDir(cfg hostplugin.Config, vmUUID string) string {
	return filepath.Join(cfg.StateDir, "hooks", vmUUID)
}

// hookNetwork does the hook's work and says what it did.
func hookNetwork(ctx context.Context, a hookArgs, env hostplugin.Env, cfg hostplugin.Config, log hclog.Logger) (string, error) {
	role := contract.RoleSource
	switch {
	case a.hook == hookPreMigrate && a.reason == reasonSource:
	case a.hook == hookPostMigrate && a.reason == reasonDest:
		role = contract.RoleDestination
	default:
		return "nothing to do for reason " + a.reason, nil
	}
	pw, err := cfg.LocalPassword()
	if err != nil {
		return "", err
	}
	c, err := env.LocalLogin(ctx, pw, log)
	if err != nil {
		return "", err
	}
	defer func() { _ = c.Close(context.WithoutCancel(ctx)) }()
	pools, err := c.PoolGetAll(ctx)
	if err != nil || len(pools) == 0 {
		return "", fmt.Errorf("pool.get_all: %w", err)
	}
	oc, err := c.PoolGetOtherConfig(ctx, pools[0])
	if err != nil {
		return "", err
	}
	backend := strings.TrimSpace(oc[engine.KeyNetwork])
	if backend == "" || backend == engine.NetworkNone {
		return "network strategy none", nil
	}
	vm, err := c.VMGetByUUID(ctx, a.vmUUID)
	if err != nil {
		return "", fmt.Errorf("VM %s: %w", a.vmUUID, err)
	}
	if ours, err := wanmotionDrivesVM(ctx, c, string(vm)); err != nil {
		return "", err
	} else if ours {
		return "migration driven by wanmotion; its engine handles the network", nil
	}
	vmRec, err := c.VMGetRecord(ctx, vm)
	if err != nil {
		return "", err
	}
	vifs, err := hookVIFs(ctx, c, vmRec.VIFs)
	if err != nil {
		return "", err
	}
	dir := hookStateDir(cfg, a.vmUUID)
	if err := os.MkdirAll(filepath.Join(dir, "backend"), 0o700); err != nil {
		return "", err
	}
	h := host.New(host.SearchDirs(cfg.PluginDir), host.Options{Logger: log})
	inst, err := h.LaunchNetwork(ctx, backend, nil, filepath.Join(dir, "backend"))
	if err != nil {
		return "", fmt.Errorf("network backend %s: %w", backend, err)
	}
	defer inst.Close()
	net := inst.Network()
	// A migration xapi runs has no wanmotion id: name it after the VM.
	rec := hookRecord{Hook: a.hook, VMUUID: a.vmUUID, Role: role, Backend: backend, MigrationID: "xapi-" + a.vmUUID, At: time.Now().UTC()}
	prep, err := net.Prepare(ctx, contract.NetPrepareRequest{MigrationID: rec.MigrationID, Role: role, VMUUID: a.vmUUID,
		VMName: vmRec.NameLabel, VIFs: vifs,
		XAPI: contract.XAPIAccess{URL: c.URL(), Session: contract.Secret(string(c.Session())), HostUUID: env.HostUUID}})
	if err != nil {
		return "", fmt.Errorf("%s prepare: %w", backend, err)
	}
	rec.Handle = prep.Handle
	if role == contract.RoleDestination {
		ar := contract.ActivateRequest{Handle: prep.Handle.ID}
		if a.hasDomid {
			ar.DomID = a.domid
		}
		act, err := net.Activate(ctx, ar)
		if err != nil {
			return "", fmt.Errorf("%s activate: %w", backend, err)
		}
		rec.Handle.State, rec.Announced = act.State, act.Announced
	}
	b, _ := json.MarshalIndent(rec, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, string(role)+".json"), append(b, '\n'), 0o600); err != nil {
		return "", err
	}
	if role == contract.RoleDestination {
		return fmt.Sprintf("%s: destination prepared and activated (%d addresses announced)", backend, len(rec.Announced)), nil
	}
	return backend + ": source prepared", nil
}

// wanmotionDrivesVM reports whether a pending wanmotion task applies to vm.
func wanmotionDrivesVM(ctx context.Context, c *xapi.Client, vm string) (bool, error) {
	tasks, err := c.TaskGetAllRecords(ctx)
	if err != nil {
		return false, err
	}
	for _, t := range tasks {
		if t.Status == xapi.TaskStatusPending && strings.HasPrefix(t.NameDescription, "wanmotion WAN migration ") &&
			strings.Contains(t.OtherConfig["applies_to"], vm) {
			return true, nil
		}
	}
	return false, nil
}

func hookVIFs(ctx context.Context, c *xapi.Client, refs []xapi.VIFRef) ([]contract.VIFInfo, error) {
	out := make([]contract.VIFInfo, 0, len(refs))
	for _, r := range refs {
		v, err := c.VIFGetRecord(ctx, r)
		if err != nil {
			return nil, fmt.Errorf("VIF: %w", err)
		}
		info := contract.VIFInfo{Device: v.Device, MAC: v.MAC}
		if n, err := c.NetworkGetRecord(ctx, v.Network); err == nil {
			info.NetworkUUID, info.Bridge = n.UUID, n.Bridge
		}
		out = append(out, info)
	}
	return out, nil
}
