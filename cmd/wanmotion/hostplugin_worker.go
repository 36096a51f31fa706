package main

// The detached controller the plugin's migrate starts: it reads its job on
// stdin, adopts the plugin's xapi task (engine Request.TaskRef) and runs
// the migration with the engine; the task carries its progress and outcome
// (XenCenter shows it). When anything fails before the engine can finish
// the task itself, the task is failed here with error_info [code, message].

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/engine/xapiadapt"
	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi"
)

// runPluginWorker is the controller's main; its stderr is the log file.
func runPluginWorker(ctx context.Context, id string, stdin io.Reader, stderr io.Writer) int {
	var job pluginJob
	if err := json.NewDecoder(io.LimitReader(stdin, 1<<20)).Decode(&job); err != nil || job.ID != id || job.Task == "" {
		fmt.Fprintf(stderr, "wanmotion controller %s: no valid job on stdin: %v\n", id, err)
		return 1
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "wanmotion-controller", Level: hclog.LevelFromString(job.Config.LogLevel),
		Output: stderr}).With("migration_id", job.ID)
	log.Info("controller started", "task", job.Task, "vm_uuid", job.VMUUID)
	src, release, err := workerSource(ctx, job, log)
	if err != nil {
		log.Error("cannot reach this pool; the task stays pending", "error", err)
		return 1
	}
	defer release()
	err = runJob(ctx, job, src, stderr, log)
	if st, info := failTask(context.WithoutCancel(ctx), src, job.Task, err); st != "" {
		releaseFailedTask(context.WithoutCancel(ctx), job, src, st, info, log)
	}
	if err != nil {
		log.Error("migration failed", "error", err)
		return 1
	}
	log.Info("migration done")
	return 0
}

