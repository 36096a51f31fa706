package nbd

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var errListenerBroken = errors.New("listener broken")

// brokenListener passes connections through until broken is set; the next
// Accept then fails with a permanent (non-Temporary) error.
type brokenListener struct {
	net.Listener
	broken atomic.Bool
	closes atomic.Int32
}

func (l *brokenListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if l.broken.Load() {
		if c != nil {
			_ = c.Close()
		}
		return nil, errListenerBroken
	}
	return c, err
}

func (l *brokenListener) Close() error {
	l.closes.Add(1)
	return l.Listener.Close()
}

// On a permanent accept error Serve closes the listener at once (its port
// is released, new clients are refused instead of hanging), keeps serving
// the open connections, and returns the error once they have ended.
func TestServeClosesListenerOnPermanentAcceptError(t *testing.T) {
	checkNoLeak(t)
	srv, err := NewServer(ServerOptions{Exports: func(context.Context, string) (*Export, error) {
		return &Export{Backend: NewMemBackend(1 << 16)}, nil
	}, Logger: nullLogger()})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	addr := ln.Addr().String()
	bl := &brokenListener{Listener: ln}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, bl) }()

	c, err := Dial(ctx, "tcp", addr, DialOptions{})
	require.NoError(t, err)
	require.NoError(t, c.WriteAt(ctx, []byte("hello"), 0, false))

	bl.broken.Store(true)
	wake, err := net.Dial("tcp", addr) // wakes the blocked Accept
	require.NoError(t, err)
	_ = wake.Close()
	require.Eventually(t, func() bool { return bl.closes.Load() > 0 }, 10*time.Second, 5*time.Millisecond,
		"Serve closes the listener after a permanent accept error")
	_, err = net.DialTimeout("tcp", addr, 2*time.Second)
	require.Error(t, err, "the port is released: a new client is refused, not left hanging")

	// The open connection is still served.
	buf := make([]byte, 5)
	require.NoError(t, c.ReadAt(ctx, buf, 0))
	assert.Equal(t, "hello", string(buf))
	select {
	case err := <-done:
		t.Fatalf("Serve returned with a connection still open: %v", err)
	default:
	}
	require.NoError(t, c.Close())
	select {
	case err := <-done:
		require.ErrorIs(t, err, errListenerBroken)
	case <-ctx.Done():
		t.Fatal("Serve did not return after its last connection ended")
	}
	assert.GreaterOrEqual(t, bl.closes.Load(), int32(1))
}

// Serve closes the listener when ctx ends too, and a second Close of it by
// the caller is harmless.
func TestServeClosesListenerOnCancel(t *testing.T) {
	checkNoLeak(t)
	srv, err := NewServer(ServerOptions{Exports: func(context.Context, string) (*Export, error) {
		return &Export{Backend: NewMemBackend(1 << 16)}, nil
	}, Logger: nullLogger()})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	bl := &brokenListener{Listener: ln}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, bl) }()
	cancel()
	require.NoError(t, <-done)
	assert.GreaterOrEqual(t, bl.closes.Load(), int32(1))
	_, err = net.DialTimeout("tcp", ln.Addr().String(), 2*time.Second)
	require.Error(t, err)
	assert.ErrorIs(t, bl.Close(), net.ErrClosed, "closing again only reports it is closed")
}
