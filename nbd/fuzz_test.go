package nbd

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/require"
)

// Seeds live in testdata/fuzz/<FuzzName>/ (regenerate with
// NBD_WRITE_FUZZ_SEEDS=1 go test -run TestWriteFuzzSeeds ./nbd/).

func seedRequests() [][]byte {
	return [][]byte{
		Request{Type: cmdRead, Handle: 1, Offset: 4096, Length: 512}.encode(nil),
		Request{Type: cmdWrite, Flags: cmdFlagFUA, Handle: 2, Length: 1 << 20}.encode(nil),
		Request{Type: cmdBlockStatus, Flags: cmdFlagReqOne, Handle: 3, Length: 1 << 30}.encode(nil),
		Request{Type: cmdDisc}.encode(nil),
		[]byte("garbage that is not a request"),
	}
}

func FuzzDecodeRequest(f *testing.F) {
	for _, s := range seedRequests() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeRequest(b)
		if err != nil {
			return
		}
		// Decoding is the inverse of encoding.
		require.Equal(t, b[:requestHdrLen], r.encode(nil))
	})
}

func seedReplies() [][]byte {
	data := func(handle uint64, off uint64, payload []byte, flags uint16) []byte {
		b := appendChunkHeader(nil, flags, chunkOffsetData, handle, uint32(8+len(payload)))
		b = binary.BigEndian.AppendUint64(b, off)
		return append(b, payload...)
	}
	hole := appendChunkHeader(nil, chunkFlagDone, chunkOffsetHole, 1, 12)
	hole = binary.BigEndian.AppendUint64(hole, 2048)
	hole = binary.BigEndian.AppendUint32(hole, 2048)
	bs := appendChunkHeader(nil, chunkFlagDone, chunkBlockStatus, 2, 4+16)
	bs = binary.BigEndian.AppendUint32(bs, 1)
	bs = binary.BigEndian.AppendUint32(bs, 4096)
	bs = binary.BigEndian.AppendUint32(bs, 0)
	bs = binary.BigEndian.AppendUint32(bs, 8192)
	bs = binary.BigEndian.AppendUint32(bs, ExtentHole|ExtentZero)
	errc := appendChunkHeader(nil, chunkFlagDone, chunkError, 3, 6+4)
	errc = binary.BigEndian.AppendUint32(errc, ENOSPC)
	errc = binary.BigEndian.AppendUint16(errc, 4)
	errc = append(errc, "full"...)
	return [][]byte{
		append(appendSimpleReply(nil, 1, 0), make([]byte, 4096)...),
		appendSimpleReply(nil, 3, EIO),
		append(data(1, 0, bytes.Repeat([]byte{7}, 2048), 0), hole...),
		bs,
		errc,
		appendChunkHeader(nil, chunkFlagDone, chunkNone, 3, 0),
		[]byte{0x67, 0x44, 0x66, 0x98, 0, 0},
	}
}

// fuzzClient is a Client in transmission state with three requests in
// flight: a 4 KiB read (handle 1), a block status (2) and a write (3).
func fuzzClient(t *testing.T) (*Client, map[uint64]*call) {
	a, b := net.Pipe()
	t.Cleanup(func() { _ = a.Close(); _ = b.Close() })
	c := &Client{
		conn: a, log: hclog.NewNullLogger(), structured: true, hasMeta: true, metaID: 1,
		info: ExportInfo{Size: 1 << 20}, sem: make(chan struct{}, 3),
		pending: map[uint64]*call{}, done: make(chan struct{}),
	}
	calls := map[uint64]*call{
		1: {cmd: cmdRead, off: 0, length: 4096, buf: make([]byte, 4096)},
		2: {cmd: cmdBlockStatus, off: 0, length: 1 << 20},
		3: {cmd: cmdWrite, off: 0, length: 10},
	}
	for h, cl := range calls {
		cl.done = make(chan struct{})
		c.pending[h] = cl
		c.sem <- struct{}{}
	}
	return c, calls
}

func FuzzDecodeReply(f *testing.F) {
	for _, s := range seedReplies() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		if r, err := DecodeReply(b); err == nil && !r.Structured {
			require.Equal(t, b[:simpleHdrLen], appendSimpleReply(nil, r.Handle, r.Errno))
		}
		c, calls := fuzzClient(t)
		err := c.readReplies(bufio.NewReader(bytes.NewReader(b)))
		require.Error(t, err, "the stream always ends")
		c.fail(err)
		for h, cl := range calls {
			<-cl.done // every call completes, by reply or by failure
			if cl.result != nil {
				continue
			}
			switch h {
			case 1:
				require.Equal(t, int64(4096), cl.covered, "a successful read is fully covered")
			case 2:
				require.NotEmpty(t, cl.extents)
			}
		}
	})
}

func seedHandshakes() [][]byte {
	var b []byte
	b = binary.BigEndian.AppendUint32(b, clientFlagFixedNewstyle|clientFlagNoZeroes)
	opt := func(b []byte, o uint32, data []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, optMagic)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	full := opt(bytes.Clone(b), optStructuredReply, nil)
	full = opt(full, optSetMetaContext, metaData("a", MetaContextBaseAllocation))
	full = opt(full, optGo, nameData("a", infoBlockSize))
	full = append(full, Request{Type: cmdWrite, Handle: 1, Offset: 0, Length: 4}.encode(nil)...)
	full = append(full, "abcd"...)
	full = append(full, Request{Type: cmdRead, Handle: 2, Offset: 0, Length: 4}.encode(nil)...)
	full = append(full, Request{Type: cmdBlockStatus, Handle: 3, Offset: 0, Length: 4096}.encode(nil)...)
	full = append(full, Request{Type: cmdRead, Handle: 4, Offset: 1 << 40, Length: 4}.encode(nil)...)
	full = append(full, Request{Type: cmdDisc}.encode(nil)...)
	return [][]byte{
		full,
		opt(bytes.Clone(b), optList, nil),
		opt(opt(bytes.Clone(b), optInfo, nameData("zz")), optAbort, nil),
		opt(bytes.Clone(b), optExportName, []byte("a")),
		opt(bytes.Clone(b), optStartTLS, nil),
		{0, 0, 0, 1, 0x49, 0x48},
	}
}

func FuzzServerHandshake(f *testing.F) {
	for _, s := range seedHandshakes() {
		f.Add(s)
	}
	look, list := StaticExports(&Export{Name: "a", Backend: NewMemBackend(64 << 10)})
	p := newPKI(f)
	srv, err := NewServer(ServerOptions{Exports: look, List: list, TLS: p.serverTLS()})
	require.NoError(f, err)
	f.Fuzz(func(t *testing.T, b []byte) {
		_ = serveBytes(t, srv, b) // must return, never panic or hang
	})
}

func TestWriteFuzzSeeds(t *testing.T) {
	if os.Getenv("NBD_WRITE_FUZZ_SEEDS") == "" {
		t.Skip("set NBD_WRITE_FUZZ_SEEDS=1 to regenerate testdata/fuzz")
	}
	for name, seeds := range map[string][][]byte{
		"FuzzDecodeRequest":   seedRequests(),
		"FuzzDecodeReply":     seedReplies(),
		"FuzzServerHandshake": seedHandshakes(),
	} {
		dir := filepath.Join("testdata", "fuzz", name)
		require.NoError(t, os.MkdirAll(dir, 0o755))
		for i, s := range seeds {
			body := fmt.Sprintf("go test fuzz v1\n[]byte(%q)\n", s)
			require.NoError(t, os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed-%02d", i)), []byte(body), 0o644))
		}
	}
}