// releaseFailedTask handles a task this controller failed itself because
// the engine never ran (no checkpoint): the outcome goes into the
// migration's record (status answers from it once the task is gone), then
// the task lingers (task_linger) and is destroyed, as the engine does with
// the tasks it finishes. A migration with a checkpoint keeps its task: a
// resume continues on it.
func releaseFailedTask(ctx context.Context, job pluginJob, src *xapi.Client, st xapi.TaskStatus, info []string, log hclog.Logger) {
	store, err := engine.NewFileStore(checkpointDir(job.Config))
	if err != nil {
		return
	}
	if _, err := store.Load(ctx, job.ID); !errors.Is(err, engine.ErrNotFound) {
		return
	}
	var rec migrationRecord
	for i := 0; ; i++ { // the plugin writes the record just after starting us
		if rec, err = loadRecord(job.Config, job.ID); err == nil || i == 50 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err != nil {
		log.Warn("no migration record; the task is kept", "error", err)
		return
	}
	rec.FinalStatus, rec.FinalErrorInfo = string(st), info
	if err := saveRecord(job.Config, rec); err != nil {
		log.Warn("cannot record the outcome; the task is kept", "error", err)
		return
	}
	if job.Config.TaskLinger < 0 {
		return
	}
	tr, err := src.TaskGetRecord(ctx, xapi.TaskRef(job.Task))
	if err != nil || tr.OtherConfig[engine.TaskOwnerKey] != engine.TaskOwnerController {
		return
	}
	time.Sleep(job.Config.TaskLinger)
	if err := src.TaskDestroy(ctx, xapi.TaskRef(job.Task)); err != nil {
		log.Warn("could not destroy the task; xapi's task gc removes it later", "task", job.Task, "error", err)
		return
	}
	log.Info("task destroyed", "task", job.Task)
}

// workerSource is the controller's client of its own pool: a session of
// its own (local superuser over the socket) on a real host, else the
// caller's session, borrowed (the caller must keep it open while the
// migration runs).
func workerSource(ctx context.Context, job pluginJob, log hclog.Logger) (*xapi.Client, func(), error) {
	pw, err := job.Config.LocalPassword()
	if err == nil && (!job.Env.Sim || job.Config.LocalPasswordFile != "") {
		c, lerr := job.Env.LocalLogin(ctx, pw, log)
		if lerr == nil {
			return c, func() { _ = c.Close(context.WithoutCancel(ctx)) }, nil
		}
		err = lerr
	}
	if err != nil {
		log.Warn("no session of its own; using the caller's session (keep it open until the task ends)", "error", err)
	}
	c, err := job.Env.Client(job.Session, log)
	if err != nil {
		return nil, nil, err
	}
	return c, func() { c.Forget(); _ = c.Close(context.WithoutCancel(ctx)) }, nil
}

func runJob(ctx context.Context, job pluginJob, src *xapi.Client, stderr io.Writer, log hclog.Logger) error {
	if job.Resume {
		return resumeJob(ctx, job, src, stderr, log)
	}
	if rec, err := src.TaskGetRecord(ctx, xapi.TaskRef(job.Task)); err == nil && rec.CancelRequested() {
		return fmt.Errorf("%w before it started", engine.ErrCancelled)
	}
	args := map[string]string{argDestPassword: job.DestPassword}
	for k, v := range job.Args {
		args[k] = v
	}
	f, o, err := migrateArgs(args)
	if err != nil {
		return err
	}
	f.id = job.ID
	pc := &pluginCall{env: job.Env, cfg: job.Config, log: log}
	dst, err := connectDest(ctx, f, job.DestPassword, pc)
	if err != nil {
		return err
	}
	defer func() { _ = dst.Close(context.WithoutCancel(ctx)) }()
	m := &migration{f: f, overrides: o, stdout: io.Discard, stderr: stderr}
	req, err := m.request(ctx, xapiadapt.NewPool(src, log), xapiadapt.NewPool(dst, log))
	if err != nil {
		return err
	}
	req.MigrationID, req.TaskRef = job.ID, job.Task
	dir := checkpointDir(job.Config)
	store, err := engine.NewFileStore(dir)
	if err != nil {
		return err
	}
	from := job.Env.PoolURL
	if from == "" {
		from = xapi.SocketURL(job.Env.Socket)
	}
	if err := saveConnInfo(dir, job.ID, connInfo{From: from, To: f.to, ToUser: f.toUser, Insecure: f.tls.insecure,
		CAFile: f.tls.caFile, Thumbprints: f.tls.thumbprints, PluginDir: job.Config.PluginDir}); err != nil {
		log.Warn("cannot save the connection details", "error", err)
	}
	return driveJob(ctx, job, src, dst, store, stderr, log, func(rctx context.Context, eng *engine.Engine) (engine.Report, error) {
		return eng.Run(rctx, req)
	})
}

// resumeJob continues a migration from its checkpoint (the plugin's
// resume): the destination from the recorded arguments and the new
// password, the settings and state from the checkpoint.
func resumeJob(ctx context.Context, job pluginJob, src *xapi.Client, stderr io.Writer, log hclog.Logger) error {
	args := map[string]string{argDestPassword: job.DestPassword}
	for k, v := range job.Args {
		args[k] = v
	}
	f, _, err := migrateArgs(args)
	if err != nil {
		return err
	}
	pc := &pluginCall{env: job.Env, cfg: job.Config, log: log}
	dst, err := connectDest(ctx, f, job.DestPassword, pc)
	if err != nil {
		return err
	}
	defer func() { _ = dst.Close(context.WithoutCancel(ctx)) }()
	store, err := engine.NewFileStore(checkpointDir(job.Config))
	if err != nil {
		return err
	}
	log.Info("resuming from the checkpoint")
	return driveJob(ctx, job, src, dst, store, stderr, log, func(rctx context.Context, eng *engine.Engine) (engine.Report, error) {
		return eng.Resume(rctx, job.ID)
	})
}

// driveJob builds the plugin controller's engine and runs do with it. The
// agents start on the VM's resident host and on the destination host
// through their pools' host plugin (agent-start); their backends use that
// host's local xapi socket (the simulator's hosts share the pools' URLs
// instead).
func driveJob(ctx context.Context, job pluginJob, src, dst *xapi.Client, store engine.Store, stderr io.Writer, log hclog.Logger,
	do func(context.Context, *engine.Engine) (engine.Report, error)) error {
	sim := isSimulator(ctx, dst)
	eng, cleanup, err := buildEngine(ctx, engineOpts{Source: src, Dest: dst, Store: store, PluginDir: job.Config.PluginDir,
		StateDir: checkpointDir(job.Config), Logger: log, Simulator: sim, HostXAPI: !sim, TaskLinger: job.Config.TaskLinger,
		Launcher: &hostplugin.PluginLauncher{Source: src, Dest: dst, HostListen: true, Logger: log}})
	if err != nil {
		return fmt.Errorf("build the engine: %w", err)
	}
	defer cleanup()
	rep, err := runWithSignals(ctx, eng, job.ID, stderr, func(rctx context.Context) (engine.Report, error) {
		return do(rctx, eng)
	})
	if rep.MigrationID != "" {
		_ = writeReport(stderr, rep)
	}
	return err
}
