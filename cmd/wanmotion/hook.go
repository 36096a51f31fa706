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

// hookRecord is <state>/hooks/<vm-uuid>/<role>.json: a network side a
// hook prepared and that is not released and cleaned up yet. The source
// side is released when the VM has left the host (the destination's
// vm-post-migrate asks every other host of its pool through the plugin's
// hook-release; any later hook on the host sweeps what is left); the
// record is removed once the backend cleaned it up.
type hookRecord struct {
	Hook        string          `json:"hook"`
	VMUUID      string          `json:"vm_uuid"`
	HostUUID    string          `json:"host_uuid"` // the host the side was prepared on
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
	nothing := ""
	switch {
	case a.hook == hookPreMigrate && a.reason == reasonSource:
	case a.hook == hookPostMigrate && a.reason == reasonDest:
		role = contract.RoleDestination
	default:
		nothing = "nothing to do for reason " + a.reason
		if files, _ := filepath.Glob(filepath.Join(cfg.StateDir, "hooks", "*", "*.json")); len(files) == 0 {
			return nothing, nil
		}
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
	// Sides this host prepared for VMs that have left it since.
	if done, err := sweepHookRecords(ctx, c, env, cfg, "", log); err != nil {
		log.Warn("hook records not all released", "error", err)
	} else if len(done) > 0 {
		log.Info("released earlier hook records", "records", strings.Join(done, ","))
	}
	if nothing != "" {
		return nothing, nil
	}
	pool, err := c.ThePool(ctx)
	if err != nil {
		return "", err
	}
	oc, err := c.PoolGetOtherConfig(ctx, pool)
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
	rec := hookRecord{Hook: a.hook, VMUUID: a.vmUUID, HostUUID: env.HostUUID, Role: role, Backend: backend,
		MigrationID: "xapi-" + a.vmUUID, At: time.Now().UTC()}
	xa := hookXAPI(c, env)
	prep, err := net.Prepare(ctx, contract.NetPrepareRequest{MigrationID: rec.MigrationID, Role: role, VMUUID: a.vmUUID,
		VMName: vmRec.NameLabel, VIFs: vifs, XAPI: xa})
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
	if err := writeHookRecord(cfg, rec); err != nil {
		return "", err
	}
	if role == contract.RoleSource {
		return backend + ": source prepared", nil
	}
	res := fmt.Sprintf("%s: destination prepared and activated (%d addresses announced)", backend, len(rec.Announced))
	// The VM runs here now: the source side (another host of this pool)
	// is released there, then both sides are cleaned up, as the engine does
	// after a switch.
	released := releaseOnOtherHosts(ctx, c, env, a.vmUUID, log)
	if len(released) > 0 {
		res += "; source released on host " + strings.Join(released, ",")
	}
	if _, err := net.Cleanup(ctx, contract.NetCleanupRequest{Handle: rec.Handle, XAPI: xa}); err != nil {
		log.Warn("destination cleanup failed; the next hook on this host retries", "error", err)
		return res, nil
	}
	if err := removeHookRecord(cfg, rec); err != nil {
		return "", err
	}
	return res + "; cleaned up", nil
}

// hookXAPI is the xapi access a hook gives its backend: its own session,
// over the address it used (unix://<socket> on a host).
func hookXAPI(c *xapi.Client, env hostplugin.Env) contract.XAPIAccess {
	url := c.URL()
	if c.Socket() != "" {
		url = xapi.SocketURL(c.Socket())
	}
	return contract.XAPIAccess{URL: url, Session: contract.Secret(string(c.Session())), HostUUID: env.HostUUID}
}

func hookRecordPath(cfg hostplugin.Config, vmUUID string, role contract.Role) string {
	return filepath.Join(hookStateDir(cfg, vmUUID), string(role)+".json")
}

func writeHookRecord(cfg hostplugin.Config, rec hookRecord) error {
	b, _ := json.MarshalIndent(rec, "", "  ")
	return os.WriteFile(hookRecordPath(cfg, rec.VMUUID, rec.Role), append(b, '\n'), 0o600)
}

// removeHookRecord deletes a record, and the VM's directory (with the
// backend's state) when no record is left in it.
func removeHookRecord(cfg hostplugin.Config, rec hookRecord) error {
	if err := os.Remove(hookRecordPath(cfg, rec.VMUUID, rec.Role)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	dir := hookStateDir(cfg, rec.VMUUID)
	left, _ := filepath.Glob(filepath.Join(dir, "*.json"))
	if len(left) == 0 {
		return os.RemoveAll(dir)
	}
	return nil
}

// validVMUUID guards the record paths built from a VM uuid.
func validVMUUID(u string) bool {
	if len(u) == 0 || len(u) > 64 {
		return false
	}
	for _, r := range u {
		if !(r == '-' || (r >= '0' && r <= '9') || (r >= 'a' && r <= 'f') || (r >= 'A' && r <= 'F')) {
			return false
		}
	}
	return true
}

// sweepHookRecords releases and cleans up the records this host keeps
// (only vmUUID's when it is not empty): a source side whose VM no longer
// runs on this host (moved, or gone from the pool), and any destination
// side (left when its cleanup failed). It returns the records done
// ("<vm uuid>/<role>").
func sweepHookRecords(ctx context.Context, c *xapi.Client, env hostplugin.Env, cfg hostplugin.Config, vmUUID string,
	log hclog.Logger) ([]string, error) {
	return sweepRecords(ctx, c, env, cfg, vmUUID, false, log)
}

// sweepRecords is sweepHookRecords; arrived says the VM runs elsewhere now
// (the destination's hook says so, before xapi updates resident_on), so
// its source side is released without looking.
func sweepRecords(ctx context.Context, c *xapi.Client, env hostplugin.Env, cfg hostplugin.Config, vmUUID string, arrived bool,
	log hclog.Logger) ([]string, error) {
	pattern := filepath.Join(cfg.StateDir, "hooks", "*", "*.json")
	if vmUUID != "" {
		pattern = filepath.Join(hookStateDir(cfg, vmUUID), "*.json")
	}
	files, _ := filepath.Glob(pattern)
	var done []string
	var errs []error
	var self xapi.HostRef
	for _, f := range files {
		var rec hookRecord
		b, err := os.ReadFile(f)
		if err == nil {
			err = json.Unmarshal(b, &rec)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		if rec.HostUUID != env.HostUUID || !validVMUUID(rec.VMUUID) {
			continue // another host's (a shared state dir) or not ours
		}
		if rec.Role == contract.RoleSource && !arrived {
			if self == "" {
				if self, err = c.HostGetByUUID(ctx, env.HostUUID); err != nil {
					return done, fmt.Errorf("this host: %w", err)
				}
			}
			if vm, err := c.VMGetByUUID(ctx, rec.VMUUID); err == nil {
				r, err := c.VMGetRecord(ctx, vm)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				if r.ResidentOn == self {
					continue // still here: the migration has not happened (yet)
				}
			} else if !xapi.IsCode(err, xapi.CodeHandleInvalid) && !xapi.IsCode(err, "UUID_INVALID") {
				errs = append(errs, err)
				continue
			}
		}
		if err := releaseHookRecord(ctx, c, env, cfg, rec, log); err != nil {
			errs = append(errs, fmt.Errorf("%s %s: %w", rec.VMUUID, rec.Role, err))
			continue
		}
		done = append(done, rec.VMUUID+"/"+string(rec.Role))
	}
	return done, errors.Join(errs...)
}

// releaseHookRecord re-binds a recorded side in a new backend process,
// releases it (source), cleans it up and removes the record.
func releaseHookRecord(ctx context.Context, c *xapi.Client, env hostplugin.Env, cfg hostplugin.Config, rec hookRecord,
	log hclog.Logger) error {
	dir := hookStateDir(cfg, rec.VMUUID)
	if err := os.MkdirAll(filepath.Join(dir, "backend"), 0o700); err != nil {
		return err
	}
	h := host.New(host.SearchDirs(cfg.PluginDir), host.Options{Logger: log})
	inst, err := h.LaunchNetwork(ctx, rec.Backend, nil, filepath.Join(dir, "backend"))
	if err != nil {
		return fmt.Errorf("network backend %s: %w", rec.Backend, err)
	}
	defer inst.Close()
	net := inst.Network()
	xa := hookXAPI(c, env)
	rc, err := net.Recover(ctx, contract.NetRecoverRequest{Handle: rec.Handle, XAPI: xa})
	if err != nil {
		return fmt.Errorf("%s recover: %w", rec.Backend, err)
	}
	handle := rc.Handle
	if rec.Role == contract.RoleSource {
		rel, err := net.Release(ctx, contract.ReleaseRequest{Handle: handle.ID})
		if err != nil {
			return fmt.Errorf("%s release: %w", rec.Backend, err)
		}
		if rel.State.Data != nil {
			handle.State = rel.State
		}
	}
	if _, err := net.Cleanup(ctx, contract.NetCleanupRequest{Handle: handle, XAPI: xa}); err != nil {
		return fmt.Errorf("%s cleanup: %w", rec.Backend, err)
	}
	log.Info("hook record released", "record_vm_uuid", rec.VMUUID, "role", string(rec.Role), "backend", rec.Backend)
	return removeHookRecord(cfg, rec)
}

// hookReleaseResult is the plugin's hook-release answer (JSON).
type hookReleaseResult struct {
	HostUUID string   `json:"host_uuid"`
	Released []string `json:"released"`
}

// releaseOnOtherHosts asks every other host of the pool (plugin
// hook-release) to release the source side of vmUUID; it returns the uuids
// of the hosts that released one. Failures are logged: the host's next
// hook sweeps what is left.
func releaseOnOtherHosts(ctx context.Context, c *xapi.Client, env hostplugin.Env, vmUUID string, log hclog.Logger) []string {
	hosts, err := c.HostGetAll(ctx)
	if err != nil {
		log.Warn("cannot list the pool's hosts; the source side is released by its host's next hook", "error", err)
		return nil
	}
	var released []string
	for _, h := range hosts {
		rec, err := c.HostGetRecord(ctx, h)
		if err != nil || rec.UUID == env.HostUUID {
			continue
		}
		cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		out, err := c.HostCallPlugin(cctx, h, hostplugin.PluginName, fnHookRelease, map[string]string{argVMUUID: vmUUID})
		cancel()
		if err != nil {
			log.Warn("hook-release failed on a host; its next hook retries", "host_uuid", rec.UUID, "error", err)
			continue
		}
		var res hookReleaseResult
		if err := json.Unmarshal([]byte(out), &res); err == nil && len(res.Released) > 0 {
			released = append(released, rec.UUID)
		}
	}
	return released
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

// Plugin function hook-release and its argument.
const (
	fnHookRelease = "hook-release"
	argVMUUID     = "vm_uuid"
)

// hookRelease is the plugin function the destination's vm-post-migrate
// calls on the other hosts of its pool: the VM has arrived there, so this
// host releases and cleans up the source side it prepared for it (if any)
// and removes the record.
func (p *pluginCall) hookRelease(ctx context.Context) (string, error) {
	if err := p.checkArgs(argVMUUID); err != nil {
		return "", err
	}
	vm := strings.TrimSpace(p.call.Args[argVMUUID])
	if !validVMUUID(vm) {
		return "", invalidArg("%s %q: not a VM uuid", argVMUUID, vm)
	}
	res := hookReleaseResult{HostUUID: p.env.HostUUID, Released: []string{}}
	if _, err := os.Stat(hookStateDir(p.cfg, vm)); errors.Is(err, os.ErrNotExist) {
		return jsonString(res)
	}
	c, closeFn, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeFn()
	done, err := sweepRecords(ctx, c, p.env, p.cfg, vm, true, p.log)
	res.Released = append(res.Released, done...)
	if err != nil {
		return "", perr(hostplugin.CodeUnavailable, err)
	}
	return jsonString(res)
}
