package main

// Plugin functions migrate, plan, status and cancel.

import (
	"context"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi"
)

// Arguments of migrate and plan (host.call_plugin's args map).
const (
	argVM             = "vm"
	argDestURL        = "dest_url"
	argDestUser       = "dest_user"
	argDestPassword   = "dest_password"
	argNetworkMap     = "network_map"     // comma-separated SRC=DST
	argDestThumbprint = "dest_thumbprint" // comma-separated
	argDestInsecure   = "dest_insecure"
	argSkipAssert     = "skip_assert"
	argTask           = "task"
	argID             = "id"
)

// migrateArgFlags maps single-valued arguments onto `wanmotion migrate`
// flags; the plugin validates them with the CLI's own parser.
var migrateArgFlags = map[string]string{
	argVM: "vm", argDestURL: "to", argDestUser: "to-user", "dest_sr": "dest-sr", "dest_host": "dest-host",
	"storage": "storage", "network": "network", "bandwidth": "bandwidth", "compression": "compression",
	"rtt": "rtt", "streams": "streams", "downtime_target": "downtime-target", "policy": "policy", "throttle_max": "throttle-max",
	argID: "id", "gateway_listen": "gateway-listen", "gateway_advertise": "gateway-advertise", "dest_ca_file": "ca-file",
}

