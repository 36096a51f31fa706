package nbd

import (
	"context"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// stuckBackend blocks every write until release is closed.
type stuckBackend struct {
	*MemBackend
	started chan struct{}
	once    sync.Once
	release chan struct{}
}

func (b *stuckBackend) WriteAt(p []byte, off int64) (int, error) {
	b.once.Do(func() { close(b.started) })
	<-b.release
	return b.MemBackend.WriteAt(p, off)
}

// Client.Close must not hang when the server has stopped reading (its
// backend is stuck): the DISC write, and a request write stuck behind a
// full socket, are bounded.
func TestClientCloseWhenServerStopsReading(t *testing.T) {
	checkNoLeak(t)
	const size = 64 << 20
	be := &stuckBackend{MemBackend: NewMemBackend(size), started: make(chan struct{}), release: make(chan struct{})}
	srv, err := NewServer(ServerOptions{Exports: func(context.Context, string) (*Export, error) {
		return &Export{Backend: be}, nil
	}, MaxInFlight: 1, Logger: nullLogger()})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	sctx, scancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx, ln) }()
	defer func() {
		close(be.release)
		scancel()
		assert.NoError(t, <-served)
	}()

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := Dial(ctx, "tcp", ln.Addr().String(), DialOptions{RequestSize: 4 << 20})
	require.NoError(t, err)
	// 64 MiB of writes in flight: the server takes one, its backend sticks,
	// it stops reading, and the socket buffers fill up under the client.
	wrote := make(chan error, 1)
	go func() { wrote <- c.WriteAt(ctx, make([]byte, size), 0, false) }()
	select {
	case <-be.started:
	case <-ctx.Done():
		t.Fatal("the server never got a write")
	}
	time.Sleep(300 * time.Millisecond) // let the client's writer block

	closed := make(chan struct{})
	go func() {
		_ = c.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-ctx.Done():
		t.Fatal("Client.Close hangs while the server does not read")
	}
	select {
	case err := <-wrote:
		require.ErrorIs(t, err, ErrClosed, "writes in flight fail when the client closes")
	case <-ctx.Done():
		t.Fatal("WriteAt did not return after Close")
	}
}
