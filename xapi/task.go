package xapi

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/kolo/xmlrpc"

	"github.com/wanmotion/wanmotion/xapi/wire"
)

// TaskCreate calls task.create(label, description). Label a WAN migration
// task "VM.migrate_send" and set other_config applies_to so that XenCenter
// shows it.
func (c *Client) TaskCreate(ctx context.Context, label, description string) (TaskRef, error) {
	return call[TaskRef](ctx, c, "task.create", label, description)
}

// TaskGetRecord returns task.get_record.
func (c *Client) TaskGetRecord(ctx context.Context, task TaskRef) (TaskRecord, error) {
	return call[TaskRecord](ctx, c, "task.get_record", task)
}

// TaskGetAllRecords returns task.get_all_records.
func (c *Client) TaskGetAllRecords(ctx context.Context) (map[TaskRef]TaskRecord, error) {
	return call[map[TaskRef]TaskRecord](ctx, c, "task.get_all_records")
}

// TaskSetProgress calls task.set_progress (0.0 to 1.0; API 2.15+).
func (c *Client) TaskSetProgress(ctx context.Context, task TaskRef, progress float64) error {
	return callVoid(ctx, c, "task.set_progress", task, progress)
}

// TaskSetStatus calls task.set_status (API 2.7+).
func (c *Client) TaskSetStatus(ctx context.Context, task TaskRef, status TaskStatus) error {
	return callVoid(ctx, c, "task.set_status", task, status)
}

// TaskSetResult calls task.set_result (xapi 21.3+). value should be an
// XML-RPC value string such as "<value>OpaqueRef:...</value>".
func (c *Client) TaskSetResult(ctx context.Context, task TaskRef, value string) error {
	return callVoid(ctx, c, "task.set_result", task, value)
}

// TaskSetErrorInfo calls task.set_error_info (xapi 21.3+).
func (c *Client) TaskSetErrorInfo(ctx context.Context, task TaskRef, info []string) error {
	if info == nil {
		info = []string{}
	}
	return callVoid(ctx, c, "task.set_error_info", task, info)
}

// TaskCancel calls task.cancel. xapi records the request in
// current_operations; the status does not change by itself.
func (c *Client) TaskCancel(ctx context.Context, task TaskRef) error {
	return callVoid(ctx, c, "task.cancel", task)
}

// TaskDestroy calls task.destroy (deferred by xapi while the task runs).
func (c *Client) TaskDestroy(ctx context.Context, task TaskRef) error {
	return callVoid(ctx, c, "task.destroy", task)
}

// TaskAddToOtherConfig calls task.add_to_other_config (e.g. "applies_to").
func (c *Client) TaskAddToOtherConfig(ctx context.Context, task TaskRef, key, value string) error {
	return callVoid(ctx, c, "task.add_to_other_config", task, key, value)
}

// TaskRemoveFromOtherConfig calls task.remove_from_other_config.
func (c *Client) TaskRemoveFromOtherConfig(ctx context.Context, task TaskRef, key string) error {
	return callVoid(ctx, c, "task.remove_from_other_config", task, key)
}

// TaskResult is a finished task: its final record and its result.
type TaskResult struct {
	Record TaskRecord
}

// Value decodes task.result, an XML-RPC value string (e.g.
// "<value>OpaqueRef:...</value>"; "<value></value>" for void methods).
func (r *TaskResult) Value() (any, error) {
	v, err := DecodeValueString(r.Record.Result)
	if err != nil {
		return nil, err
	}
	return fillEmpty(v), nil
}

// Decode decodes task.result into out (a *VMRef, *string, *map[string]string ...).
func (r *TaskResult) Decode(out any) error {
	v, err := DecodeValueString(r.Record.Result)
	if err != nil {
		return err
	}
	return fromWire("task.result", v, out)
}

// String returns task.result decoded as a string ("" for void results).
func (r *TaskResult) String() (string, error) {
	var s string
	err := r.Decode(&s)
	return s, err
}

