package engine

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// destroyingTasks is the fake task API with task.destroy: a destroyed task
// is gone (TaskRecord then wraps ErrNotFound), as in xapi for a completed task.
type destroyingTasks struct {
	tasks
	mu        *sync.Mutex
	destroyed map[string]TaskRecord // task → its record when destroyed
	order     *[]string
}

func newDestroyingTasks(w *world) destroyingTasks {
	return destroyingTasks{tasks: tasks{w}, mu: &sync.Mutex{}, destroyed: map[string]TaskRecord{}, order: &[]string{}}
}

func (d destroyingTasks) DestroyTask(ctx context.Context, task string) error {
	if err := d.w.call("task.Destroy"); err != nil {
		return err
	}
	d.w.mu.Lock()
	r, ok := d.w.tasks[task]
	if ok {
		delete(d.w.tasks, task)
	}
	d.w.mu.Unlock()
	if !ok {
		return ErrNotFound
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.destroyed[task] = *r
	*d.order = append(*d.order, task)
	return nil
}

func (d destroyingTasks) destroyedTasks() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string{}, *d.order...)
}

var _ TaskDestroyer = destroyingTasks{}

func newLingerEngine(t *testing.T, w *world, tk Tasks, linger time.Duration) *Engine {
	t.Helper()
	clk := &fakeClock{}
	e, err := New(Deps{
		Source: srcPool{w}, Dest: dstPool{w}, Tasks: tk, Storage: storage{w}, Network: network{w},
		Gateway: gateway{w}, Agents: agents{w}, Catalog: catalog{w}, Store: mustStore(t),
		Throttle: throttle{w}, Integrity: integrity{ok: true},
		Logger: testutil.Logger(t), Now: clk.Now, PollInterval: time.Millisecond, TaskLinger: linger,
	})
	require.NoError(t, err)
	return e
}

// The engine destroys the task it created once, after setting its final
// status and result; only tasks marked as a controller's, and not with a
// negative linger.
func TestTaskDestroyedWhenOurs(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		adopt   map[string]string // adopt a task with this other_config (nil: the engine creates one)
		linger  time.Duration
		destroy bool
	}{
		{name: "created by the engine", destroy: true},
		{name: "adopted, marked by the plugin", adopt: map[string]string{TaskOwnerKey: TaskOwnerController}, destroy: true},
		{name: "adopted, a third party's", adopt: map[string]string{}, destroy: false},
		{name: "adopted, another owner", adopt: map[string]string{TaskOwnerKey: "someone"}, destroy: false},
		{name: "negative linger", linger: -1, destroy: false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := newWorld()
			req := testRequest()
			if tc.adopt != nil {
				w.tasks["OpaqueRef:given"] = &TaskRecord{Status: TaskPending, CurrentOperations: map[string]string{}}
				w.taskOC["OpaqueRef:given"] = tc.adopt
				req.TaskRef = "OpaqueRef:given"
			}
			tk := newDestroyingTasks(w)
			rep, err := newLingerEngine(t, w, tk, tc.linger).Run(context.Background(), req)
			require.NoError(t, err)
			assert.Equal(t, ResultSuccess, rep.Result)
			task := req.TaskRef
			if task == "" {
				require.Len(t, w.ourTasks, 1)
				task = w.ourTasks[0]
				assert.Equal(t, TaskOwnerController, w.taskOC[task][TaskOwnerKey], "the engine marks the task it creates")
			} else {
				assert.Equal(t, tc.adopt[TaskOwnerKey], w.taskOC[task][TaskOwnerKey], "an adopted task's owner is not changed")
			}
			if !tc.destroy {
				assert.Empty(t, tk.destroyedTasks())
				assert.Zero(t, w.count("task.Destroy"))
				require.Contains(t, w.tasks, task)
				assert.Equal(t, TaskSuccess, w.tasks[task].Status)
				return
			}
			assert.Equal(t, []string{task}, tk.destroyedTasks(), "destroyed once")
			assert.Equal(t, 1, w.count("task.Destroy"))
			assert.NotContains(t, w.tasks, task)
			final := tk.destroyed[task]
			assert.Equal(t, TaskSuccess, final.Status, "final status set before the destroy")
			assert.Equal(t, "OpaqueRef:dstvm", final.Result)
			assert.Equal(t, 1.0, final.Progress)
			assert.Equal(t, "task.Destroy", lastCall(w, "task.SetStatus", "task.Destroy"))
		})
	}
}