func migrateArgNames() []string {
	names := []string{argDestPassword, argNetworkMap, argDestThumbprint, argDestInsecure, argSkipAssert}
	for k := range migrateArgFlags {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// sourcePlaceholder stands for this pool in the CLI parser (which wants a
// --from URL); the plugin always talks to its own pool.
const sourcePlaceholder = "http://wanmotion-source.invalid"

func parseBool(name, v string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "", "false", "0", "no":
		return false, nil
	case "true", "1", "yes":
		return true, nil
	}
	return false, invalidArg("%s %q: want true or false", name, v)
}

// migrateArgs checks migrate/plan arguments and turns them into the CLI's
// flags and overrides. The password is not part of them.
func migrateArgs(args map[string]string) (*migrateFlags, engine.Overrides, error) {
	var o engine.Overrides
	allowed := migrateArgNames()
	for k := range args {
		if !contains(allowed, k) {
			return nil, o, invalidArg("unknown argument %q (arguments: %s)", k, strings.Join(allowed, ", "))
		}
	}
	for _, req := range []string{argVM, argDestURL, argDestPassword} {
		if strings.TrimSpace(args[req]) == "" {
			return nil, o, invalidArg("%s is required", req)
		}
	}
	cli := []string{"--from", sourcePlaceholder}
	keys := make([]string, 0, len(args))
	for k := range args {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := args[k]
		if fl, ok := migrateArgFlags[k]; ok {
			cli = append(cli, "--"+fl+"="+v)
		}
	}
	for _, m := range splitList(args[argNetworkMap]) {
		cli = append(cli, "--network-map="+m)
	}
	for _, tp := range splitList(args[argDestThumbprint]) {
		cli = append(cli, "--thumbprint="+tp)
	}
	for _, b := range []struct{ arg, flag string }{{argDestInsecure, "insecure"}, {argSkipAssert, "skip-assert"}} {
		on, err := parseBool(b.arg, args[b.arg])
		if err != nil {
			return nil, o, err
		}
		if on {
			cli = append(cli, "--"+b.flag)
		}
	}
	f, o, err := parseMigrateFlags(cli, io.Discard)
	if err != nil {
		msg := flagsToArgs.Replace(err.Error())
		return nil, o, perr(hostplugin.CodeInvalidArgument, fmt.Errorf("%w: %s", hostplugin.ErrInvalidArgument, msg))
	}
	return f, o, nil
}

// flagsToArgs rewrites the CLI parser's flag names into argument names
// (longest flag first, so --to-user is not read as --to).
var flagsToArgs = func() *strings.Replacer {
	type pair struct{ flag, arg string }
	pairs := []pair{{"--from and --to are the same pool", argDestURL + " is this pool"},
		{"--network-map", argNetworkMap}, {"--thumbprint", argDestThumbprint}, {"--insecure", argDestInsecure},
		{"--skip-assert", argSkipAssert}}
	for a, f := range migrateArgFlags {
		pairs = append(pairs, pair{"--" + f, a})
	}
	sort.Slice(pairs, func(i, j int) bool {
		if len(pairs[i].flag) != len(pairs[j].flag) {
			return len(pairs[i].flag) > len(pairs[j].flag)
		}
		return pairs[i].flag < pairs[j].flag
	})
	var old []string
	for _, p := range pairs {
		old = append(old, p.flag, p.arg)
	}
	return strings.NewReplacer(old...)
}()

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// connectDest logs in to the destination pool.
func connectDest(ctx context.Context, f *migrateFlags, password string, p *pluginCall) (*xapi.Client, error) {
	c, err := connect(ctx, f.to, f.toUser, password, f.tls, p.log)
	if err != nil {
		if errors.Is(err, errUsage) {
			return nil, perr(hostplugin.CodeInvalidArgument, err)
		}
		if xapi.IsCode(err, "SESSION_AUTHENTICATION_FAILED") {
			return nil, perr(hostplugin.CodeInvalidArgument, fmt.Errorf("destination pool: %w", err))
		}
		return nil, perr(hostplugin.CodeUnavailable, fmt.Errorf("destination pool: %w", err))
	}
	return c, nil
}

// checkBackends refuses backends named in the arguments that are not
// installed on this host.
func (p *pluginCall) checkBackends(o engine.Overrides) error {
	inst, err := installedBackends(p.cfg.PluginDir)
	if err != nil {
		return err
	}
	var st, nw string
	if o.Storage != nil {
		st = *o.Storage
	}
	if o.Network != nil {
		nw = *o.Network
	}
	return checkBackendNames(inst, o.Storage != nil, st, o.Network != nil, nw)
}

// migrationRecord is <state>/plugin/<id>.json: what status and cancel
// need to find a migration started on this host (no secrets).
type migrationRecord struct {
	MigrationID string    `json:"migration_id"`
	Task        string    `json:"task"`
	VMUUID      string    `json:"vm_uuid"`
	DestURL     string    `json:"dest_url"`
	PID         int       `json:"pid"`
	Log         string    `json:"log"`
	Started     time.Time `json:"started"`
	// Args are migrate's arguments without dest_password (resume needs
	// them to reach the destination again).
	Args map[string]string `json:"args,omitempty"`
	// FinalStatus and FinalErrorInfo are what the controller set on the
	// task when it failed it before the engine ran (no checkpoint): status
	// answers from them once the task is destroyed.
	FinalStatus    string   `json:"final_status,omitempty"`
	FinalErrorInfo []string `json:"final_error_info,omitempty"`
}

func recordDir(cfg hostplugin.Config) string     { return filepath.Join(cfg.StateDir, "plugin") }
func checkpointDir(cfg hostplugin.Config) string { return filepath.Join(cfg.StateDir, "migrations") }

func saveRecord(cfg hostplugin.Config, r migrationRecord) error {
	if err := os.MkdirAll(recordDir(cfg), 0o700); err != nil {
		return err
	}
	b, _ := json.MarshalIndent(r, "", "  ")
	return os.WriteFile(filepath.Join(recordDir(cfg), r.MigrationID+".json"), append(b, '\n'), 0o600)
}

func loadRecord(cfg hostplugin.Config, id string) (migrationRecord, error) {
	var r migrationRecord
	b, err := os.ReadFile(filepath.Join(recordDir(cfg), id+".json"))
	if err != nil {
		return r, err
	}
	err = json.Unmarshal(b, &r)
	return r, err
}

// findRecord returns the record of task (ok false when this host has none).
func findRecord(cfg hostplugin.Config, task string) (migrationRecord, bool) {
	ents, _ := os.ReadDir(recordDir(cfg))
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok {
			continue
		}
		if r, err := loadRecord(cfg, id); err == nil && r.Task == task {
			return r, true
		}
	}
	return migrationRecord{}, false
}

// pluginJob is what the detached controller reads on its stdin. It holds
// the caller's session and the destination password, so it never touches
// the disk.
type pluginJob struct {
	ID           string            `json:"id"`
	Task         string            `json:"task"`
	VMUUID       string            `json:"vm_uuid"`
	Args         map[string]string `json:"args"` // without dest_password
	DestPassword string            `json:"dest_password"`
	Session      string            `json:"session"`
	Env          hostplugin.Env    `json:"env"`
	Config       hostplugin.Config `json:"config"`
	// Resume: continue the migration from its checkpoint (engine Resume)
	// instead of starting it.
	Resume bool `json:"resume,omitempty"`
}

