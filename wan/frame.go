package wan

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/vmihailenco/msgpack/v5"
)

// Wire format of one frame on a stream (after TLS):
//
//	uint32 big-endian   header length H (1..maxHeader)
//	H bytes             msgpack-encoded header
//	header.P bytes      payload (raw, zstd, or absent for zero/control frames)
const (
	protocolVersion = 1
	maxHeader       = 16 << 10
	maxPayload      = 4 << 20
)

type frameType uint8

const (
	ftHello    frameType = 1 // dialler → listener, first frame of a stream
	ftHelloAck frameType = 2 // listener → dialler
	ftData     frameType = 3 // reliable, sequenced channel frame
	ftAck      frameType = 4 // cumulative acknowledgement of a channel
	ftPing     frameType = 5
	ftPong     frameType = 6
	ftBye      frameType = 7 // session closed deliberately
)

// kinds of a ftData frame.
const (
	kindOpenConn  uint8 = 1 // Name = target address
	kindOpenBlock uint8 = 2 // Name = channel name
	kindData      uint8 = 3 // byte stream data
	kindBlock     uint8 = 4 // block data at Off
	kindFin       uint8 = 5 // end of this direction
	kindReset     uint8 = 6 // abort; Name = reason
)

// header flags.
const (
	flagZstd uint8 = 1 << 0 // payload is zstd-compressed; N is the raw length
	flagZero uint8 = 1 << 1 // payload elided: N zero bytes
)

type header struct {
	T    frameType `msgpack:"t"`
	Ch   uint32    `msgpack:"c,omitempty"`
	Seq  uint64    `msgpack:"s,omitempty"`
	K    uint8     `msgpack:"k,omitempty"`
	F    uint8     `msgpack:"f,omitempty"`
	N    uint32    `msgpack:"n,omitempty"` // raw (logical) payload length
	P    uint32    `msgpack:"p,omitempty"` // bytes of payload following on the wire
	Off  int64     `msgpack:"o,omitempty"`
	Name string    `msgpack:"a,omitempty"`
	TS   int64     `msgpack:"ts,omitempty"` // ping/pong timestamp (ns)
	// hello / hello-ack
	Ver  int    `msgpack:"v,omitempty"`
	Sess []byte `msgpack:"id,omitempty"`
	Idx  int    `msgpack:"i,omitempty"`
	Err  string `msgpack:"e,omitempty"`
}

// writeFrame writes one frame; it does not flush.
func writeFrame(w *bufio.Writer, h *header, payload []byte) (int, error) {
	h.P = uint32(len(payload))
	hb, err := msgpack.Marshal(h)
	if err != nil {
		return 0, fmt.Errorf("wan: encode header: %w", err)
	}
	var l [4]byte
	binary.BigEndian.PutUint32(l[:], uint32(len(hb)))
	if _, err := w.Write(l[:]); err != nil {
		return 0, err
	}
	if _, err := w.Write(hb); err != nil {
		return 0, err
	}
	if _, err := w.Write(payload); err != nil {
		return 0, err
	}
	return 4 + len(hb) + len(payload), nil
}

// readFrame reads one frame and checks its sizes. The payload is still in
// wire form (see decodePayload).
func readFrame(r *bufio.Reader) (*header, []byte, error) {
	var l [4]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, nil, err
	}
	n := binary.BigEndian.Uint32(l[:])
	if n == 0 || n > maxHeader {
		return nil, nil, fmt.Errorf("%w: header length %d", ErrProtocol, n)
	}
	hb := make([]byte, n)
	if _, err := io.ReadFull(r, hb); err != nil {
		return nil, nil, noEOF(err)
	}
	h := new(header)
	if err := msgpack.Unmarshal(hb, h); err != nil {
		return nil, nil, fmt.Errorf("%w: header: %w", ErrProtocol, err)
	}
	if h.P > maxPayload || (h.N > maxPayload && h.F&flagZero == 0) {
		return nil, nil, fmt.Errorf("%w: payload length %d/%d", ErrProtocol, h.P, h.N)
	}
	var p []byte
	if h.P > 0 {
		p = make([]byte, h.P)
		if _, err := io.ReadFull(r, p); err != nil {
			return nil, nil, noEOF(err)
		}
	}
	return h, p, nil
}

func noEOF(err error) error {
	if err == io.EOF {
		return io.ErrUnexpectedEOF
	}
	return err
}

// decodePayload returns the logical payload of a data frame. Zero frames
// return nil (the caller uses h.N).
func decodePayload(dec *zstd.Decoder, h *header, p []byte) ([]byte, error) {
	switch {
	case h.F&flagZero != 0:
		if len(p) != 0 {
			return nil, fmt.Errorf("%w: zero frame with payload", ErrProtocol)
		}
		return nil, nil
	case h.F&flagZstd != 0:
		out, err := dec.DecodeAll(p, make([]byte, 0, h.N))
		if err != nil {
			return nil, fmt.Errorf("%w: zstd: %w", ErrProtocol, err)
		}
		if len(out) != int(h.N) {
			return nil, fmt.Errorf("%w: zstd length %d, header says %d", ErrProtocol, len(out), h.N)
		}
		return out, nil
	default:
		if len(p) != int(h.N) {
			return nil, fmt.Errorf("%w: payload length %d, header says %d", ErrProtocol, len(p), h.N)
		}
		return p, nil
	}
}

func newDecoder() (*zstd.Decoder, error) {
	return zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderMaxMemory(maxPayload*2), zstd.WithDecoderMaxWindow(maxPayload*2))
}

func newEncoder() (*zstd.Encoder, error) {
	return zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1), zstd.WithLowerEncoderMem(true))
}

func isZero(b []byte) bool {
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}
