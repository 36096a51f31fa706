package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// blockStatusChunk is a block status chunk for handle 2 (context 1).
func blockStatusChunk(flags uint16, lengths ...uint32) []byte {
	b := appendChunkHeader(nil, flags, chunkBlockStatus, 2, uint32(4+8*len(lengths)))
	b = binary.BigEndian.AppendUint32(b, 1)
	for _, l := range lengths {
		b = binary.BigEndian.AppendUint32(b, l)
		b = binary.BigEndian.AppendUint32(b, 0)
	}
	return b
}

// A server may not describe extents past the end of a block status
// request (only the last one may run over): chunk after chunk of them
// would grow the call's extent list without bound.
func TestBlockStatusExtentsBounded(t *testing.T) {
	const reqLen = 1 << 20 // handle 2 of fuzzClient asks for 1 MiB
	tests := []struct {
		name    string
		stream  []byte
		wantErr bool
		want    []Extent
	}{
		{
			name:   "extents covering the request, last one running over",
			stream: blockStatusChunk(chunkFlagDone, reqLen/2, reqLen),
			want:   []Extent{{Offset: 0, Length: reqLen / 2}, {Offset: reqLen / 2, Length: reqLen}},
		},
		{
			name:   "split over two chunks",
			stream: append(blockStatusChunk(0, reqLen/4), blockStatusChunk(chunkFlagDone, reqLen)...),
			want:   []Extent{{Offset: 0, Length: reqLen / 4}, {Offset: reqLen / 4, Length: reqLen}},
		},
		{
			name:    "extent after the request end in the same chunk",
			stream:  blockStatusChunk(chunkFlagDone, reqLen, 4096),
			wantErr: true,
		},
		{
			name:    "endless chunks past the request end",
			stream:  bytes.Repeat(blockStatusChunk(0, reqLen, reqLen, reqLen, reqLen), 64),
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, calls := fuzzClient(t)
			err := c.readReplies(bufio.NewReader(bytes.NewReader(tt.stream)))
			require.Error(t, err, "the stream always ends")
			c.fail(err)
			cl := calls[2]
			<-cl.done
			if tt.wantErr {
				require.ErrorIs(t, err, ErrProtocol)
				assert.LessOrEqual(t, len(cl.extents), 1, "nothing past the request end is kept")
				return
			}
			assert.NotErrorIs(t, err, ErrProtocol, "a well-formed reply is accepted")
			require.NoError(t, cl.result)
			assert.Equal(t, tt.want, cl.extents)
		})
	}
}

// listServer answers NBD_OPT_LIST with n NBD_REP_SERVER replies of the
// given description length, then NBD_REP_ACK.
func listServer(t *testing.T, n, descLen int) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		var b []byte
		b = binary.BigEndian.AppendUint64(b, nbdMagic)
		b = binary.BigEndian.AppendUint64(b, optMagic)
		b = binary.BigEndian.AppendUint16(b, flagFixedNewstyle|flagNoZeroes)
		if _, err := c.Write(b); err != nil {
			return
		}
		var in [4 + optHdrLen]byte // client flags, then NBD_OPT_LIST
		if _, err := io.ReadFull(c, in[:]); err != nil {
			return
		}
		w := bufio.NewWriter(c)
		reply := func(typ uint32, data []byte) error {
			var h []byte
			h = binary.BigEndian.AppendUint64(h, optReplyMagic)
			h = binary.BigEndian.AppendUint32(h, optList)
			h = binary.BigEndian.AppendUint32(h, typ)
			h = binary.BigEndian.AppendUint32(h, uint32(len(data)))
			if _, err := w.Write(h); err != nil {
				return err
			}
			_, err := w.Write(data)
			return err
		}
		desc := bytes.Repeat([]byte{'d'}, descLen)
		for i := range n {
			name := fmt.Sprintf("e%d", i)
			data := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
			data = append(append(data, name...), desc...)
			if reply(repServer, data) != nil {
				return
			}
		}
		if reply(repAck, nil) != nil || w.Flush() != nil {
			return
		}
		_, _ = io.Copy(io.Discard, c) // until the client goes
	}()
	t.Cleanup(func() { _ = ln.Close(); <-done })
	return ln.Addr().String()
}

// The export list is as long as the server likes: the client keeps a
// bounded number of entries and bytes.
func TestListExportsBounded(t *testing.T) {
	tests := []struct {
		name    string
		n, desc int
		wantErr bool
	}{
		{name: "a few exports", n: 3, desc: 10},
		{name: "as many exports as allowed", n: maxListExports, desc: 0},
		{name: "one export too many", n: maxListExports + 1, desc: 0, wantErr: true},
		{name: "too many bytes", n: maxListBytes/(60<<10) + 2, desc: 60 << 10, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkNoLeak(t)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			addr := listServer(t, tt.n, tt.desc)
			l, err := ListExports(ctx, "tcp", addr, DialOptions{})
			if tt.wantErr {
				require.ErrorIs(t, err, ErrProtocol)
				assert.Nil(t, l)
				return
			}
			require.NoError(t, err)
			require.Len(t, l, tt.n)
			assert.Equal(t, "e0", l[0].Name)
			assert.Len(t, l[0].Description, tt.desc)
		})
	}
}
