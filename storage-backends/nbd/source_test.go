package nbdstore

import (
	"net"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

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
