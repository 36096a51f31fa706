// Package engine is wanmotion's migration engine: the phases of a WAN live
// migration (Plan, Prepare, Seed, Handoff, Switch, Verify, Cleanup), their
// transition table, checkpoints after every step, resume after a crash,
// rollback before Handoff, the planner, the Seed convergence controller,
// progress and cancel through a xapi task, and the final report.
//
// The engine drives everything through the small interfaces in deps.go;
// adapters bind them to the xapi client, the site agents, the backends and
// the WAN gateway.
package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// TaskLabel is the name_label of the engine's xapi task: XenCenter shows a
// task only when its label is a VM operation it knows.
const TaskLabel = "VM.migrate_send"

// TaskOwnerKey in a task's other_config marks a task a wanmotion controller
// created (value TaskOwnerController): the engine sets it on the tasks it
// creates, the host plugin on the task it creates for its controller. Only
// such tasks are destroyed when the migration stops (Deps.TaskLinger); a
// task adopted from anyone else (Request.TaskRef) is left to its creator.
const (
	TaskOwnerKey        = "wanmotion:owner"
	TaskOwnerController = "controller"
)

// Progress is sent to Deps.Observe while a migration runs.
type Progress struct {
	MigrationID string
	Phase       Phase
	Overall     float64 // 0..1 across all phases (what the xapi task shows)
	Round       int     // seed round
	BytesDone   int64   // within the current round
	BytesTotal  int64
	BytesOnWire int64 // cumulative over the seed rounds
	// ETA is the planned time still to go: (1 − Overall) × the planned total.
	ETA     time.Duration
	Message string
}

// Deps are the engine's collaborators. Source, Dest, Tasks, Storage,
// Gateway, Agents, Catalog and Store are required; Network is required
// unless every migration uses the "none" network backend; the rest are
// optional.
type Deps struct {
	Source  SourcePool
	Dest    DestPool
	Tasks   Tasks
	Storage StorageBackend
	Network NetworkBackend
	Gateway Gateway
	Agents  Agents
	Catalog Catalog
	Store   Store

	Throttle  GuestThrottle    // optional: needed by convergence_policy throttle
	Integrity IntegrityChecker // optional: integrity "skipped" without it
	Pause     PauseMeter       // optional: guest pause is estimated without it

	Logger hclog.Logger     // default: null logger
	Now    func() time.Time // default: time.Now
	// PollInterval is the period of status polls (sync, xapi task, cancel).
	// Default 1s.
	PollInterval time.Duration
	// Observe, if set, receives progress updates (CLI display).
	Observe func(Progress)
	// TaskLinger is how long the task stays after the engine set its final
	// status, result and error_info before the engine destroys it (when
	// the Tasks adapter implements TaskDestroyer and the task carries
	// TaskOwnerKey = TaskOwnerController), so clients following it read
	// the outcome first. 0 destroys it at once; negative never. The linger
	// runs after the migration's lock is released; Run/Resume/Abort return
	// after it. A cancelled ctx cuts it short (the task is still destroyed).
	TaskLinger time.Duration
}

// Request starts a migration.
type Request struct {
	MigrationID string // optional; generated when empty
	VMUUID      string
	DestHost    string // destination host ref; default the destination pool coordinator
	DestSR      string // destination SR ref for all disks; default pool.default_SR
	// SRMap overrides DestSR per disk: key is a source VDI uuid or a source SR ref.
	SRMap map[string]string
	// NetworkMap maps source network refs to destination network refs; the
	// key "*" is the default for unmapped networks.
	NetworkMap map[string]string
	Overrides  Overrides
	// Link is the measured (or configured) WAN; zero bandwidth falls back to
	// the bandwidth cap, then to an assumed 1 Gbit/s.
	Link Link
	// GuestWriteRate is the guest's expected disk write rate (bytes/s, 0 if unknown).
	GuestWriteRate int64
	// TaskRef adopts an existing xapi task (created by the host-plugin
	// entry) instead of creating one.
	TaskRef string
	// SkipAssert skips VM.assert_can_migrate (in Plan and Handoff).
	SkipAssert bool
	// MigrateOptions are passed to VM.migrate_send (e.g. "force": "true").
	MigrateOptions map[string]string
}

