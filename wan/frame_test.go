package wan

import (
	"bufio"
	"bytes"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func encodeFrame(t testing.TB, h *header, payload []byte) []byte {
	var buf bytes.Buffer
	w := bufio.NewWriter(&buf)
	_, err := writeFrame(w, h, payload)
	require.NoError(t, err)
	require.NoError(t, w.Flush())
	return buf.Bytes()
}

func TestFrameRoundTrip(t *testing.T) {
	enc, err := newEncoder()
	require.NoError(t, err)
	dec, err := newDecoder()
	require.NoError(t, err)
	text := bytes.Repeat([]byte("block data "), 1000)
	for _, tc := range []struct {
		name    string
		h       header
		payload []byte
		want    []byte
	}{
		{"raw", header{T: ftData, Ch: 3, Seq: 9, K: kindData, N: 5}, []byte("hello"), []byte("hello")},
		{"zstd", header{T: ftData, Ch: 4, Seq: 1, K: kindBlock, Off: 1 << 40, F: flagZstd, N: uint32(len(text))}, enc.EncodeAll(text, nil), text},
		{"zero", header{T: ftData, Ch: 5, Seq: 2, K: kindBlock, F: flagZero, N: 1 << 30}, nil, nil},
		{"ack", header{T: ftAck, Ch: 7, Seq: 1 << 50}, nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := tc.h
			b := encodeFrame(t, &h, tc.payload)
			got, p, err := readFrame(bufio.NewReader(bytes.NewReader(b)))
			require.NoError(t, err)
			assert.Equal(t, tc.h.Ch, got.Ch)
			assert.Equal(t, tc.h.Seq, got.Seq)
			assert.Equal(t, tc.h.Off, got.Off)
			assert.Equal(t, tc.h.N, got.N)
			if got.T == ftData {
				data, err := decodePayload(dec, got, p)
				require.NoError(t, err)
				assert.Equal(t, tc.want, data)
			}
		})
	}
}

func TestFrameRejectsBadInput(t *testing.T) {
	dec, err := newDecoder()
	require.NoError(t, err)
	for _, tc := range []struct {
		name string
		b    []byte
	}{
		{"zero header length", []byte{0, 0, 0, 0}},
		{"huge header length", []byte{0xff, 0, 0, 0}},
		{"truncated header", []byte{0, 0, 0, 9, 0x81}},
		{"not msgpack", []byte{0, 0, 0, 1, 0xc1}},
		{"payload too large", encodeFrame(t, &header{T: ftData, N: maxPayload + 1}, nil)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := readFrame(bufio.NewReader(bytes.NewReader(tc.b)))
			require.Error(t, err)
		})
	}
	// Length mismatches are caught when decoding.
	h := &header{T: ftData, N: 10}
	_, err = decodePayload(dec, h, []byte("short"))
	assert.ErrorIs(t, err, ErrProtocol)
	h = &header{T: ftData, N: 10, F: flagZstd}
	_, err = decodePayload(dec, h, []byte("not zstd at all"))
	assert.ErrorIs(t, err, ErrProtocol)
	h = &header{T: ftData, N: 10, F: flagZero}
	_, err = decodePayload(dec, h, []byte("x"))
	assert.ErrorIs(t, err, ErrProtocol)
}

func FuzzReadFrame(f *testing.F) {
	enc, err := newEncoder()
	require.NoError(f, err)
	text := bytes.Repeat([]byte("abc"), 300)
	f.Add(encodeFrame(f, &header{T: ftData, Ch: 1, Seq: 1, K: kindOpenConn, Name: "10.0.0.1:80"}, nil))
	f.Add(encodeFrame(f, &header{T: ftData, Ch: 1, Seq: 2, K: kindData, N: 3}, []byte("abc")))
	f.Add(encodeFrame(f, &header{T: ftData, Ch: 2, Seq: 2, K: kindBlock, F: flagZstd, N: uint32(len(text))}, enc.EncodeAll(text, nil)))
	f.Add(encodeFrame(f, &header{T: ftData, Ch: 2, Seq: 3, K: kindBlock, F: flagZero, N: 65536}, nil))
	f.Add(encodeFrame(f, &header{T: ftHello, Ver: 1, Sess: make([]byte, 16), Idx: 3, K: 1}, nil))
	f.Add(encodeFrame(f, &header{T: ftAck, Ch: 9, Seq: 77}, nil))
	dec, err := newDecoder()
	require.NoError(f, err)
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bufio.NewReader(bytes.NewReader(b))
		for i := 0; i < 4; i++ {
			h, p, err := readFrame(r)
			if err != nil {
				return
			}
			if h.P != uint32(len(p)) {
				t.Fatalf("payload length %d, header says %d", len(p), h.P)
			}
			data, err := decodePayload(dec, h, p)
			if err == nil && h.F&flagZero == 0 && len(data) != int(h.N) {
				t.Fatalf("decoded %d bytes, header says %d", len(data), h.N)
			}
		}
	})
}