func (p *pluginCall) migrate(ctx context.Context) (string, error) {
	f, o, err := migrateArgs(p.call.Args)
	if err != nil {
		return "", err
	}
	if err := p.checkBackends(o); err != nil {
		return "", err
	}
	src, closeSrc, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeSrc()
	vm, err := xapiadapt.NewPool(src, p.log).FindVM(ctx, f.vm)
	if err != nil {
		return "", fmt.Errorf("vm: %w", err)
	}
	dst, err := connectDest(ctx, f, p.call.Args[argDestPassword], p)
	if err != nil {
		return "", err
	}
	_ = dst.Close(context.WithoutCancel(ctx))

	id := f.id
	if id == "" {
		id = engine.NewMigrationID()
	}
	if _, err := loadRecord(p.cfg, id); err == nil {
		return "", invalidArg("id %q: a migration with this id was already started on this host", id)
	}
	task, err := src.TaskCreate(ctx, engine.TaskLabel, "wanmotion WAN migration "+id)
	if err != nil {
		return "", fmt.Errorf("task.create: %w", err)
	}
	// the controller's task: its engine destroys it once finished
	// (task_linger), after the marker says it is ours
	for _, kv := range [][2]string{{"applies_to", string(vm.Ref)}, {engine.TaskOwnerKey, engine.TaskOwnerController}} {
		err := src.TaskRemoveFromOtherConfig(ctx, task, kv[0])
		if err == nil {
			err = src.TaskAddToOtherConfig(ctx, task, kv[0], kv[1])
		}
		if err != nil {
			p.log.Warn("cannot label the task", "key", kv[0], "error", err)
		}
	}
	job := pluginJob{ID: id, Task: string(task), VMUUID: vm.UUID, Args: map[string]string{}, DestPassword: p.call.Args[argDestPassword],
		Session: p.call.Session, Env: p.env, Config: p.cfg}
	for k, v := range p.call.Args {
		if k != argDestPassword {
			job.Args[k] = v
		}
	}
	rec, err := p.startWorker(job)
	if err != nil {
		// the caller gets the error, never the task: it can go at once
		if st, _ := failTask(context.WithoutCancel(ctx), src, string(task), err); st != "" {
			_ = src.TaskDestroy(context.WithoutCancel(ctx), task)
		}
		return "", err
	}
	p.log.Info("migration started", "migration_id", id, "task", string(task), "vm_uuid", vm.UUID, "pid", rec.PID)
	return string(task), nil
}

// workerMarker is argv[1] of the detached controller (see hostPluginEntry).
const workerMarker = "__wanmotion-plugin-controller"

// startWorker starts the detached controller (own session, stdin the job,
// stdout and stderr its log) and returns at once.
func (p *pluginCall) startWorker(job pluginJob) (migrationRecord, error) {
	rec := migrationRecord{MigrationID: job.ID, Task: job.Task, VMUUID: job.VMUUID, DestURL: job.Args[argDestURL], Started: time.Now().UTC(),
		Args: job.Args}
	dir := recordDir(p.cfg)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return rec, perr(hostplugin.CodeInternal, fmt.Errorf("state dir: %w", err))
	}
	rec.Log = filepath.Join(dir, job.ID+".log")
	logf, err := os.OpenFile(rec.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return rec, perr(hostplugin.CodeInternal, err)
	}
	defer logf.Close()
	body, err := json.Marshal(job)
	if err != nil {
		return rec, perr(hostplugin.CodeInternal, err)
	}
	cmd := exec.Command(p.binary, workerMarker, job.ID)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH")}
	cmd.Dir = "/"
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	in, err := cmd.StdinPipe()
	if err != nil {
		return rec, perr(hostplugin.CodeInternal, err)
	}
	if err := cmd.Start(); err != nil {
		return rec, perr(hostplugin.CodeInternal, fmt.Errorf("start the controller: %w", err))
	}
	rec.PID = cmd.Process.Pid
	_, werr := in.Write(body)
	cerr := in.Close()
	_ = cmd.Process.Release()
	if werr != nil || cerr != nil {
		return rec, perr(hostplugin.CodeInternal, fmt.Errorf("hand the job to the controller: %w", errors.Join(werr, cerr)))
	}
	if err := saveRecord(p.cfg, rec); err != nil {
		return rec, perr(hostplugin.CodeInternal, err)
	}
	return rec, nil
}