// Engine runs migrations. One Engine may run several at once.
type Engine struct {
	d       Deps
	mu      sync.Mutex
	running map[string]*atomic.Bool
}

// New checks the dependencies and returns an engine.
func New(d Deps) (*Engine, error) {
	missing := []string{}
	if d.Source == nil {
		missing = append(missing, "Source")
	}
	if d.Dest == nil {
		missing = append(missing, "Dest")
	}
	if d.Tasks == nil {
		missing = append(missing, "Tasks")
	}
	if d.Storage == nil {
		missing = append(missing, "Storage")
	}
	if d.Gateway == nil {
		missing = append(missing, "Gateway")
	}
	if d.Agents == nil {
		missing = append(missing, "Agents")
	}
	if d.Catalog == nil {
		missing = append(missing, "Catalog")
	}
	if d.Store == nil {
		missing = append(missing, "Store")
	}
	if len(missing) > 0 {
		return nil, fmt.Errorf("engine: missing dependencies %v", missing)
	}
	if d.Logger == nil {
		d.Logger = hclog.NewNullLogger()
	}
	if d.Now == nil {
		d.Now = time.Now
	}
	if d.PollInterval <= 0 {
		d.PollInterval = time.Second
	}
	return &Engine{d: d, running: map[string]*atomic.Bool{}}, nil
}

// NewMigrationID returns a fresh id ("wm-" and 12 hex digits).
func NewMigrationID() string {
	var b [6]byte
	_, _ = rand.Read(b[:])
	return "wm-" + hex.EncodeToString(b[:])
}

func newUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

func requestState(req Request) RequestState {
	return RequestState{
		VMUUID: req.VMUUID, DestHost: req.DestHost, DestSR: req.DestSR,
		SRMap: req.SRMap, NetworkMap: req.NetworkMap,
		LinkBytesPerSec: req.Link.BandwidthBytesPerSec, RTTNanos: int64(req.Link.RTT),
		GuestWriteRate: req.GuestWriteRate, SkipAssert: req.SkipAssert,
		MigrateOptions: req.MigrateOptions, Overrides: req.Overrides, TaskRef: req.TaskRef,
	}
}

// Cancel asks a migration running in this process to stop: before Handoff
// it rolls back; from Handoff on the request is logged and ignored. It has
// the same effect as xapi's task.cancel on the migration's task. Returns
// false if the migration is not running here.
func (e *Engine) Cancel(migrationID string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	f, ok := e.running[migrationID]
	if ok {
		f.Store(true)
	}
	return ok
}

func (e *Engine) register(id string) (*atomic.Bool, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.running[id]; ok {
		return nil, fmt.Errorf("migration %s is already running in this process", id)
	}
	f := new(atomic.Bool)
	e.running[id] = f
	return f, nil
}

func (e *Engine) unregister(id string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.running, id)
}

// Run starts a new migration and runs it to Done, RolledBack or Failed.
// The report is returned in every case where a checkpoint exists. The error
// is nil only for Done; it wraps ErrCancelled for a cancelled migration,
// ErrInterrupted when the engine stopped without deciding (resume later),
// or the cause of a failure.
func (e *Engine) Run(ctx context.Context, req Request) (Report, error) {
	if req.VMUUID == "" {
		return Report{}, fmt.Errorf("%w: no vm uuid", ErrConfig)
	}
	id := req.MigrationID
	if id == "" {
		id = NewMigrationID()
	}
	if !ValidMigrationID(id) {
		return Report{}, fmt.Errorf("%w: invalid migration id %q", ErrConfig, id)
	}
	now := e.d.Now().UnixNano()
	cp := &Checkpoint{
		Version: CheckpointVersion, MigrationID: id, Phase: PhasePlan,
		CreatedUnixNano: now, Request: requestState(req), Timings: map[string]float64{},
	}
	return e.drive(ctx, cp, false)
}

