package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"testing"

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