// failTask ends a task that no engine will finish. It returns the status
// and error_info it set (status "" when it left the task alone).
func failTask(ctx context.Context, c *xapi.Client, task string, cause error) (xapi.TaskStatus, []string) {
	if cause == nil {
		return "", nil // the engine finished the task
	}
	ref := xapi.TaskRef(task)
	rec, err := c.TaskGetRecord(ctx, ref)
	if err != nil || rec.Status != xapi.TaskStatusPending {
		return "", nil
	}
	if rec.CancelRequested() || errors.Is(cause, engine.ErrCancelled) {
		info := []string{"TASK_CANCELLED", task}
		_ = c.TaskSetErrorInfo(ctx, ref, info)
		_ = c.TaskSetStatus(ctx, ref, xapi.TaskStatusCancelled)
		return xapi.TaskStatusCancelled, info
	}
	code, params := errorDescription(cause)
	info := append([]string{code}, params...)
	_ = c.TaskSetErrorInfo(ctx, ref, info)
	_ = c.TaskSetStatus(ctx, ref, xapi.TaskStatusFailure)
	return xapi.TaskStatusFailure, info
}

func (p *pluginCall) plan(ctx context.Context) (string, error) {
	f, o, err := migrateArgs(p.call.Args)
	if err != nil {
		return "", err
	}
	if err := p.checkBackends(o); err != nil {
		return "", err
	}
	src, closeSrc, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeSrc()
	dst, err := connectDest(ctx, f, p.call.Args[argDestPassword], p)
	if err != nil {
		return "", err
	}
	defer func() { _ = dst.Close(context.WithoutCancel(ctx)) }()
	m := &migration{f: f, overrides: o, stdout: io.Discard, stderr: io.Discard}
	req, err := m.request(ctx, xapiadapt.NewPool(src, p.log), xapiadapt.NewPool(dst, p.log))
	if err != nil {
		return "", err
	}
	eng, cleanup, err := buildEngine(ctx, engineOpts{Source: src, Dest: dst, Store: engine.NewMemStore(), PluginDir: p.cfg.PluginDir,
		Logger: p.log, DryRun: true})
	if err != nil {
		return "", err
	}
	defer cleanup()
	plan, err := eng.Plan(ctx, req)
	if err != nil {
		return "", err
	}
	return jsonString(planJSON(plan, srNames(ctx, dst, plan)))
}

// pluginStatus is status's and cancel's result.
type pluginStatus struct {
	MigrationID       string   `json:"migration_id,omitempty"`
	Task              string   `json:"task"`
	Label             string   `json:"label"`
	Status            string   `json:"status"`
	Progress          float64  `json:"progress"`
	ErrorInfo         []string `json:"error_info"`
	Result            string   `json:"result"`
	CancelRequested   bool     `json:"cancel_requested"`
	VMUUID            string   `json:"vm_uuid,omitempty"`
	DestURL           string   `json:"dest_url,omitempty"`
	Phase             string   `json:"phase,omitempty"`
	ControllerRunning bool     `json:"controller_running"`
	Log               string   `json:"log,omitempty"`
	// TaskGone: xapi no longer has the task (its GC destroys finished
	// tasks); status, progress, error_info and result come from the
	// migration's checkpoint, as the controller set them on the task.
	TaskGone bool `json:"task_gone,omitempty"`
}

// target resolves the task / id arguments of status and cancel.
func (p *pluginCall) target() (string, migrationRecord, bool, error) {
	if err := p.checkArgs(argTask, argID); err != nil {
		return "", migrationRecord{}, false, err
	}
	task, id := strings.TrimSpace(p.call.Args[argTask]), strings.TrimSpace(p.call.Args[argID])
	switch {
	case task == "" && id == "":
		return "", migrationRecord{}, false, invalidArg("give task (a task ref) or id (a migration id)")
	case task != "" && id != "":
		return "", migrationRecord{}, false, invalidArg("give task or id, not both")
	case id != "":
		if !engine.ValidMigrationID(id) {
			return "", migrationRecord{}, false, invalidArg("id %q: not a migration id", id)
		}
		r, err := loadRecord(p.cfg, id)
		if err != nil {
			return "", r, false, perr(hostplugin.CodeNotFound, fmt.Errorf("no migration %q was started on this host", id))
		}
		return r.Task, r, true, nil
	}
	if !strings.HasPrefix(task, "OpaqueRef:") {
		return "", migrationRecord{}, false, invalidArg("task %q: not a task ref", task)
	}
	r, ok := findRecord(p.cfg, task)
	return task, r, ok, nil
}

