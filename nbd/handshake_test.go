package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

// rawConn speaks the transmission phase by hand, to send requests our
// client would refuse to send.
type rawConn struct {
	conn       net.Conn
	r          *bufio.Reader
	structured bool
	handle     uint64
}

func rawTransmission(t *testing.T, addr, export string, structured bool) *rawConn {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { _ = conn.Close() })
	h := &clientHandshake{conn: conn}
	require.NoError(t, h.start())
	if structured {
		require.NoError(t, h.negotiateStructured(export))
		require.True(t, h.structured)
	}
	require.NoError(t, h.infoGo(optGo, export))
	return &rawConn{conn: conn, r: bufio.NewReader(conn), structured: structured}
}

// simple sends one request and returns the errno of its reply, skipping
// any data.
func (c *rawConn) simple(t *testing.T, req Request, payload []byte) uint32 {
	t.Helper()
	c.handle++
	req.Handle = c.handle
	_, err := c.conn.Write(append(req.encode(nil), payload...))
	require.NoError(t, err)
	for {
		var m [4]byte
		_, err := io.ReadFull(c.r, m[:])
		require.NoError(t, err)
		n, err := replyHeaderLen(binary.BigEndian.Uint32(m[:]))
		require.NoError(t, err)
		hb := make([]byte, n)
		copy(hb, m[:])
		_, err = io.ReadFull(c.r, hb[4:])
		require.NoError(t, err)
		rep, err := DecodeReply(hb)
		require.NoError(t, err)
		require.Equal(t, req.Handle, rep.Handle)
		if !rep.Structured {
			if rep.Errno == 0 && req.Type == cmdRead {
				_, err = io.CopyN(io.Discard, c.r, int64(req.Length))
				require.NoError(t, err)
			}
			return rep.Errno
		}
		require.True(t, c.structured, "structured reply without negotiation")
		p := make([]byte, rep.Length)
		_, err = io.ReadFull(c.r, p)
		require.NoError(t, err)
		var errno uint32
		if rep.Type == chunkError {
			errno, _, err = decodeErrorChunk(rep.Type, p)
			require.NoError(t, err)
		}
		if rep.Flags&chunkFlagDone != 0 {
			return errno
		}
	}
}

func (c *rawConn) disc(t *testing.T) {
	t.Helper()
	_, err := c.conn.Write(Request{Type: cmdDisc}.encode(nil))
	require.NoError(t, err)
	_, err = c.r.ReadByte()
	assert.ErrorIs(t, err, io.EOF, "server closes after DISC")
}

// listenSilent accepts connections and never answers.
func listenSilent(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		var conns []net.Conn
		defer func() {
			for _, c := range conns {
				_ = c.Close()
			}
		}()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns = append(conns, c)
		}
	}()
	t.Cleanup(func() { _ = ln.Close(); <-done })
	return ln.Addr().String()
}

type optStep struct {
	opt  uint32
	data []byte
	want []uint32 // reply types up to and including ACK or an error
}

func nameData(name string, infos ...uint16) []byte {
	var d []byte
	d = binary.BigEndian.AppendUint32(d, uint32(len(name)))
	d = append(d, name...)
	d = binary.BigEndian.AppendUint16(d, uint16(len(infos)))
	for _, i := range infos {
		d = binary.BigEndian.AppendUint16(d, i)
	}
	return d
}

func metaData(export string, queries ...string) []byte {
	var d []byte
	d = binary.BigEndian.AppendUint32(d, uint32(len(export)))
	d = append(d, export...)
	d = binary.BigEndian.AppendUint32(d, uint32(len(queries)))
	for _, q := range queries {
		d = binary.BigEndian.AppendUint32(d, uint32(len(q)))
		d = append(d, q...)
	}
	return d
}