// Resume continues a migration from its checkpoint: after a controller
// crash, an interruption, or (retrying the failed phase) from Failed. A
// finished migration (Done, RolledBack) returns its report and the same
// kind of error Run returned (nil, ErrCancelled, or the failure).
func (e *Engine) Resume(ctx context.Context, migrationID string) (Report, error) {
	cp, err := e.d.Store.Load(ctx, migrationID)
	if err != nil {
		return Report{}, err
	}
	switch cp.Phase {
	case PhaseDone, PhaseRolledBack:
		if cp.TaskFinished || cp.Task == "" {
			return BuildReport(cp), outcome(cp, nil)
		}
		// stopped before the task was completed: drive completes it
	case PhaseFailed:
		if !CanTransition(PhaseFailed, cp.FailedIn) {
			return BuildReport(cp), fmt.Errorf("%w: failed in %s", ErrNotResumable, cp.FailedIn)
		}
		cp.Phase = cp.FailedIn
		cp.Error, cp.ErrorInfo = "", nil
		cp.TaskFinished = false
		if cp.TaskCreated || cp.Task != "" {
			// the old task is finished; progress goes to a fresh one
			cp.Task, cp.TaskCreated, cp.TaskLabelled = "", false, false
			cp.Request.TaskRef = ""
		}
	}
	return e.drive(ctx, cp, true)
}

// Abort rolls back a migration that Failed while the VM still runs at the
// source (a failed Handoff, or a failed rollback). It refuses otherwise.
func (e *Engine) Abort(ctx context.Context, migrationID string) (Report, error) {
	cp, err := e.d.Store.Load(ctx, migrationID)
	if err != nil {
		return Report{}, err
	}
	if cp.Phase != PhaseFailed || (cp.FailedIn != PhaseHandoff && cp.FailedIn != PhaseRollingBack) {
		return BuildReport(cp), fmt.Errorf("%w: abort needs a migration that failed in handoff or rollback (this one is %s, failed in %s)", ErrNotResumable, cp.Phase, cp.FailedIn)
	}
	vm, err := e.d.Source.VMByUUID(ctx, cp.Request.VMUUID)
	if err != nil || vm.PowerState != "Running" {
		return BuildReport(cp), fmt.Errorf("%w: the vm does not run at the source; refusing to roll back (%v)", ErrVMLocation, err)
	}
	if task := migrateSendTask(vm); task != "" {
		return BuildReport(cp), fmt.Errorf("%w: VM.migrate_send task %s is moving the vm; refusing to roll back (resume follows the task)", ErrVMLocation, task)
	}
	cp.Phase = PhaseRollingBack
	cp.Cancelled = true
	cp.TaskFinished = false
	cp.Task, cp.TaskCreated, cp.TaskLabelled, cp.Request.TaskRef = "", false, false, ""
	return e.drive(ctx, cp, true)
}

// List returns the reports of all stored migrations.
func (e *Engine) List(ctx context.Context) ([]Report, error) {
	ids, err := e.d.Store.List(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]Report, 0, len(ids))
	for _, id := range ids {
		cp, err := e.d.Store.Load(ctx, id)
		if err != nil {
			e.d.Logger.Warn("unreadable checkpoint", "migration_id", id, "error", err)
			continue
		}
		out = append(out, BuildReport(cp))
	}
	return out, nil
}

// Status loads a migration's report from its checkpoint.
func (e *Engine) Status(ctx context.Context, migrationID string) (Report, error) {
	cp, err := e.d.Store.Load(ctx, migrationID)
	if err != nil {
		return Report{}, err
	}
	return BuildReport(cp), nil
}

