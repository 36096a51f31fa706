package xapiadapt

import (
	"context"
	"fmt"
	"sort"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

// Tasks is the source pool's task API as the engine uses it. It implements
// engine.Tasks and engine.TaskFinder.
type Tasks struct {
	c *xapi.Client
}

var (
	_ engine.Tasks         = (*Tasks)(nil)
	_ engine.TaskFinder    = (*Tasks)(nil)
	_ engine.TaskDestroyer = (*Tasks)(nil)
)

// NewTasks returns the task adapter for the pool c is logged in to.
func NewTasks(c *xapi.Client) *Tasks { return &Tasks{c: c} }

// CreateTask implements engine.Tasks: task.create(label, description). The
// engine labels its task "VM.migrate_send" (engine.TaskLabel) so that
// XenCenter shows it, and then sets other_config applies_to.
func (t *Tasks) CreateTask(ctx context.Context, label, description string) (string, error) {
	ref, err := t.c.TaskCreate(ctx, label, description)
	if err != nil {
		return "", fmt.Errorf("task.create: %w", mapErr(err))
	}
	return string(ref), nil
}

// AddTaskOtherConfig implements engine.Tasks (remove-then-add).
func (t *Tasks) AddTaskOtherConfig(ctx context.Context, task, key, value string) error {
	if err := t.c.TaskRemoveFromOtherConfig(ctx, xapi.TaskRef(task), key); err != nil {
		return fmt.Errorf("task.remove_from_other_config %s: %w", key, mapErr(err))
	}
	if err := t.c.TaskAddToOtherConfig(ctx, xapi.TaskRef(task), key, value); err != nil {
		return fmt.Errorf("task.add_to_other_config %s: %w", key, mapErr(err))
	}
	return nil
}

// SetTaskProgress implements engine.Tasks.
func (t *Tasks) SetTaskProgress(ctx context.Context, task string, progress float64) error {
	if err := t.c.TaskSetProgress(ctx, xapi.TaskRef(task), progress); err != nil {
		return fmt.Errorf("task.set_progress: %w", mapErr(err))
	}
	return nil
}

// SetTaskStatus implements engine.Tasks.
func (t *Tasks) SetTaskStatus(ctx context.Context, task string, status engine.TaskStatus) error {
	if err := t.c.TaskSetStatus(ctx, xapi.TaskRef(task), xapi.TaskStatus(status)); err != nil {
		return fmt.Errorf("task.set_status: %w", mapErr(err))
	}
	return nil
}

// SetTaskResult implements engine.Tasks. The engine passes the destination
// VM ref; xapi stores task results as XML-RPC value strings, so it is
// wrapped as "<value>REF</value>" (what xapi itself stores for
// VM.migrate_send), unless it already is one.
func (t *Tasks) SetTaskResult(ctx context.Context, task, result string) error {
	v := result
	if len(v) < 7 || v[:7] != "<value>" {
		v = "<value>" + xmlEscape(result) + "</value>"
	}
	if err := t.c.TaskSetResult(ctx, xapi.TaskRef(task), v); err != nil {
		return fmt.Errorf("task.set_result: %w", mapErr(err))
	}
	return nil
}

func xmlEscape(s string) string {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '<':
			out = append(out, "&lt;"...)
		case '>':
			out = append(out, "&gt;"...)
		case '&':
			out = append(out, "&amp;"...)
		default:
			out = append(out, s[i])
		}
	}
	return string(out)
}

// SetTaskErrorInfo implements engine.Tasks.
func (t *Tasks) SetTaskErrorInfo(ctx context.Context, task string, info []string) error {
	if err := t.c.TaskSetErrorInfo(ctx, xapi.TaskRef(task), info); err != nil {
		return fmt.Errorf("task.set_error_info: %w", mapErr(err))
	}
	return nil
}

// TaskRecord implements engine.Tasks. Result is decoded from xapi's
// XML-RPC value string (for VM.migrate_send: the destination VM ref); a
// result that does not decode to a string is returned raw.
func (t *Tasks) TaskRecord(ctx context.Context, task string) (engine.TaskRecord, error) {
	rec, err := t.c.TaskGetRecord(ctx, xapi.TaskRef(task))
	if err != nil {
		return engine.TaskRecord{}, fmt.Errorf("task.get_record: %w", mapErr(err))
	}
	res := rec.Result
	if v, err := xapi.DecodeValueString(rec.Result); err == nil {
		if s, ok := v.(string); ok {
			res = s
		}
	}
	st := engine.TaskStatus(rec.Status)
	if rec.Status == xapi.TaskStatusCancelling {
		st = engine.TaskPending // "not being used, nor should it ever be used"
	}
	return engine.TaskRecord{
		Status: st, Progress: rec.Progress, Result: res,
		ErrorInfo: rec.ErrorInfo, CurrentOperations: rec.CurrentOperations, OtherConfig: rec.OtherConfig,
	}, nil
}

// DestroyTask implements engine.TaskDestroyer: task.destroy (xapi deletes
// a completed task at once; a pending one only gets a deferred destroy).
func (t *Tasks) DestroyTask(ctx context.Context, task string) error {
	if err := t.c.TaskDestroy(ctx, xapi.TaskRef(task)); err != nil {
		return fmt.Errorf("task.destroy: %w", mapErr(err))
	}
	return nil
}

// FindPendingTasks implements engine.TaskFinder.
func (t *Tasks) FindPendingTasks(ctx context.Context, description string) ([]string, error) {
	all, err := t.c.TaskGetAllRecords(ctx)
	if err != nil {
		return nil, fmt.Errorf("task.get_all_records: %w", mapErr(err))
	}
	var out []string
	for ref, r := range all {
		if r.Status == xapi.TaskStatusPending && r.NameDescription == description {
			out = append(out, string(ref))
		}
	}
	sort.Strings(out)
	return out, nil
}

// Cancel calls task.cancel (what XenCenter's cancel button does; the
// engine sees it in current_operations).
func (t *Tasks) Cancel(ctx context.Context, task string) error {
	if err := t.c.TaskCancel(ctx, xapi.TaskRef(task)); err != nil {
		return fmt.Errorf("task.cancel: %w", mapErr(err))
	}
	return nil
}
