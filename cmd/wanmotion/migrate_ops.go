package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

// opFlags are the flags of status, cancel and resume.
type opFlags struct {
	fs          *flag.FlagSet
	stateDir    string
	asJSON      bool
	credentials string
	logLevel    string
	taskLinger  time.Duration
	tls         tlsFlags
}

func newOpFlags(name string, stderr io.Writer, conn bool) *opFlags {
	o := &opFlags{fs: flag.NewFlagSet("migrate "+name, flag.ContinueOnError)}
	o.fs.SetOutput(stderr)
	o.fs.StringVar(&o.stateDir, "state-dir", defaultStateDir(), "checkpoint directory")
	o.fs.BoolVar(&o.asJSON, "json", false, "print JSON")
	if conn {
		o.fs.StringVar(&o.credentials, "credentials", "", "credentials file (default: the one the migration used)")
		o.fs.StringVar(&o.logLevel, "log-level", "warn", "log level for stderr")
		o.fs.DurationVar(&o.taskLinger, "task-linger", 0, "keep the finished xapi task this long before destroying it; negative: keep it")
		o.tls.register(o.fs)
	}
	return o
}

// parse accepts the ID before or after the flags.
func (o *opFlags) parse(args []string) ([]string, error) {
	var pos []string
	for {
		if err := o.fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		args = o.fs.Args()
		if len(args) == 0 {
			return pos, checkLogLevel(o.logLevel)
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}

func oneID(pos []string, cmd string) (string, error) {
	if len(pos) != 1 {
		return "", fmt.Errorf("%w: migrate %s takes exactly one migration ID", errUsage, cmd)
	}
	if !engine.ValidMigrationID(pos[0]) {
		return "", fmt.Errorf("%w: invalid migration ID %q", errUsage, pos[0])
	}
	return pos[0], nil
}

// migrationList is `migrate status --json` without an ID.
type migrationList struct {
	Migrations []engine.Report `json:"migrations"`
}

func migrateStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o := newOpFlags("status", stderr, false)
	pos, err := o.parse(args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	if len(pos) > 1 {
		return fmt.Errorf("%w: migrate status takes at most one migration ID", errUsage)
	}
	store, err := engine.NewFileStore(o.stateDir)
	if err != nil {
		return err
	}
	if len(pos) == 1 {
		cp, err := loadCheckpoint(ctx, store, pos[0])
		if err != nil {
			return err
		}
		rep := engine.BuildReport(cp)
		if o.asJSON {
			return writeReport(stdout, rep)
		}
		fmt.Fprint(stdout, rep.Text())
		return nil
	}
	ids, err := store.List(ctx)
	if err != nil {
		return err
	}
	list := migrationList{Migrations: []engine.Report{}}
	updated := map[string]time.Time{}
	for _, id := range ids {
		cp, err := store.Load(ctx, id)
		if err != nil {
			fmt.Fprintf(stderr, "wanmotion: skipping %s: %v\n", id, err)
			continue
		}
		list.Migrations = append(list.Migrations, engine.BuildReport(cp))
		updated[id] = time.Unix(0, cp.UpdatedUnixNano).UTC()
	}
	if o.asJSON {
		return writeJSON(stdout, list)
	}
	if len(list.Migrations) == 0 {
		fmt.Fprintf(stdout, "no migrations in %s\n", o.stateDir)
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tVM\tRESULT\tPHASE\tUPDATED")
	for _, r := range list.Migrations {
		name := r.VMName
		if name == "" {
			name = r.VMUUID
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.MigrationID, name, r.Result, r.Phase, updated[r.MigrationID].Format(time.RFC3339))
	}
	return tw.Flush()
}

func (o *opFlags) conn(id string) (connInfo, error) {
	ci, err := loadConnInfo(o.stateDir, id)
	if err != nil {
		return ci, err
	}
	if o.credentials != "" {
		ci.Credentials = o.credentials
	}
	return ci, nil
}

func (o *opFlags) tlsFor(ci connInfo) tlsFlags {
	t := o.tls
	if !t.insecure && t.caFile == "" && len(t.thumbprints) == 0 {
		t = tlsFlags{insecure: ci.Insecure, caFile: ci.CAFile, thumbprints: ci.Thumbprints}
	}
	return t
}

// migrateCancel asks a migration to stop through its xapi task
// (task.cancel, as XenCenter does): the process driving it rolls back
// before Handoff; from Handoff on the request is ignored. A migration no
// process drives rolls back when resumed.
func migrateCancel(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o := newOpFlags("cancel", stderr, true)
	pos, err := o.parse(args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	id, err := oneID(pos, "cancel")
	if err != nil {
		return err
	}
	store, err := engine.NewFileStore(o.stateDir)
	if err != nil {
		return err
	}
	cp, err := loadCheckpoint(ctx, store, id)
	if err != nil {
		return err
	}
	if cp.Phase == engine.PhaseFailed && (cp.FailedIn == engine.PhaseHandoff || cp.FailedIn == engine.PhaseRollingBack) {
		// The VM did not leave the source: roll back now (engine.Abort,
		// which refuses unless the VM runs at the source).
		m := &migration{f: &migrateFlags{asJSON: o.asJSON, stateDir: o.stateDir}, stdout: stdout, stderr: stderr, id: id}
		err := m.drive(ctx, o, id, true)
		if o.asJSON && !m.printed {
			m.printFailure(err)
		}
		return err
	}
	if cp.Phase == engine.PhaseFailed {
		return fmt.Errorf("migration %s failed in %s, after the vm moved; it cannot be rolled back: finish it with wanmotion migrate resume %s", id, cp.FailedIn, id)
	}
	if cp.Phase.Stopped() {
		return fmt.Errorf("migration %s has already ended (%s)", id, cp.Phase)
	}
	if cp.Phase.ForwardOnly() {
		return fmt.Errorf("migration %s is in %s: past handoff it only moves forward and cannot be cancelled", id, cp.Phase)
	}
	if cp.Task == "" {
		return fmt.Errorf("migration %s has no xapi task yet; try again in a moment", id)
	}
	ci, err := o.conn(id)
	if err != nil {
		return err
	}
	src := credSource{env: EnvFromPassword, file: ci.Credentials, fileGiven: ci.Credentials != "", label: "source pool"}
	pw, err := src.password(ci.From, ci.FromUser, stderr)
	if err != nil {
		return err
	}
	c, err := connect(ctx, ci.From, ci.FromUser, pw, o.tlsFor(ci), newCLILogger(o.logLevel, stderr))
	if err != nil {
		return err
	}
	defer func() { _ = c.Close(context.WithoutCancel(ctx)) }()
	if err := c.TaskCancel(ctx, xapi.TaskRef(cp.Task)); err != nil {
		return fmt.Errorf("task.cancel: %w", err)
	}
	fmt.Fprintf(stdout, "cancel requested for migration %s; it rolls back (if no process drives it, run: wanmotion migrate resume %s)\n", id, id)
	return nil
}

func migrateResume(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o := newOpFlags("resume", stderr, true)
	pos, err := o.parse(args)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	id, err := oneID(pos, "resume")
	if err != nil {
		return err
	}
	m := &migration{f: &migrateFlags{asJSON: o.asJSON, stateDir: o.stateDir}, stdout: stdout, stderr: stderr, id: id}
	err = m.drive(ctx, o, id, false)
	if o.asJSON && !m.printed {
		m.printFailure(err)
	}
	return err
}

// drive resumes a migration from its checkpoint, or with abort rolls
// back one that failed in handoff while the VM is at the source.
func (m *migration) drive(ctx context.Context, o *opFlags, id string, abort bool) error {
	store, err := engine.NewFileStore(o.stateDir)
	if err != nil {
		return err
	}
	cp, err := loadCheckpoint(ctx, store, id)
	if err != nil {
		return err
	}
	m.vmUUID = cp.Request.VMUUID
	ci, err := o.conn(id)
	if err != nil {
		return err
	}
	if _, local, _ := xapi.SocketPath(ci.From); local {
		// Started through the host plugin: its agents run on the pools'
		// hosts and only the plugin's controller drives them.
		if abort {
			return fmt.Errorf("%w: migration %s was started through the host plugin; cancel it there: "+
				`host.call_plugin(<coordinator>, "wanmotion", "cancel", {"id": %q}) or task.cancel on its task`, errUsage, id, id)
		}
		return fmt.Errorf("%w: migration %s was started through the host plugin; resume it there: "+
			`host.call_plugin(<coordinator>, "wanmotion", "resume", {"id": %q, "dest_password": ...})`, errUsage, id, id)
	}
	p, err := openPools(ctx, ci, o.tlsFor(ci), o.logLevel, m.stderr)
	if err != nil {
		return err
	}
	defer p.close(ctx)
	log := newCLILogger(o.logLevel, m.stderr)
	view := newProgressView(m.stderr, !o.asJSON && isTerminal(m.stderr), nil)
	eo := engineOpts{Source: p.src, Dest: p.dst, Store: store, PluginDir: ci.PluginDir,
		Logger: log, Observe: view.Observe, Simulator: isSimulator(ctx, p.dst), StateDir: o.stateDir, TaskLinger: o.taskLinger}
	agentPlacement(&eo, ci.Agents, log)
	eng, cleanup, err := buildEngine(ctx, eo)
	if err != nil {
		return err
	}
	defer cleanup()
	rep, err := runWithSignals(ctx, eng, id, m.stderr, func(rctx context.Context) (engine.Report, error) {
		if abort {
			return eng.Abort(rctx, id)
		}
		return eng.Resume(rctx, id)
	})
	view.Done()
	return m.finish(rep, err)
}

// loadCheckpoint loads a migration's checkpoint; an unknown id says where
// it looked and how to list what is there.
func loadCheckpoint(ctx context.Context, store *engine.FileStore, id string) (*engine.Checkpoint, error) {
	cp, err := store.Load(ctx, id)
	switch {
	case errors.Is(err, engine.ErrNotFound):
		return nil, fmt.Errorf("%w in %s ('wanmotion migrate status' lists the migrations there; --state-dir chooses another directory)", err, store.Dir())
	case err != nil:
		return nil, fmt.Errorf("migration %s: %w", id, err)
	}
	return cp, nil
}