func (e *Engine) drive(ctx context.Context, cp *Checkpoint, resumed bool) (Report, error) {
	// A new migration that does not start has no report: the checkpoint
	// it would report on belongs to someone else (or to nobody).
	notStarted := func() Report {
		if resumed {
			return BuildReport(cp)
		}
		return Report{}
	}
	// runs last, after the lock is released: linger, then destroy the task
	var release func()
	defer func() {
		if release != nil {
			release()
		}
	}()
	flag, err := e.register(cp.MigrationID)
	if err != nil {
		return notStarted(), err
	}
	defer e.unregister(cp.MigrationID)
	if l, ok := e.d.Store.(Locker); ok {
		unlock, err := l.Lock(ctx, cp.MigrationID)
		if err != nil {
			return notStarted(), err
		}
		defer unlock()
	}
	if !resumed {
		// checked under the lock: another process may have started the
		// same id since; its checkpoint must not be overwritten.
		if _, err := e.d.Store.Load(ctx, cp.MigrationID); err == nil {
			return Report{}, fmt.Errorf("%w: %s (use resume, or another --id)", ErrExists, cp.MigrationID)
		} else if !errors.Is(err, ErrNotFound) {
			return Report{}, err
		}
	}
	r := &run{
		e: e, d: &e.d, cp: cp, cancel: flag, resumed: resumed,
		log:  e.d.Logger.Named("engine").With("migration_id", cp.MigrationID, "vm_uuid", cp.Request.VMUUID),
		mark: e.d.Now(),
	}
	if err := r.save(ctx); err != nil {
		return BuildReport(cp), err
	}
	if resumed {
		r.log.Info("resuming migration", "phase", cp.Phase.String())
		if cp.VMRef != "" && !cp.Phase.Stopped() {
			r.plog = r.log.With("phase", cp.Phase.String())
			if err := r.ensureTask(ctx); err != nil {
				return BuildReport(cp), fmt.Errorf("%w: %w", ErrInterrupted, err)
			}
		}
	}
	err = r.loop(ctx)
	if err == nil && cp.Phase.Stopped() {
		err = r.finish(ctx) // idempotent; completes the task after a crash
		if err == nil {
			release = r.taskRelease(ctx)
		}
	}
	rep := BuildReport(cp)
	if err != nil {
		return rep, err
	}
	return rep, outcome(cp, r.cause)
}

// outcome is the error Run/Resume return for a stopped migration: nil for
// Done, ErrCancelled for a cancelled rollback, else the cause.
func outcome(cp *Checkpoint, cause error) error {
	switch {
	case cp.Phase == PhaseDone:
		return nil
	case cp.Phase == PhaseRolledBack && cp.Cancelled:
		if cp.Error == "" || cp.Error == ErrCancelled.Error() {
			return ErrCancelled
		}
		return fmt.Errorf("%w: %s", ErrCancelled, strings.TrimPrefix(cp.Error, ErrCancelled.Error()+": "))
	case cause != nil:
		return cause
	}
	return fmt.Errorf("migration %s %s: %s", cp.MigrationID, cp.Phase, cp.Error)
}

// run is one process's execution of one migration.
type run struct {
	e       *Engine
	d       *Deps
	cp      *Checkpoint
	log     hclog.Logger
	plog    hclog.Logger
	cancel  *atomic.Bool
	resumed bool
	// attached: agents, gateway and storage transfers re-attached in this process.
	attached     bool
	mark         time.Time // last time phase time was accounted
	lastProgress float64
	cause        error // the error that sent the migration to RollingBack/Failed
}

var errHalt = errors.New("checkpoint not written")

// save accounts phase time and writes the checkpoint. A failure halts the
// engine (ErrInterrupted): it cannot guarantee anything it did not record.
func (r *run) save(ctx context.Context) error {
	r.account()
	r.cp.UpdatedUnixNano = r.mark.UnixNano()
	if err := r.d.Store.Save(ctx, r.cp); err != nil {
		return fmt.Errorf("%w: %w: %w", ErrInterrupted, errHalt, err)
	}
	return nil
}