func (p *pluginCall) taskStatus(ctx context.Context, c *xapi.Client, task string, r migrationRecord, ok bool) (pluginStatus, error) {
	if ok && engine.ValidMigrationID(r.MigrationID) {
		// a migration resumed after it failed (e.g. in handoff) reports on
		// a fresh task; the record keeps the first one
		if st, err := engine.NewFileStore(checkpointDir(p.cfg)); err == nil {
			if cp, err := st.Load(ctx, r.MigrationID); err == nil && cp.Task != "" && cp.Task != task {
				task = cp.Task
			}
		}
	}
	rec, err := c.TaskGetRecord(ctx, xapi.TaskRef(task))
	if xapi.IsCode(err, xapi.CodeHandleInvalid) {
		if s, found := p.goneTaskStatus(ctx, task, r, ok); found {
			return s, nil
		}
		return pluginStatus{}, perr(hostplugin.CodeNotFound, fmt.Errorf("task %s: %w", task, err))
	}
	if err != nil {
		return pluginStatus{}, err
	}
	s := pluginStatus{Task: task, Label: rec.NameLabel, Status: string(rec.Status), Progress: rec.Progress,
		ErrorInfo: append([]string{}, rec.ErrorInfo...), Result: rec.Result, CancelRequested: rec.CancelRequested()}
	if id, found := strings.CutPrefix(rec.NameDescription, "wanmotion WAN migration "); found {
		s.MigrationID = id
	}
	if ok {
		s.MigrationID, s.VMUUID, s.DestURL, s.Log = r.MigrationID, r.VMUUID, r.DestURL, r.Log
		s.ControllerRunning = processRunning(r.PID, r.MigrationID)
	}
	if s.MigrationID != "" && engine.ValidMigrationID(s.MigrationID) {
		if st, err := engine.NewFileStore(checkpointDir(p.cfg)); err == nil {
			if cp, err := st.Load(ctx, s.MigrationID); err == nil {
				s.Phase = cp.Phase.String()
			}
		}
	}
	return s, nil
}

// goneTaskStatus is the status of a migration started on this host whose
// finished task xapi has destroyed (its GC destroys a task finished with
// task.set_status at its next pass: finished stays the epoch). The
// checkpoint says how the controller finished the task (engine finish).
func (p *pluginCall) goneTaskStatus(ctx context.Context, task string, r migrationRecord, ok bool) (pluginStatus, bool) {
	if !ok || !engine.ValidMigrationID(r.MigrationID) {
		return pluginStatus{}, false
	}
	st, err := engine.NewFileStore(checkpointDir(p.cfg))
	if err != nil {
		return pluginStatus{}, false
	}
	s := pluginStatus{MigrationID: r.MigrationID, Task: task, Label: engine.TaskLabel, ErrorInfo: []string{},
		VMUUID: r.VMUUID, DestURL: r.DestURL, Log: r.Log,
		ControllerRunning: processRunning(r.PID, r.MigrationID), TaskGone: true}
	cp, err := st.Load(ctx, r.MigrationID)
	if errors.Is(err, engine.ErrNotFound) && r.FinalStatus != "" {
		// failed by the controller before the engine ran
		s.Status, s.ErrorInfo = r.FinalStatus, append(s.ErrorInfo, r.FinalErrorInfo...)
		return s, true
	}
	if err != nil || !cp.TaskFinished || cp.Task != task {
		return pluginStatus{}, false
	}
	s.Phase = cp.Phase.String()
	switch cp.Phase {
	case engine.PhaseDone:
		var b strings.Builder
		_ = xml.EscapeText(&b, []byte(cp.DestVM))
		s.Status, s.Progress, s.Result = string(xapi.TaskStatusSuccess), 1, "<value>"+b.String()+"</value>"
	case engine.PhaseRolledBack, engine.PhaseFailed:
		s.Status = string(xapi.TaskStatusFailure)
		if cp.Phase == engine.PhaseRolledBack && cp.Cancelled {
			s.Status = string(xapi.TaskStatusCancelled)
		}
		s.ErrorInfo = append(s.ErrorInfo, cp.ErrorInfo...)
	default:
		return pluginStatus{}, false
	}
	return s, true
}

// processRunning reports whether pid is the controller of id.
func processRunning(pid int, id string) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(b), workerMarker) || !strings.Contains(string(b), id) {
		return false
	}
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	if i := strings.LastIndexByte(string(st), ')'); i >= 0 && i+2 < len(st) {
		return st[i+2] != 'Z'
	}
	return true
}