func TestHandshakeTable(t *testing.T) {
	checkNoLeak(t)
	exports := map[string]*Export{
		"a": {Name: "a", Description: "first", Backend: NewMemBackend(4096)},
		"b": {Name: "b", Backend: NewMemBackend(8192), ReadOnly: true},
	}
	resolve := func(_ context.Context, name string) (*Export, error) {
		if name == "secret" {
			return nil, fmt.Errorf("no session: %w", ErrPolicy)
		}
		if e, ok := exports[name]; ok {
			return e, nil
		}
		return nil, ErrUnknownExport
	}
	list := func(context.Context) ([]*Export, error) { return []*Export{exports["a"], exports["b"]}, nil }
	p := newPKI(t)
	info := repInfo
	cases := []struct {
		name       string
		requireTLS bool
		noTLS      bool
		steps      []optStep
		closed     bool // the server must close the connection after the steps
	}{
		{name: "list", steps: []optStep{{optList, nil, []uint32{repServer, repServer, repAck}}}},
		{name: "list with data", steps: []optStep{{optList, []byte("x"), []uint32{repErrInvalid}}}},
		{name: "info", steps: []optStep{{optInfo, nameData("a", infoName, infoDescription), []uint32{info, info, info, info, repAck}}}},
		{name: "info default block size only", steps: []optStep{{optInfo, nameData("b"), []uint32{info, info, repAck}}}},
		{name: "info unknown", steps: []optStep{{optInfo, nameData("zzz"), []uint32{repErrUnknown}}}},
		{name: "go policy", steps: []optStep{{optGo, nameData("secret"), []uint32{repErrPolicy}}}},
		{name: "info malformed", steps: []optStep{{optInfo, []byte{0, 0, 0, 9, 'a'}, []uint32{repErrInvalid}}}},
		{name: "info odd info count", steps: []optStep{{optInfo, append(nameData("a"), 0), []uint32{repErrInvalid}}}},
		{name: "structured with data", steps: []optStep{{optStructuredReply, []byte{1}, []uint32{repErrInvalid}}}},
		{name: "meta before structured", steps: []optStep{{optSetMetaContext, metaData("a", MetaContextBaseAllocation), []uint32{repErrInvalid}}}},
		{name: "structured and meta", steps: []optStep{
			{optStructuredReply, nil, []uint32{repAck}},
			{optSetMetaContext, metaData("a", MetaContextBaseAllocation), []uint32{repMetaContext, repAck}},
			{optSetMetaContext, metaData("a", "qemu:dirty-bitmap:x"), []uint32{repAck}},
			{optListMetaContext, metaData("a"), []uint32{repMetaContext, repAck}},
			{optListMetaContext, metaData("a", "base:"), []uint32{repMetaContext, repAck}},
			{optSetMetaContext, []byte{0, 0, 0, 1}, []uint32{repErrInvalid}},
		}},
		{name: "starttls without tls", noTLS: true, steps: []optStep{{optStartTLS, nil, []uint32{repErrPolicy}}}},
		{name: "starttls with data", steps: []optStep{{optStartTLS, []byte{1}, []uint32{repErrInvalid}}}},
		{name: "unknown option", steps: []optStep{{99, []byte("abc"), []uint32{repErrUnsup}}}},
		{name: "peek export", steps: []optStep{{optPeekExport, nil, []uint32{repErrUnsup}}}},
		{name: "option too big", steps: []optStep{{optInfo, make([]byte, maxOptionLen+1), []uint32{repErrTooBig}}, {optList, nil, []uint32{repServer, repServer, repAck}}}},
		{name: "tls required list", requireTLS: true, steps: []optStep{{optList, nil, []uint32{repErrTLSReqd}}}},
		{name: "tls required info", requireTLS: true, steps: []optStep{{optInfo, nameData("a"), []uint32{repErrTLSReqd}}}},
		{name: "tls required go", requireTLS: true, steps: []optStep{{optGo, nameData("a"), []uint32{repErrTLSReqd}}}},
		{name: "tls required structured", requireTLS: true, steps: []optStep{{optStructuredReply, nil, []uint32{repErrTLSReqd}}}},
		{name: "tls required export name", requireTLS: true, steps: []optStep{{optExportName, []byte("a"), nil}}, closed: true},
		{name: "abort", steps: []optStep{{optAbort, nil, []uint32{repAck}}}, closed: true},
		{name: "export name unknown", steps: []optStep{{optExportName, []byte("nope"), nil}}, closed: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			opts := ServerOptions{Exports: resolve, List: list, Logger: testutil.Logger(t), RequireTLS: tc.requireTLS}
			if !tc.noTLS {
				opts.TLS = p.serverTLS()
			}
			srv, err := NewServer(opts)
			require.NoError(t, err)
			cli, sc := net.Pipe()
			defer cli.Close()
			done := make(chan error, 1)
			go func() { done <- srv.ServeConn(context.Background(), sc) }()
			_ = cli.SetDeadline(time.Now().Add(10 * time.Second))
			h := &clientHandshake{conn: cli}
			require.NoError(t, h.start())
			for _, st := range tc.steps {
				go func() { _ = h.sendOpt(st.opt, st.data) }() // net.Pipe is unbuffered
				for i, want := range st.want {
					typ, _, err := h.readOptReply(st.opt)
					if want&repFlagError == 0 {
						require.NoError(t, err)
					}
					assert.Equal(t, fmt.Sprintf("%#x", want), fmt.Sprintf("%#x", typ), "option %d reply %d", st.opt, i)
				}
			}
			if tc.closed {
				_, err := cli.Read(make([]byte, 1))
				assert.ErrorIs(t, err, io.EOF, "server must close")
			} else {
				go func() { _ = h.sendOpt(optAbort, nil) }()
				typ, _, err := h.readOptReply(optAbort)
				require.NoError(t, err)
				assert.Equal(t, repAck, typ)
			}
			_ = cli.Close()
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("ServeConn did not return")
			}
		})
	}
}