// account adds the time since the last mark to the current phase.
func (r *run) account() {
	now := r.d.Now()
	if r.cp.Timings == nil {
		r.cp.Timings = map[string]float64{}
	}
	if d := now.Sub(r.mark).Seconds(); d > 0 && !r.cp.Phase.Stopped() {
		r.cp.Timings[r.cp.Phase.String()] += d
	}
	r.mark = now
}

func (r *run) loop(ctx context.Context) error {
	for !r.cp.Phase.Stopped() {
		if err := r.advance(ctx); err != nil {
			return err
		}
	}
	return nil
}

// advance runs the step of the current phase, validates the transition to
// the phase it leads to (or to RollingBack/Failed on error), and checkpoints.
func (r *run) advance(ctx context.Context) error {
	from := r.cp.Phase
	r.plog = r.log.With("phase", from.String())
	next, err := r.step(ctx, from)
	if err != nil {
		if errors.Is(err, errHalt) || ctx.Err() != nil {
			r.plog.Warn("migration interrupted", "error", err)
			if errors.Is(err, ErrInterrupted) {
				return err
			}
			return fmt.Errorf("%w: %w", ErrInterrupted, err)
		}
		next = r.onStepError(ctx, from, err)
	}
	if !CanTransition(from, next) {
		return fmt.Errorf("%w: %s -> %s", ErrBadTransition, from, next)
	}
	r.account()
	r.cp.Phase = next
	if err := r.save(ctx); err != nil {
		return err
	}
	r.plog.Info("phase changed", "to", next.String())
	r.progress(ctx, next, 0, Progress{})
	return nil
}

func (r *run) step(ctx context.Context, p Phase) (Phase, error) {
	switch p {
	case PhasePlan:
		return r.stepPlan(ctx)
	case PhasePrepare:
		return r.stepPrepare(ctx)
	case PhaseSeed:
		return r.stepSeed(ctx)
	case PhaseHandoff:
		return r.stepHandoff(ctx)
	case PhaseSwitch:
		return r.stepSwitch(ctx)
	case PhaseVerify:
		return r.stepVerify(ctx)
	case PhaseCleanup:
		return r.stepCleanup(ctx)
	case PhaseRollingBack:
		return r.stepRollback(ctx)
	}
	return p, fmt.Errorf("%w: no step for phase %s", ErrBadTransition, p)
}

// onStepError decides where a failed step leads.
func (r *run) onStepError(ctx context.Context, from Phase, err error) Phase {
	r.cause = &PhaseError{Phase: from, Err: err}
	r.cp.Error = err.Error()
	r.cp.FailedIn = from
	code := "WANMOTION_MIGRATION_FAILED"
	if errors.Is(err, ErrCancelled) {
		code = "WANMOTION_MIGRATION_CANCELLED"
	}
	r.cp.ErrorInfo = []string{code, from.String(), err.Error()}
	switch {
	case from < PhaseHandoff:
		r.cp.Cancelled = errors.Is(err, ErrCancelled)
		if r.cp.Cancelled {
			r.plog.Info("migration cancelled; rolling back")
		} else {
			r.plog.Error("step failed; rolling back", "error", err)
		}
		return PhaseRollingBack
	case from == PhaseHandoff:
		where, destVM, lerr := r.locate(ctx)
		movingTask := destVM
		switch where {
		case "dest":
			// xapi finished the move although we saw an error: go on.
			r.plog.Warn("handoff reported an error but the vm runs at the destination; continuing", "error", err)
			r.cp.Error, r.cp.ErrorInfo, r.cp.FailedIn, r.cause = "", nil, PhaseUnknown, nil
			r.cp.DestVM, r.cp.Handoff.Done = destVM, true
			return PhaseSwitch
		case "moving":
			// the error was ours (e.g. polling the task), not xapi's: the
			// migration still runs; resume follows its task.
			r.cp.Handoff.Task, r.cp.Handoff.SendIntent = movingTask, true
			r.cause = &PhaseError{Phase: from, Err: fmt.Errorf("%w: VM.migrate_send task %s is still running (resume to follow it): %w", ErrVMLocation, movingTask, err)}
			r.cp.Error = r.cause.Error()
			r.plog.Error("handoff step failed while VM.migrate_send still runs", "error", err, "task", movingTask)
		case "source":
			r.cp.Handoff.Task, r.cp.Handoff.SendIntent = "", false
			r.cause = &PhaseError{Phase: from, Err: fmt.Errorf("%w: %w", ErrHandoffFailed, err)}
			r.cp.Error = r.cause.Error()
			r.plog.Error("handoff failed; vm still runs at the source, replica kept for a retry", "error", err)
			// the guest keeps running here: give it its CPU back now (a
			// resumed handoff throttles it again before VM.migrate_send)
			if rerr := r.releaseThrottle(ctx); rerr != nil {
				r.plog.Warn("could not remove the guest throttle after the failed handoff; resume or abort removes it", "error", rerr)
			}
		default:
			r.cause = &PhaseError{Phase: from, Err: fmt.Errorf("%w: %w (%v)", ErrVMLocation, err, lerr)}
			r.cp.Error = r.cause.Error()
			r.plog.Error("handoff failed and the vm location is unknown", "error", err, "locate_error", lerr)
		}
		return PhaseFailed
	default:
		r.plog.Error("step failed", "error", err)
		return PhaseFailed
	}
}

