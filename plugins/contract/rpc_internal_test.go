package contract

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCancelOvertakingItsCall(t *testing.T) {
	t.Parallel()
	tr := NewCallTracker(context.Background())
	tr.Cancel(5) // arrives before the call it cancels
	ctx, done := tr.Begin(CallMeta{ID: 5})
	require.ErrorIs(t, ctx.Err(), context.Canceled)
	done()

	other, done2 := tr.Begin(CallMeta{ID: 6})
	assert.NoError(t, other.Err(), "other calls are not affected")
	tr.Cancel(6)
	assert.ErrorIs(t, other.Err(), context.Canceled)
	done2()

	tr.mu.Lock()
	assert.Empty(t, tr.running, "finished calls are forgotten")
	assert.Empty(t, tr.early)
	tr.mu.Unlock()
}

func TestEarlyCancelsExpire(t *testing.T) {
	t.Parallel()
	tr := NewCallTracker(context.Background())
	tr.Cancel(1)
	tr.mu.Lock()
	tr.early[1] = time.Now().Add(-2 * earlyTTL)
	tr.mu.Unlock()
	_, done := tr.Begin(CallMeta{ID: 2})
	done()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	assert.NotContains(t, tr.early, uint64(1), "a stale early cancel is dropped")
}

func TestDeadlineAndBaseContext(t *testing.T) {
	t.Parallel()
	base, cancelBase := context.WithCancel(context.Background())
	tr := NewCallTracker(base)
	dl := time.Now().Add(time.Hour)
	ctx, done := tr.Begin(CallMeta{ID: 1, Deadline: dl})
	defer done()
	got, ok := ctx.Deadline()
	require.True(t, ok)
	assert.True(t, got.Equal(dl))
	cancelBase()
	assert.ErrorIs(t, ctx.Err(), context.Canceled, "the backend's base ctx ends every call")
}

func TestTransportErrorClassification(t *testing.T) {
	t.Parallel()
	cases := []struct {
		err  error
		want error
	}{
		{rpcShutdown(), ErrPluginExited},
		{ioEOF(), ErrPluginExited},
		{serverError("rpc: can't find method Plugin.Foo"), ErrUnsupported},
		{serverError("gob: type mismatch"), ErrInternal},
	}
	for _, tc := range cases {
		assert.ErrorIs(t, transportError("M", tc.err), tc.want, tc.err.Error())
	}
}
