package agent

import (
	"context"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// flakyListener fails its first Accept with EMFILE, as a listener does
// when the process is out of file descriptors for a moment.
type flakyListener struct {
	net.Listener
	failed atomic.Bool
}

func (l *flakyListener) Accept() (net.Conn, error) {
	if !l.failed.Swap(true) {
		return nil, &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", syscall.EMFILE)}
	}
	return l.Listener.Accept()
}

// A temporary accept error must not stop the agent (and with it the
// migration's backends and gateway).
func TestAgentSurvivesTemporaryAcceptError(t *testing.T) {
	b, err := NewBundle("mig-1")
	require.NoError(t, err)
	a, err := New(context.Background(), Config{MigrationID: "mig-1", Role: contract.RoleDestination, TLS: b.Destination,
		IdleTimeout: time.Minute, StateDir: t.TempDir(), Logger: testutil.Logger(t)})
	require.NoError(t, err)
	a.ln = &flakyListener{Listener: a.ln}
	errc := make(chan error, 1)
	go func() { errc <- a.Serve(context.Background()) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = a.Stop(ctx)
		<-errc
	}()
	tc, err := b.Controller.ClientTLS(contract.RoleDestination)
	require.NoError(t, err)
	conn := dial(t, a.Addr(), tc)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = hello(ctx, conn, contract.RoleDestination)
	require.NoError(t, err, "the agent still serves after EMFILE")
	select {
	case <-a.Done():
		assert.Fail(t, "the agent stopped")
	default:
	}
}