// locate finds where the VM runs: "source", "dest" (with the destination
// VM's ref), "moving" (at the source with a VM.migrate_send in progress;
// with that task's ref) or "unknown".
func (r *run) locate(ctx context.Context) (string, string, error) {
	sv, serr := r.d.Source.VMByUUID(ctx, r.cp.Request.VMUUID)
	if serr == nil && sv.PowerState == "Running" {
		if task := migrateSendTask(sv); task != "" {
			return "moving", task, nil
		}
		return "source", "", nil
	}
	dv, derr := r.d.Dest.VMByUUID(ctx, r.cp.Request.VMUUID)
	if derr == nil && dv.PowerState == "Running" && errors.Is(serr, ErrNotFound) {
		return "dest", dv.Ref, nil
	}
	return "unknown", "", errors.Join(serr, derr)
}

// migrateSendTask returns the task of a VM.migrate_send in progress on vm, or "".
func migrateSendTask(vm VMRecord) string {
	for task, op := range vm.CurrentOperations {
		if op == "migrate_send" {
			return task
		}
	}
	return ""
}

// finish completes the xapi task once the migration stopped.
func (r *run) finish(ctx context.Context) error {
	cp := r.cp
	if cp.Task == "" || cp.TaskFinished {
		return nil
	}
	t := r.d.Tasks
	var errs []error
	switch cp.Phase {
	case PhaseDone:
		errs = append(errs, t.SetTaskResult(ctx, cp.Task, cp.DestVM), t.SetTaskProgress(ctx, cp.Task, 1), t.SetTaskStatus(ctx, cp.Task, TaskSuccess))
	case PhaseRolledBack:
		if len(cp.ErrorInfo) > 0 {
			errs = append(errs, t.SetTaskErrorInfo(ctx, cp.Task, cp.ErrorInfo))
		}
		st := TaskFailure
		if cp.Cancelled {
			st = TaskCancelled
		}
		errs = append(errs, t.SetTaskStatus(ctx, cp.Task, st))
	case PhaseFailed:
		errs = append(errs, t.SetTaskErrorInfo(ctx, cp.Task, cp.ErrorInfo), t.SetTaskStatus(ctx, cp.Task, TaskFailure))
	}
	if err := errors.Join(errs...); err != nil {
		r.log.Warn("could not complete the xapi task", "error", err)
	}
	cp.TaskFinished = true
	return r.save(ctx)
}

