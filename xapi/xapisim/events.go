package xapisim

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// formatToken renders an event.from token as xapi does ("%020Ld,%020Ld").
func formatToken(gen int64) string { return fmt.Sprintf("%020d,%020d", gen, 0) }

// parseToken parses an event.from token; "" means the beginning.
func parseToken(tok string) (int64, bool) {
	if tok == "" {
		return -1, true
	}
	a, b, ok := strings.Cut(tok, ",")
	if !ok {
		return 0, false
	}
	n, err := strconv.ParseInt(a, 10, 64)
	if err != nil {
		return 0, false
	}
	if _, err := strconv.ParseInt(b, 10, 64); err != nil {
		return 0, false
	}
	return n, true
}

type subscription struct {
	all     bool
	classes map[string]bool   // DB class names
	objects map[string]string // ref -> class
}

func parseSubs(subs []string) *subscription {
	s := &subscription{classes: map[string]bool{}, objects: map[string]string{}}
	for _, sub := range subs {
		l := strings.ToLower(sub)
		if l == "*" {
			s.all = true
			continue
		}
		// As Xapi_event's Subscription.of_string: "<class>" or
		// "<class>/<ref>", the class lower-cased. A class xapi (or the
		// simulator) does not have is no error: it selects nothing.
		cls, _, hasRef := strings.Cut(l, "/")
		name, ok := classByLower(cls)
		if !ok {
			name = cls
		}
		if hasRef {
			_, orig, _ := strings.Cut(sub, "/")
			s.objects[orig] = name
		} else {
			s.classes[name] = true
		}
	}
	return s
}

func (s *subscription) wants(class, ref string) bool {
	return s.all || s.classes[class] || s.objects[ref] == class
}

// eventFrom implements event.from: every object (of the subscribed
// classes) created, modified or deleted after the token's generation, as
// xapi's Xapi_event.from does from DB generation stamps. It blocks until
// there is at least one event or the timeout expires.
func eventFrom(c *Call) (any, error) {
	subs := parseSubs(c.Set(0))
	since, ok := parseToken(c.Str(1))
	if !ok {
		return nil, Errorf(ErrEventTokenParse, c.Str(1))
	}
	c.Pool.mu.Lock()
	lost := since >= 0 && since < c.Pool.db.lostBefore
	c.Pool.mu.Unlock()
	if lost {
		return nil, Errorf(ErrEventsLost)
	}
	timeout := time.Duration(c.Float(2) * float64(time.Second))
	deadline := time.NewTimer(max(timeout, 0))
	defer deadline.Stop()
	for {
		c.Pool.mu.Lock()
		events, counts, gen := collectEvents(c.Pool.db, subs, since)
		wait := c.Pool.db.changed
		c.Pool.mu.Unlock()
		if len(events) > 0 {
			return eventResult(events, counts, gen), nil
		}
		select {
		case <-wait:
			// Batch a little, as xapi's event_from_delay does.
			select {
			case <-time.After(50 * time.Millisecond):
			case <-c.Ctx.Done():
			}
		case <-deadline.C:
			c.Pool.mu.Lock()
			events, counts, gen = collectEvents(c.Pool.db, subs, since)
			c.Pool.mu.Unlock()
			return eventResult(events, counts, gen), nil
		case <-c.Ctx.Done():
			return nil, Errorf(ErrInternal, "request cancelled")
		case <-c.Sim.done:
			return nil, Errorf(ErrInternal, "simulator shutting down")
		}
	}
}

func eventResult(events []any, counts map[string]any, gen int64) Struct {
	return Struct{
		{Name: "events", Value: events},
		{Name: "valid_ref_counts", Value: counts},
		{Name: "token", Value: formatToken(gen)},
	}
}

func collectEvents(d *db, subs *subscription, since int64) ([]any, map[string]any, int64) {
	type ev struct {
		gen int64
		s   Struct
	}
	var evs []ev
	counts := map[string]any{}
	for _, cn := range classOrder {
		if subs.all || subs.classes[cn] {
			counts[strings.ToLower(cn)] = I4(0)
		}
	}
	for _, o := range d.objs {
		if !subs.wants(o.Class, o.Ref) {
			continue
		}
		if _, ok := counts[strings.ToLower(o.Class)]; ok {
			counts[strings.ToLower(o.Class)] = counts[strings.ToLower(o.Class)].(I4) + 1
		}
		if o.Modified <= since {
			continue
		}
		op := "mod"
		if o.Created > since {
			op = "add"
		}
		evs = append(evs, ev{o.Modified, Struct{
			{Name: "id", Value: strconv.FormatInt(o.Modified, 10)},
			{Name: "timestamp", Value: "0.0"},
			{Name: "class", Value: strings.ToLower(o.Class)},
			{Name: "operation", Value: op},
			{Name: "ref", Value: o.Ref},
			{Name: "snapshot", Value: d.record(o)},
		}})
	}
	for _, t := range d.tombs {
		if since < 0 || t.Deleted <= since || !subs.wants(t.Class, t.Ref) {
			continue
		}
		evs = append(evs, ev{t.Deleted, Struct{
			{Name: "id", Value: strconv.FormatInt(t.Deleted, 10)},
			{Name: "timestamp", Value: "0.0"},
			{Name: "class", Value: strings.ToLower(t.Class)},
			{Name: "operation", Value: "del"},
			{Name: "ref", Value: t.Ref},
		}})
	}
	slices.SortFunc(evs, func(a, b ev) int { return int(a.gen - b.gen) })
	out := make([]any, 0, len(evs))
	for _, e := range evs {
		out = append(out, e.s)
	}
	return out, counts, d.gen
}
