package xapi

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestEventFromDoesNotBlockOtherCalls proves a call completes while an
// event.from long-poll is held open by the server.
func TestEventFromDoesNotBlockOtherCalls(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	f := newFake(t, loginOK("OpaqueRef:s", func(method string, _ []any) string {
		if method == "event.from" {
			once.Do(func() { close(entered) })
			<-release
			return successXML(xv([][2]any{{"events", []any{}}, {"valid_ref_counts", [][2]any{}}, {"token", "1,0"}}))
		}
		return successXML(xv([]any{"OpaqueRef:vm1"}))
	}))
	c := newTestClient(t, f.URL())
	require.NoError(t, c.Login(context.Background()))

	evDone := make(chan error, 1)
	go func() {
		_, err := c.EventFrom(context.Background(), []string{"*"}, "", 60)
		evDone <- err
	}()
	<-entered

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	vms, err := c.VMGetAll(ctx)
	require.NoError(t, err, "a call must not wait for the event.from long-poll")
	assert.Equal(t, []VMRef{"OpaqueRef:vm1"}, vms)
	select {
	case <-evDone:
		t.Fatal("event.from returned before it was released")
	default:
	}
	close(release)
	require.NoError(t, <-evDone)
}

// taskServer simulates xapi running one Async task that finishes after the
// client has asked about it a few times.
type taskServer struct {
	mu         sync.Mutex
	polls      int
	finishAt   int
	status     string
	result     string
	errorInfo  []any
	eventsOK   bool
	cancelled  atomic.Int32
	eventCalls atomic.Int32
}

func (s *taskServer) record() [][2]any {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.polls++
	status := "pending"
	if s.polls >= s.finishAt {
		status = s.status
	}
	return [][2]any{{"uuid", "t"}, {"name_label", "Async.VDI.snapshot"}, {"status", status}, {"progress", 0.5},
		{"result", s.result}, {"error_info", s.errorInfo}, {"created", "20250319T04:16:24Z"}, {"finished", "19700101T00:00:00Z"}}
}

func (s *taskServer) handle(method string, params []any) string {
	switch method {
	case "Async.VDI.snapshot":
		return successXML(xv("OpaqueRef:task-1"))
	case "task.get_record":
		return successXML(xv(s.record()))
	case "task.cancel":
		s.cancelled.Add(1)
		return successXML(xv(""))
	case "event.from":
		s.eventCalls.Add(1)
		if !s.eventsOK {
			return failureXML("MESSAGE_METHOD_UNKNOWN", "event.from")
		}
		return successXML(xv([][2]any{
			{"events", []any{
				[][2]any{{"id", "1"}, {"timestamp", "0.0"}, {"class", "task"}, {"operation", "mod"}, {"ref", "OpaqueRef:other"},
					{"snapshot", [][2]any{{"status", "success"}}}},
				[][2]any{{"id", "2"}, {"timestamp", "0.0"}, {"class", "task"}, {"operation", "mod"}, {"ref", "OpaqueRef:task-1"},
					{"snapshot", s.record()}},
			}},
			{"valid_ref_counts", [][2]any{}}, {"token", "2,0"}}))
	}
	return failureXML("MESSAGE_METHOD_UNKNOWN", method)
}

func TestWaitTask(t *testing.T) {
	tests := []struct {
		name     string
		srv      *taskServer
		wantRef  VDIRef
		wantCode string
	}{
		{"success via event.from", &taskServer{finishAt: 3, status: "success", result: "<value>OpaqueRef:snap</value>", errorInfo: []any{}, eventsOK: true}, "OpaqueRef:snap", ""},
		{"success via polling fallback", &taskServer{finishAt: 3, status: "success", result: "<value>OpaqueRef:snap</value>", errorInfo: []any{}}, "OpaqueRef:snap", ""},
		{"failure maps error_info", &taskServer{finishAt: 2, status: "failure", errorInfo: []any{"VDI_IN_USE", "OpaqueRef:v", "snapshot"}, eventsOK: true}, "", CodeVDIInUse},
		{"cancelled without error_info", &taskServer{finishAt: 2, status: "cancelled", errorInfo: []any{}}, "", CodeTaskCancelled},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, loginOK("OpaqueRef:s", tt.srv.handle))
			c := newTestClient(t, f.URL(), func(c *Config) { c.PollInterval = 5 * time.Millisecond })
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			require.NoError(t, c.Login(ctx))
			task, err := c.AsyncVDISnapshot(ctx, "OpaqueRef:vdi", nil)
			require.NoError(t, err)
			assert.Equal(t, TaskRef("OpaqueRef:task-1"), task)
			res, err := c.WaitTask(ctx, task)
			if tt.wantCode != "" {
				require.Error(t, err)
				assert.True(t, IsCode(err, tt.wantCode), "%v", err)
				ae, _ := AsAPIError(err)
				assert.Equal(t, "Async.VDI.snapshot", ae.Method)
				return
			}
			require.NoError(t, err)
			var snap VDIRef
			require.NoError(t, res.Decode(&snap))
			assert.Equal(t, tt.wantRef, snap)
			s, err := res.String()
			require.NoError(t, err)
			assert.Equal(t, "OpaqueRef:snap", s)
			assert.Equal(t, TaskStatusSuccess, res.Record.Status)
			if tt.srv.eventsOK {
				assert.Positive(t, tt.srv.eventCalls.Load())
			} else {
				assert.Equal(t, int32(1), tt.srv.eventCalls.Load(), "event.from tried once, then polling")
			}
			assert.Zero(t, tt.srv.cancelled.Load())
		})
	}
}

func TestWaitTaskCancelsOnContextEnd(t *testing.T) {
	srv := &taskServer{finishAt: 1 << 30, status: "success", errorInfo: []any{}}
	f := newFake(t, loginOK("OpaqueRef:s", srv.handle))
	c := newTestClient(t, f.URL(), func(c *Config) { c.PollInterval = 5 * time.Millisecond })
	require.NoError(t, c.Login(context.Background()))
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for f.count("task.get_record") < 3 {
			time.Sleep(time.Millisecond)
		}
		cancel()
	}()
	_, err := c.WaitTask(ctx, "OpaqueRef:task-1")
	require.ErrorIs(t, err, context.Canceled)
	assert.Equal(t, int32(1), srv.cancelled.Load(), "task.cancel sent once")
}

func TestDecodeValueString(t *testing.T) {
	tests := []struct {
		in   string
		want any
	}{
		{"", ""},
		{"<value></value>", ""},
		{"<value>OpaqueRef:x</value>", "OpaqueRef:x"},
		{"<value><struct><member><name>SM</name><value>http://x/</value></member><member><name>e</name><value/></member></struct></value>",
			map[string]any{"SM": "http://x/", "e": ""}},
		{"<value><array><data><value>a</value><value></value></data></array></value>", []any{"a", ""}},
	}
	for _, tt := range tests {
		r := TaskResult{Record: TaskRecord{Result: tt.in}}
		v, err := r.Value()
		require.NoError(t, err, tt.in)
		assert.Equal(t, tt.want, v, tt.in)
	}
	_, err := DecodeValueString("<value><struct>")
	assert.ErrorIs(t, err, ErrProtocol)
	var m map[string]string
	r := TaskResult{Record: TaskRecord{Result: "<value><struct><member><name>host</name><value>OpaqueRef:h</value></member></struct></value>"}}
	require.NoError(t, r.Decode(&m))
	assert.Equal(t, map[string]string{"host": "OpaqueRef:h"}, m)
	assert.False(t, errors.Is(err, ErrSessionInvalid))
}