// taskRelease returns what destroys the finished task after the linger,
// or nil when the task stays: no task, TaskLinger negative, no
// TaskDestroyer, or a task not marked as a wanmotion controller's.
func (r *run) taskRelease(ctx context.Context) func() {
	cp := r.cp
	td, ok := r.d.Tasks.(TaskDestroyer)
	if !ok || r.d.TaskLinger < 0 || cp.Task == "" || !cp.TaskFinished {
		return nil
	}
	task := cp.Task
	rec, err := r.d.Tasks.TaskRecord(ctx, task)
	switch {
	case errors.Is(err, ErrNotFound):
		return nil
	case err != nil:
		r.log.Warn("could not read the task; it is not destroyed", "task", task, "error", err)
		return nil
	case rec.OtherConfig[TaskOwnerKey] != TaskOwnerController:
		r.log.Debug("task not created by a wanmotion controller; it stays", "task", task)
		return nil
	case rec.Status == TaskPending:
		return nil // someone else's status; never defer a destroy
	}
	linger := r.d.TaskLinger
	return func() {
		if linger > 0 {
			r.log.Debug("task lingers before it is destroyed", "task", task, "linger", linger.String())
			_ = r.sleepFor(ctx, linger)
		}
		err := td.DestroyTask(context.WithoutCancel(ctx), task)
		switch {
		case err == nil:
			r.log.Info("task destroyed", "task", task)
		case errors.Is(err, ErrNotFound):
		default:
			r.log.Warn("could not destroy the task; xapi's task gc removes it later", "task", task, "error", err)
		}
	}
}

// cancelRequested reports a cancel from Engine.Cancel or the xapi task.
func (r *run) cancelRequested(ctx context.Context) bool {
	if r.cancel.Load() {
		return true
	}
	if r.cp.Task == "" {
		return false
	}
	rec, err := r.d.Tasks.TaskRecord(ctx, r.cp.Task)
	if err != nil {
		r.log.Debug("could not read the task", "error", err)
		return false
	}
	for _, op := range rec.CurrentOperations {
		if op == "cancel" {
			r.cancel.Store(true)
			return true
		}
	}
	return false
}

// checkCancel returns ErrCancelled before Handoff; from Handoff on a
// cancel is logged once and ignored (forward-only).
func (r *run) checkCancel(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !r.cancelRequested(ctx) {
		return nil
	}
	if r.cp.Phase.ForwardOnly() {
		if !r.cp.CancelIgnored {
			r.cp.CancelIgnored = true
			r.plog.Warn("cancel ignored: the migration is past handoff and only moves forward")
		}
		return nil
	}
	return ErrCancelled
}

// progress relays overall progress to the xapi task and the observer.
func (r *run) progress(ctx context.Context, p Phase, frac float64, extra Progress) {
	if (p < PhasePlan || p > PhaseCleanup) && p != PhaseDone {
		// rolling back or stopped: the task keeps its last progress
		if r.d.Observe != nil {
			extra.MigrationID, extra.Phase, extra.Overall = r.cp.MigrationID, p, r.lastProgress
			r.d.Observe(extra)
		}
		return
	}
	o := max(OverallProgress(r.cp.Plan, p, frac), r.lastProgress)
	if r.cp.Task != "" && !r.cp.TaskFinished && (o-r.lastProgress >= 0.005 || frac == 0) && o != r.lastProgress {
		if err := r.d.Tasks.SetTaskProgress(ctx, r.cp.Task, o); err != nil {
			r.log.Debug("could not set task progress", "error", err)
		}
	}
	r.lastProgress = o
	if r.d.Observe != nil {
		extra.MigrationID, extra.Phase, extra.Overall = r.cp.MigrationID, p, o
		extra.ETA = time.Duration((1 - o) * r.cp.Plan.TotalSeconds * float64(time.Second))
		r.d.Observe(extra)
	}
}

func (r *run) sleep(ctx context.Context) error { return r.sleepFor(ctx, r.d.PollInterval) }

func (r *run) sleepFor(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