// lastCall returns which of a and b was called last.
func lastCall(w *world, a, b string) string {
	w.mu.Lock()
	defer w.mu.Unlock()
	for i := len(w.trace) - 1; i >= 0; i-- {
		if w.trace[i] == a || w.trace[i] == b {
			return w.trace[i]
		}
	}
	return ""
}

// A migration that failed in Handoff has a terminal task (failure); the
// engine destroys it. Resume (retrying the handoff) works on a fresh task,
// which is destroyed in turn; a rollback's task (cancelled) too.
func TestTaskDestroyedAfterFailureAndResume(t *testing.T) {
	t.Parallel()
	w := newWorld()
	w.MigrateSendF = func(MigrateArgs) []string { return []string{"MIRROR_FAILED", "OpaqueRef:vdi0"} }
	tk := newDestroyingTasks(w)
	e := newLingerEngine(t, w, tk, 0)
	_, err := e.Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrHandoffFailed)
	require.Len(t, w.ourTasks, 1)
	first := w.ourTasks[0]
	assert.Equal(t, []string{first}, tk.destroyedTasks())
	assert.Equal(t, TaskFailure, tk.destroyed[first].Status)
	assert.Contains(t, tk.destroyed[first].ErrorInfo, "handoff")

	w.MigrateSendF = nil
	rep, err := e.Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assert.Equal(t, ResultSuccess, rep.Result)
	require.Len(t, w.ourTasks, 2, "a fresh task for the retry")
	second := w.ourTasks[1]
	assert.Equal(t, []string{first, second}, tk.destroyedTasks())
	assert.Equal(t, TaskSuccess, tk.destroyed[second].Status)

	// a finished migration: Resume reports it and destroys nothing more
	_, err = e.Resume(context.Background(), "wm-test")
	require.NoError(t, err)
	assert.Equal(t, 2, w.count("task.Destroy"))

	// cancelled before handoff: the cancelled task goes too
	w2 := newWorld()
	w2.cancelAll = true
	tk2 := newDestroyingTasks(w2)
	_, err = newLingerEngine(t, w2, tk2, 0).Run(context.Background(), testRequest())
	require.ErrorIs(t, err, ErrCancelled)
	require.Len(t, w2.ourTasks, 1)
	assert.Equal(t, w2.ourTasks, tk2.destroyedTasks())
	assert.Equal(t, TaskCancelled, tk2.destroyed[w2.ourTasks[0]].Status)
}

// The task stays, with its final status, while the engine lingers; Run
// returns only after the destroy. Cancelling ctx cuts the linger short.
func TestTaskLingersBeforeDestroy(t *testing.T) {
	t.Parallel()
	w := newWorld()
	tk := newDestroyingTasks(w)
	e := newLingerEngine(t, w, tk, time.Hour)
	ctx, cancel := context.WithCancel(context.Background())
	type result struct {
		rep Report
		err error
	}
	done := make(chan result, 1)
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		rep, err := e.Run(ctx, testRequest())
		done <- result{rep, err}
	}()
	t.Cleanup(func() { cancel(); <-exited })
	finished := func() bool {
		w.mu.Lock()
		defer w.mu.Unlock()
		if len(w.ourTasks) == 0 {
			return false
		}
		r, ok := w.tasks[w.ourTasks[0]]
		return ok && r.Status == TaskSuccess
	}
	require.Eventually(t, finished, 30*time.Second, time.Millisecond, "the task gets its final status")
	rep, err := e.Status(context.Background(), "wm-test")
	require.NoError(t, err, "the checkpoint is readable while the task lingers")
	assert.Equal(t, ResultSuccess, rep.Result)
	// the migration's lock is released before the linger: Resume of the
	// finished migration then reports it
	require.Eventually(t, func() bool {
		_, err := e.Resume(context.Background(), "wm-test")
		return err == nil
	}, 30*time.Second, time.Millisecond, "a finished migration reports while its task lingers")
	select {
	case r := <-done:
		t.Fatalf("Run returned during the linger: %v", r.err)
	default:
	}
	assert.Empty(t, tk.destroyedTasks(), "not destroyed during the linger")
	assert.True(t, finished(), "clients still read the final status")

	cancel()
	r := <-done
	require.NoError(t, r.err, "a cut-short linger does not change the outcome")
	assert.Equal(t, ResultSuccess, r.rep.Result)
	assert.Equal(t, w.ourTasks, tk.destroyedTasks(), "destroyed when the linger is cut short")
}
