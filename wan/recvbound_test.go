package wan

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// rawPeer is a hand-driven dialler: it opens one stream of a new session
// and then writes whatever frames the test wants, window or not.
type rawPeer struct {
	conn *tls.Conn
	bw   *bufio.Writer
}

func dialRaw(t *testing.T, addr string, cfg Config) *rawPeer {
	t.Helper()
	cfg = cfg.withDefaults()
	tc, err := tlsConfig(&cfg, false)
	require.NoError(t, err)
	tcp, err := net.DialTimeout("tcp", addr, 10*time.Second)
	require.NoError(t, err)
	conn := tls.Client(tcp, tc)
	t.Cleanup(func() { _ = conn.Close() })
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	require.NoError(t, conn.Handshake())
	id := make([]byte, 16)
	_, _ = rand.Read(id)
	p := &rawPeer{conn: conn, bw: bufio.NewWriter(conn)}
	require.NoError(t, p.send(&header{T: ftHello, Ver: protocolVersion, Sess: id, K: 1}, nil))
	h, _, err := readFrame(bufio.NewReaderSize(&exactReader{r: conn}, 16))
	require.NoError(t, err)
	require.Equal(t, ftHelloAck, h.T)
	require.Empty(t, h.Err)
	require.NoError(t, conn.SetDeadline(time.Time{}))
	return p
}

func (p *rawPeer) send(h *header, payload []byte) error {
	if _, err := writeFrame(p.bw, h, payload); err != nil {
		return err
	}
	return p.bw.Flush()
}

func (p *rawPeer) data(seq uint64, payload []byte) error {
	return p.send(&header{T: ftData, Ch: 1, Seq: seq, K: kindData, N: uint32(len(payload))}, payload)
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// A peer that ignores its window cannot make a channel hold more than
// maxReceiveHeld unconsumed bytes, whether it sends out of order (reorder
// buffer) or in order to a channel nobody reads (read queue); a peer that
// stays within the bound keeps its session, and consumed frames stop
// counting.
func TestReceiveBufferBounded(t *testing.T) {
	const frame = 16 << 10
	old := maxReceiveHeld
	maxReceiveHeld = 16*(frame+frameOverhead) + frameOverhead // the open frame and 16 data frames
	t.Cleanup(func() { maxReceiveHeld = old })
	payload := randomBytes(frame)

	tests := []struct {
		name string
		run  func(t *testing.T, p *rawPeer, dst *Session)
		fail bool
	}{
		{
			name: "out of order past the bound",
			run: func(t *testing.T, p *rawPeer, _ *Session) {
				// Sequence 1 never comes: nothing is ever delivered.
				for seq := uint64(2); seq < 2+64; seq++ {
					if p.data(seq, payload) != nil {
						return // the destination has closed the stream
					}
				}
			},
			fail: true,
		},
		{
			name: "in order to a channel nobody reads",
			run: func(t *testing.T, p *rawPeer, _ *Session) {
				if p.send(&header{T: ftData, Ch: 1, Seq: 1, K: kindOpenConn, Name: "127.0.0.1:1"}, nil) != nil {
					return
				}
				for seq := uint64(2); seq < 2+64; seq++ {
					if p.data(seq, payload) != nil {
						return
					}
				}
			},
			fail: true,
		},
		{
			name: "within the bound, read, then within it again",
			run: func(t *testing.T, p *rawPeer, dst *Session) {
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				require.NoError(t, p.send(&header{T: ftData, Ch: 1, Seq: 1, K: kindOpenConn, Name: "127.0.0.1:1"}, nil))
				seq := uint64(2)
				for range 16 {
					require.NoError(t, p.data(seq, payload))
					seq++
				}
				c, target, err := dst.AcceptConn(ctx)
				require.NoError(t, err)
				assert.Equal(t, "127.0.0.1:1", target)
				got := make([]byte, 16*frame)
				_, err = io.ReadFull(readerCtx{ctx, c}, got)
				require.NoError(t, err)
				assert.True(t, bytes.Equal(bytes.Repeat(payload, 16), got))
				// Everything read: the same amount fits again.
				for range 16 {
					require.NoError(t, p.data(seq, payload))
					seq++
				}
				_, err = io.ReadFull(readerCtx{ctx, c}, got)
				require.NoError(t, err)
				assert.True(t, bytes.Equal(bytes.Repeat(payload, 16), got))
				assert.NoError(t, dst.Err(), "the session is still up")
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			noLeaks(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			pk := newPKI(t)
			l, err := Listen(ctx, "127.0.0.1:0", pk.serverConfig(t))
			require.NoError(t, err)
			defer l.Close()
			p := dialRaw(t, l.Addr().String(), pk.clientConfig(t))
			defer p.conn.Close()
			dst, err := l.Accept(ctx)
			require.NoError(t, err)
			defer dst.Close()
			tt.run(t, p, dst)
			if !tt.fail {
				return
			}
			select {
			case <-dst.Done():
			case <-ctx.Done():
				t.Fatal("the session survived a peer flooding past its window")
			}
			require.ErrorIs(t, dst.Err(), ErrProtocol)
			assert.Contains(t, dst.Err().Error(), "receive buffer overflow")
		})
	}
}