func TestHandshakeMalformedStart(t *testing.T) {
	checkNoLeak(t)
	look, _ := StaticExports(&Export{Name: "a", Backend: NewMemBackend(4096)})
	srv, err := NewServer(ServerOptions{Exports: look, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	for name, input := range map[string][]byte{
		"no fixed newstyle":    {0, 0, 0, 0},
		"unknown flags":        {0, 0, 0, 0x81},
		"bad option magic":     append([]byte{0, 0, 0, 1}, make([]byte, 16)...),
		"truncated option":     append(binary.BigEndian.AppendUint64([]byte{0, 0, 0, 1}, optMagic), 0, 0),
		"huge export name":     binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint64([]byte{0, 0, 0, 1}, optMagic), optExportName), 1<<30),
		"empty after greeting": {},
	} {
		t.Run(name, func(t *testing.T) {
			err := serveBytes(t, srv, input)
			assert.Error(t, err)
		})
	}
}

// serveBytes runs ServeConn against a client that sends input, then closes,
// while draining everything the server writes. It returns ServeConn's error.
func serveBytes(t testing.TB, srv *Server, input []byte) error {
	cli, sc := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), sc) }()
	drained := make(chan struct{})
	go func() {
		defer close(drained)
		_, _ = io.Copy(io.Discard, cli)
	}()
	_ = cli.SetWriteDeadline(time.Now().Add(5 * time.Second))
	_, _ = cli.Write(input)
	_ = cli.Close()
	<-drained
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("ServeConn did not return")
		return errors.New("timeout")
	}
}