func (p *pluginCall) status(ctx context.Context) (string, error) {
	task, r, ok, err := p.target()
	if err != nil {
		return "", err
	}
	c, closeFn, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeFn()
	s, err := p.taskStatus(ctx, c, task, r, ok)
	if err != nil {
		return "", err
	}
	return jsonString(s)
}

// cancel calls task.cancel on a pending migration task (the engine sees it
// in current_operations and rolls back if before handoff). A finished task
// is reported as it is, with cancel_requested false.
func (p *pluginCall) cancel(ctx context.Context) (string, error) {
	task, r, ok, err := p.target()
	if err != nil {
		return "", err
	}
	c, closeFn, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeFn()
	s, err := p.taskStatus(ctx, c, task, r, ok)
	if err != nil {
		return "", err
	}
	if s.Status == string(xapi.TaskStatusPending) && !s.CancelRequested {
		if err := c.TaskCancel(ctx, xapi.TaskRef(s.Task)); err != nil && !xapi.IsCode(err, "OPERATION_NOT_ALLOWED") {
			return "", fmt.Errorf("task.cancel: %w", err)
		}
		if s, err = p.taskStatus(ctx, c, task, r, ok); err != nil {
			return "", err
		}
		p.log.Info("cancel requested", "task", task, "migration_id", s.MigrationID)
	}
	return jsonString(s)
}

// resume starts a new detached controller for a migration started on this
// host whose controller is gone (host reboot, killed): it continues from
// the checkpoint (engine Resume), re-attaching to the site agents that
// still run and the xapi task. Arguments: id or task, and dest_password
// (never stored). It returns the status object; a migration already
// finished (done, rolled back) is reported as it is.
func (p *pluginCall) resume(ctx context.Context) (string, error) {
	if err := p.checkArgs(argTask, argID, argDestPassword); err != nil {
		return "", err
	}
	pw := p.call.Args[argDestPassword]
	targetArgs := map[string]string{}
	for _, k := range []string{argTask, argID} {
		if v, ok := p.call.Args[k]; ok {
			targetArgs[k] = v
		}
	}
	tp := *p
	tp.call.Args = targetArgs
	task, r, ok, err := tp.target()
	if err != nil {
		return "", err
	}
	if !ok || r.Args == nil {
		return "", perr(hostplugin.CodeNotFound, fmt.Errorf("task %s: no migration started on this host can be resumed from here", task))
	}
	if processRunning(r.PID, r.MigrationID) {
		return "", invalidArg("migration %s: its controller (pid %d) still runs", r.MigrationID, r.PID)
	}
	store, err := engine.NewFileStore(checkpointDir(p.cfg))
	if err != nil {
		return "", perr(hostplugin.CodeInternal, err)
	}
	cp, err := store.Load(ctx, r.MigrationID)
	if err != nil {
		return "", perr(hostplugin.CodeNotFound, fmt.Errorf("migration %s has no checkpoint: %w", r.MigrationID, err))
	}
	c, closeFn, err := p.pool()
	if err != nil {
		return "", err
	}
	defer closeFn()
	if cp.Phase == engine.PhaseDone || cp.Phase == engine.PhaseRolledBack {
		s, err := p.taskStatus(ctx, c, task, r, ok)
		if err != nil {
			return "", err
		}
		return jsonString(s)
	}
	if strings.TrimSpace(pw) == "" {
		return "", invalidArg("%s is required", argDestPassword)
	}
	args := map[string]string{argDestPassword: pw}
	for k, v := range r.Args {
		args[k] = v
	}
	f, _, err := migrateArgs(args)
	if err != nil {
		return "", err
	}
	dst, err := connectDest(ctx, f, pw, p)
	if err != nil {
		return "", err
	}
	_ = dst.Close(context.WithoutCancel(ctx))
	job := pluginJob{ID: r.MigrationID, Task: r.Task, VMUUID: r.VMUUID, Args: r.Args, DestPassword: pw,
		Session: p.call.Session, Env: p.env, Config: p.cfg, Resume: true}
	nr, err := p.startWorker(job)
	if err != nil {
		return "", err
	}
	p.log.Info("migration resumed", "migration_id", r.MigrationID, "task", r.Task, "phase", cp.Phase.String(), "pid", nr.PID)
	s, err := p.taskStatus(ctx, c, task, nr, true)
	if err != nil {
		return "", err
	}
	return jsonString(s)
}