// DecodeValueString decodes one XML-RPC <value> document as xapi stores it in
// task.result. The empty string decodes to "".
func DecodeValueString(s string) (any, error) {
	if s == "" {
		return "", nil
	}
	norm, err := wire.Normalise([]byte(s))
	if err != nil {
		return nil, fmt.Errorf("%w: task result: %w", ErrProtocol, err)
	}
	var v any
	if err := xmlrpc.Response(norm).Unmarshal(&v); err != nil {
		return nil, fmt.Errorf("%w: task result: %w", ErrProtocol, err)
	}
	return v, nil
}

// taskEventTimeout is the event.from timeout WaitTask uses, in seconds.
const taskEventTimeout = 30.0

// WaitTask waits until task finishes. It follows event.from on the "task"
// class (on the long-poll transport) and falls back to polling
// task.get_record every Config.PollInterval when event.from is unusable.
//
// On success it returns the final record; decode the result with
// TaskResult.Decode. A failed task returns an *APIError built from
// error_info, with Method set to the task's name_label (e.g.
// "Async.VM.migrate_send"); a cancelled one TASK_CANCELLED. When ctx ends,
// WaitTask calls task.cancel (with a short detached deadline) and returns the
// context's error. The task is not destroyed: call TaskDestroy when done.
func (c *Client) WaitTask(ctx context.Context, task TaskRef) (*TaskResult, error) {
	rec, err := c.TaskGetRecord(ctx, task)
	if err != nil {
		return nil, c.cancelOnDone(ctx, task, err)
	}
	useEvents := true
	token := ""
	for {
		if rec.Status.Done() {
			return finishTask(task, rec)
		}
		if useEvents {
			batch, err := c.EventFrom(ctx, []string{"task"}, token, taskEventTimeout)
			if err != nil {
				if ctx.Err() != nil {
					return nil, c.cancelOnDone(ctx, task, ctx.Err())
				}
				c.log.Debug("event.from unusable, polling the task instead", "error", err)
				useEvents = false
				continue
			}
			token = batch.Token
			for _, ev := range batch.Events {
				if ev.Ref != string(task) {
					continue
				}
				if ev.Operation == EventOperationDel {
					return nil, fmt.Errorf("xapi: task %s was destroyed before it finished", task)
				}
				var r TaskRecord
				if err := ev.Decode(&r); err != nil {
					return nil, err
				}
				rec = r
			}
			continue
		}
		t := time.NewTimer(c.cfg.PollInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, c.cancelOnDone(ctx, task, ctx.Err())
		case <-t.C:
		}
		if rec, err = c.TaskGetRecord(ctx, task); err != nil {
			return nil, c.cancelOnDone(ctx, task, err)
		}
	}
}

// cancelOnDone cancels task when ctx has ended, and returns err.
func (c *Client) cancelOnDone(ctx context.Context, task TaskRef, err error) error {
	if ctx.Err() == nil {
		return err
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if cerr := c.TaskCancel(cctx, task); cerr != nil {
		c.log.Warn("task cancel after context end failed", "task", string(task), "error", cerr)
	}
	return fmt.Errorf("xapi: waiting for task %s: %w", task, err)
}

func finishTask(task TaskRef, rec TaskRecord) (*TaskResult, error) {
	switch rec.Status {
	case TaskStatusSuccess:
		return &TaskResult{Record: rec}, nil
	case TaskStatusCancelled, TaskStatusFailure:
		if len(rec.ErrorInfo) > 0 {
			return nil, &APIError{Method: rec.NameLabel, Code: rec.ErrorInfo[0], Params: rec.ErrorInfo[1:]}
		}
		if rec.Status == TaskStatusCancelled {
			return nil, &APIError{Method: rec.NameLabel, Code: CodeTaskCancelled, Params: []string{string(task)}}
		}
		return nil, protocolErrorf("task %s failed without error_info", task)
	}
	return nil, errors.New("xapi: task not finished")
}
