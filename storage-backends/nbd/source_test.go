package nbdstore

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/nbd"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// Without a certificate to pin, xapi's NBD export is not dialled in clear
// (the export name carries the xapi session) unless allow_insecure_nbd.
func TestXapiNBDWithoutCertNeedsAllowInsecure(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var accepted atomic.Int32
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			_ = c.Close()
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); <-done })
	host, portStr, err := net.SplitHostPort(ln.Addr().String())
	require.NoError(t, err)
	port, err := strconv.ParseInt(portStr, 10, 64)
	require.NoError(t, err)
	in := xapi.VDINBDServerInfo{Address: host, Port: port, Exportname: "/vdi?session_id=OpaqueRef:secret"}

	_, err = dialXapiNBD(t.Context(), in, Config{Connections: 1})
	require.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "allow_insecure_nbd")
	assert.NotContains(t, err.Error(), "OpaqueRef:secret")
	assert.Zero(t, accepted.Load(), "nothing was sent to the host")

	_, err = dialXapiNBD(t.Context(), in, Config{Connections: 1, AllowInsecureNBD: true})
	require.Error(t, err, "the fake host hangs up")
	assert.NotContains(t, err.Error(), "OpaqueRef:secret")
	assert.NotZero(t, accepted.Load(), "allowed: the host was dialled")
}

// A receiver that accepts connections but whose requests always fail on
// the connection must not keep a round retrying forever: after the
// reconnect timeout without any completed request, the round gives up
// with unavailable.
func TestPeerGivesUpWhenNoRequestCompletes(t *testing.T) {
	const token = "tok-secret"
	look, _ := nbd.StaticExports(&nbd.Export{Name: dataExport(token, 0, "s"), Backend: nbd.NewMemBackend(1 << 20), MultiConn: true})
	srv, err := nbd.NewServer(nbd.ServerOptions{Exports: look})
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); require.NoError(t, <-served) })

	var wire atomic.Int64
	p := newPeer(peerConfig{network: "tcp", addr: ln.Addr().String(), token: token, snapshot: "s", conns: 1, inFlight: 1,
		chunk: 1 << 20, timeout: 300 * time.Millisecond}, &wire, hclog.NewNullLogger())
	defer p.close()
	rctx, rcancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer rcancel()
	attempts := 0
	err = p.do(rctx, func(context.Context, *nbd.Pool) error {
		attempts++
		return fmt.Errorf("write: %w", nbd.ErrClosed) // the connection broke under the request
	})
	require.ErrorIs(t, err, contract.ErrUnavailable)
	assert.NotErrorIs(t, err, contract.ErrCancelled)
	assert.NotContains(t, err.Error(), token)
	assert.Greater(t, attempts, 1, "the request was retried on new connections first")
}
