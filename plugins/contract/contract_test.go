package contract_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-plugin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// fakeStorage records what it saw and lets tests script behaviour.
type fakeStorage struct {
	contract.UnimplementedStorage
	statusErr error
	started   chan struct{}
	mu        sync.Mutex
	sawErr    error
	deadline  time.Time
}

func (f *fakeStorage) Info(context.Context) (contract.Info, error) {
	return contract.Info{Kind: contract.KindStorage, Name: "fake", APIVersions: []string{"1.0"},
		Capabilities: contract.CapSource | contract.CapResume}, nil
}

func (f *fakeStorage) Status(ctx context.Context, r contract.StatusRequest) (contract.StorageStatus, error) {
	if f.statusErr != nil {
		return contract.StorageStatus{}, f.statusErr
	}
	return contract.StorageStatus{Handle: r.Handle, State: contract.StateIdle, BytesCopied: 42}, nil
}

// SyncRound blocks until its ctx ends and reports what ended it.
func (f *fakeStorage) SyncRound(ctx context.Context, r contract.SyncRoundRequest) (contract.SyncRoundResponse, error) {
	dl, _ := ctx.Deadline()
	f.mu.Lock()
	f.deadline = dl
	f.mu.Unlock()
	close(f.started)
	<-ctx.Done()
	f.mu.Lock()
	f.sawErr = ctx.Err()
	f.mu.Unlock()
	return contract.SyncRoundResponse{}, fmt.Errorf("round %d: %w", r.Round, ctx.Err())
}

func harness(t *testing.T, impl contract.Storage) contract.Storage {
	t.Helper()
	client, _ := plugin.TestPluginRPCConn(t, map[string]plugin.Plugin{
		string(contract.KindStorage): &contract.StoragePlugin{Impl: impl},
	}, nil)
	t.Cleanup(func() { _ = client.Close() })
	raw, err := client.Dispense(string(contract.KindStorage))
	require.NoError(t, err)
	s, ok := raw.(contract.Storage)
	require.True(t, ok)
	return s
}

func TestErrorsSurviveRPC(t *testing.T) {
	t.Parallel()
	sentinels := []error{
		contract.ErrNotFound, contract.ErrInvalidArgument, contract.ErrAlreadyExists,
		contract.ErrCancelled, contract.ErrUnavailable, contract.ErrUnsupported,
		contract.ErrFailedPrecondition, contract.ErrPermissionDenied, contract.ErrPluginExited,
		contract.ErrInternal,
	}
	for _, sentinel := range sentinels {
		t.Run(sentinel.Error(), func(t *testing.T) {
			t.Parallel()
			impl := &fakeStorage{statusErr: fmt.Errorf("handle h1: %w", sentinel)}
			s := harness(t, impl)
			_, err := s.Status(context.Background(), contract.StatusRequest{Handle: "h1"})
			require.Error(t, err)
			assert.ErrorIs(t, err, sentinel)
			assert.Contains(t, err.Error(), "handle h1")
			for _, other := range sentinels {
				if other != sentinel {
					assert.NotErrorIs(t, err, other)
				}
			}
		})
	}
}

func TestContextErrorsSurviveRPC(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		err  error
		is   error
		code contract.Code
	}{
		{"canceled", context.Canceled, context.Canceled, contract.CodeCancelled},
		{"deadline", context.DeadlineExceeded, context.DeadlineExceeded, contract.CodeDeadlineExceeded},
		{"unclassified", errors.New("disk on fire"), contract.ErrInternal, contract.CodeInternal},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := harness(t, &fakeStorage{statusErr: tc.err})
			_, err := s.Status(context.Background(), contract.StatusRequest{Handle: "h"})
			require.Error(t, err)
			assert.ErrorIs(t, err, tc.is)
			assert.Equal(t, tc.code, contract.CodeOf(err))
			if tc.code != contract.CodeInternal {
				assert.ErrorIs(t, err, contract.ErrCancelled)
			}
		})
	}
}

func TestWireRoundTripEveryCode(t *testing.T) {
	t.Parallel()
	for _, code := range contract.Codes() {
		w := &contract.WireError{Code: code, Message: "m"}
		back := contract.ToWire(contract.FromWire(w))
		assert.Equal(t, w, back, "code %s", code)
		assert.ErrorIs(t, contract.FromWire(w), code.Sentinel())
	}
	assert.Nil(t, contract.ToWire(nil))
	assert.NoError(t, contract.FromWire(nil))
}

func TestCancellationReachesServer(t *testing.T) {
	t.Parallel()
	impl := &fakeStorage{started: make(chan struct{})}
	s := harness(t, impl)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		_, err := s.SyncRound(ctx, contract.SyncRoundRequest{Handle: "h", Round: 3})
		done <- err
	}()
	<-impl.started
	cancel()
	err := <-done
	require.Error(t, err)
	assert.ErrorIs(t, err, contract.ErrCancelled)
	assert.ErrorIs(t, err, context.Canceled)
	impl.mu.Lock()
	defer impl.mu.Unlock()
	assert.ErrorIs(t, impl.sawErr, context.Canceled, "the server-side ctx must have been cancelled")
	assert.True(t, impl.deadline.IsZero())
}

func TestDeadlineForwarded(t *testing.T) {
	t.Parallel()
	impl := &fakeStorage{started: make(chan struct{})}
	s := harness(t, impl)
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	want, _ := ctx.Deadline()
	_, err := s.SyncRound(ctx, contract.SyncRoundRequest{Handle: "h"})
	require.Error(t, err)
	assert.ErrorIs(t, err, contract.ErrCancelled)
	assert.ErrorIs(t, err, context.DeadlineExceeded)
	impl.mu.Lock()
	defer impl.mu.Unlock()
	assert.True(t, impl.deadline.Equal(want), "server saw deadline %v, want %v", impl.deadline, want)
	assert.Error(t, impl.sawErr)
}

func TestPreCancelledCallNeverReachesServer(t *testing.T) {
	t.Parallel()
	impl := &fakeStorage{started: make(chan struct{})}
	s := harness(t, impl)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.SyncRound(ctx, contract.SyncRoundRequest{Handle: "h"})
	require.ErrorIs(t, err, contract.ErrCancelled)
	select {
	case <-impl.started:
		t.Fatal("server ran a call whose ctx was already cancelled")
	default:
	}
}

func TestUnimplementedIsUnsupported(t *testing.T) {
	t.Parallel()
	s := harness(t, &fakeStorage{})
	_, err := s.Finalize(context.Background(), contract.FinalizeRequest{Handle: "x"})
	require.ErrorIs(t, err, contract.ErrUnsupported)
	info, err := s.Info(context.Background())
	require.NoError(t, err)
	assert.Equal(t, "fake", info.Name)
	assert.True(t, info.Capabilities.Has(contract.CapResume))
	assert.Equal(t, []string{"resume", "source"}, info.Capabilities.Names())
}

func TestConcurrentStatus(t *testing.T) {
	t.Parallel()
	s := harness(t, &fakeStorage{})
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 20; j++ {
				st, err := s.Status(context.Background(), contract.StatusRequest{Handle: fmt.Sprint(i)})
				if err == nil && st.Handle != fmt.Sprint(i) {
					err = fmt.Errorf("got status of %q, want %d", st.Handle, i)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