func TestTLSClientVariants(t *testing.T) {
	checkNoLeak(t)
	p := newPKI(t)
	mem := NewMemBackend(1 << 20)
	_, err := mem.WriteAt([]byte("secret data"), 0)
	require.NoError(t, err)
	ts := startStatic(t, p.serverTLS(), true, &Export{Name: "t", Backend: mem})
	other := newPKI(t)
	ctx := context.Background()
	cases := []struct {
		name string
		opts DialOptions
		err  error // nil: must succeed
		any  bool  // some error, no specific sentinel
	}{
		{"ca pool", DialOptions{TLS: p.clientTLS()}, nil, false},
		{"pinned certificate", DialOptions{PinnedCertPEM: p.serverPEM}, nil, false},
		{"pinned wrong certificate", DialOptions{PinnedCertPEM: other.serverPEM}, nil, true},
		{"wrong ca", DialOptions{TLS: other.clientTLS()}, nil, true},
		{"wrong server name", DialOptions{TLS: p.clientTLS(), ServerName: "evil.example"}, nil, true},
		{"no tls to a tls-only server", DialOptions{}, ErrTLSRequired, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.opts.Export = "t"
			c, err := Dial(ctx, "tcp", ts.addr, tc.opts)
			switch {
			case tc.err != nil:
				assert.ErrorIs(t, err, tc.err)
			case tc.any:
				assert.Error(t, err)
			default:
				require.NoError(t, err)
				b := make([]byte, 11)
				require.NoError(t, c.ReadAt(ctx, b, 0))
				assert.Equal(t, "secret data", string(b))
				require.NoError(t, c.Close())
			}
			if err != nil && c != nil {
				_ = c.Close()
			}
		})
	}
	// The server refuses TLS below 1.2 even if its configuration allows it.
	conn, err := net.Dial("tcp", ts.addr)
	require.NoError(t, err)
	h := &clientHandshake{conn: conn}
	require.NoError(t, h.start())
	old := p.clientTLS()
	old.MinVersion, old.MaxVersion = tls.VersionTLS10, tls.VersionTLS11
	assert.Error(t, h.startTLS(ctx, old), "TLS 1.1 handshake must fail")
	_ = conn.Close()

	l, err := ListExports(ctx, "tcp", ts.addr, DialOptions{TLS: p.clientTLS()})
	require.NoError(t, err)
	assert.Equal(t, []ExportInfo{{Name: "t"}}, l)
	info, err := QueryExport(ctx, "tcp", ts.addr, DialOptions{Export: "t", PinnedCertPEM: p.serverPEM})
	require.NoError(t, err)
	assert.Equal(t, int64(1<<20), info.Size)
	assert.Equal(t, uint32(MaxPayload), info.MaxBlock)
	_, err = QueryExport(ctx, "tcp", ts.addr, DialOptions{Export: "nope", PinnedCertPEM: p.serverPEM})
	assert.ErrorIs(t, err, ErrUnknownExport)
}

// A pinned client that shares a TLS session cache must check the pin on
// resumed connections too: a session established under one pin must not
// let a client pinning another certificate in.
func TestPinnedCertCheckedOnResumption(t *testing.T) {
	checkNoLeak(t)
	p := newPKI(t)
	other := newPKI(t)
	ts := startStatic(t, p.serverTLS(), true, &Export{Name: "t", Backend: NewMemBackend(1 << 20)})
	ctx := context.Background()
	cache := tls.NewLRUClientSessionCache(4)
	opts := func(pin []byte) DialOptions {
		return DialOptions{Export: "t", PinnedCertPEM: pin, ServerName: "nbd.test",
			TLS: &tls.Config{ClientSessionCache: cache}}
	}
	c, err := Dial(ctx, "tcp", ts.addr, opts(p.serverPEM))
	require.NoError(t, err)
	b := make([]byte, 8)
	require.NoError(t, c.ReadAt(ctx, b, 0)) // reads the session ticket too
	require.NoError(t, c.Close())

	c, err = Dial(ctx, "tcp", ts.addr, opts(other.serverPEM))
	if c != nil {
		_ = c.Close()
	}
	require.Error(t, err, "the wrong pin must be refused even when the session resumes")
}
