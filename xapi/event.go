package xapi

import (
	"context"
	"time"
)

// Event is one event.from event. Snapshot is the object's full record as a
// raw map (absent on "del"); decode it into a record with Decode.
type Event struct {
	ID        string         `xapi:"id"`
	Timestamp string         `xapi:"timestamp"`
	Class     string         `xapi:"class"`
	Operation EventOperation `xapi:"operation"`
	Ref       string         `xapi:"ref"`
	Snapshot  map[string]any `xapi:"snapshot"`
}

// Decode converts the snapshot into a record (e.g. *TaskRecord, *VMRecord).
func (e *Event) Decode(out any) error {
	return fromWire("event.from -> snapshot("+e.Class+")", e.Snapshot, out)
}

// EventBatch is the result of event.from.
type EventBatch struct {
	Events         []Event          `xapi:"events"`
	ValidRefCounts map[string]int64 `xapi:"valid_ref_counts"`
	Token          string           `xapi:"token"`
}

// eventFromGrace is how long EventFrom waits past its timeout when the
// caller's context has no deadline.
const eventFromGrace = 90 * time.Second

// EventFrom calls event.from(classes, token, timeout). Classes are "*",
// "<class>" or "<class>/<ref>"; token "" starts from the beginning (all
// current objects). xapi holds the call until something changes or timeout
// seconds pass, so it runs on a dedicated HTTP transport and never delays
// other calls. Loop with the returned token.
func (c *Client) EventFrom(ctx context.Context, classes []string, token string, timeout float64) (*EventBatch, error) {
	if classes == nil {
		classes = []string{}
	}
	if _, ok := ctx.Deadline(); !ok {
		// xapi answers by timeout seconds at the latest; a silent WAN black
		// hole must not hang the caller forever.
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(timeout*float64(time.Second))+eventFromGrace)
		defer cancel()
	}
	v, err := c.do(ctx, c.events, "event.from", classes, token, timeout)
	if err != nil {
		return nil, err
	}
	var b EventBatch
	if err := fromWire("event.from", v, &b); err != nil {
		return nil, err
	}
	return &b, nil
}

// EventInject calls event.inject(class, ref) and returns a token to use as a
// barrier: wait until event.from's token is >= it.
func (c *Client) EventInject(ctx context.Context, class, ref string) (string, error) {
	return call[string](ctx, c, "event.inject", class, ref)
}
