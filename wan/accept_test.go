package wan

import (
	"context"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
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

// A temporary accept error must not stop the gateway listener: no stream
// could (re)connect afterwards.
func TestListenerSurvivesTemporaryAcceptError(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	scfg := pk.serverConfig(t)
	autoWindow := scfg.ChannelWindow <= 0
	scfg = scfg.withDefaults()
	tc, err := tlsConfig(&scfg, true)
	require.NoError(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	l := serveListener(&flakyListener{Listener: ln}, scfg, tc, autoWindow)
	defer l.Close()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	src, err := Dial(ctx, l.Addr().String(), pk.clientConfig(t))
	require.NoError(t, err, "the listener still accepts after EMFILE")
	defer src.Close()
	dst, err := l.Accept(ctx)
	require.NoError(t, err)
	defer dst.Close()
}
