// Package nbd implements the Network Block Device protocol (fixed newstyle
// handshake, simple and structured replies, STARTTLS, base:allocation block
// status): a pipelining client and a server over a Backend such as a sparse
// file or a block device. The wire format follows NetworkBlockDevice/nbd
// doc/proto.md.
package nbd

import (
	"encoding/binary"
	"fmt"
)

// Handshake magics.
const (
	nbdMagic       uint64 = 0x4e42444d41474943 // "NBDMAGIC"
	optMagic       uint64 = 0x49484156454F5054 // "IHAVEOPT"
	optReplyMagic  uint64 = 0x0003e889045565a9
	oldstyleMagic  uint64 = 0x00420281861253
	requestMagic   uint32 = 0x25609513
	simpleMagic    uint32 = 0x67446698
	structMagic    uint32 = 0x668e33ef
	requestHdrLen         = 28
	simpleHdrLen          = 16
	structHdrLen          = 20
	optHdrLen             = 16 // magic + option + length
	optReplyHdrLen        = 20 // magic + option + type + length
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle uint16 = 1 << 0
	flagNoZeroes      uint16 = 1 << 1

	clientFlagFixedNewstyle uint32 = 1 << 0
	clientFlagNoZeroes      uint32 = 1 << 1
)

// Options.
const (
	optExportName      uint32 = 1
	optAbort           uint32 = 2
	optList            uint32 = 3
	optPeekExport      uint32 = 4
	optStartTLS        uint32 = 5
	optInfo            uint32 = 6
	optGo              uint32 = 7
	optStructuredReply uint32 = 8
	optListMetaContext uint32 = 9
	optSetMetaContext  uint32 = 10
)

// Option reply types.
const (
	repAck         uint32 = 1
	repServer      uint32 = 2
	repInfo        uint32 = 3
	repMetaContext uint32 = 4

	repFlagError        uint32 = 1 << 31
	repErrUnsup                = repFlagError | 1
	repErrPolicy               = repFlagError | 2
	repErrInvalid              = repFlagError | 3
	repErrPlatform             = repFlagError | 4
	repErrTLSReqd              = repFlagError | 5
	repErrUnknown              = repFlagError | 6
	repErrShutdown             = repFlagError | 7
	repErrBlockSizeReqd        = repFlagError | 8
	repErrTooBig               = repFlagError | 9
)

// NBD_INFO types.
const (
	infoExport      uint16 = 0
	infoName        uint16 = 1
	infoDescription uint16 = 2
	infoBlockSize   uint16 = 3
)

// Transmission flags, as advertised by the server for an export.
const (
	FlagHasFlags        uint16 = 1 << 0
	FlagReadOnly        uint16 = 1 << 1
	FlagSendFlush       uint16 = 1 << 2
	FlagSendFUA         uint16 = 1 << 3
	FlagRotational      uint16 = 1 << 4
	FlagSendTrim        uint16 = 1 << 5
	FlagSendWriteZeroes uint16 = 1 << 6
	FlagSendDF          uint16 = 1 << 7
	FlagCanMultiConn    uint16 = 1 << 8
	FlagSendResize      uint16 = 1 << 9
	FlagSendCache       uint16 = 1 << 10
	FlagSendFastZero    uint16 = 1 << 11
)

// Commands.
const (
	cmdRead        uint16 = 0
	cmdWrite       uint16 = 1
	cmdDisc        uint16 = 2
	cmdFlush       uint16 = 3
	cmdTrim        uint16 = 4
	cmdCache       uint16 = 5
	cmdWriteZeroes uint16 = 6
	cmdBlockStatus uint16 = 7
)

// Command flags.
const (
	cmdFlagFUA      uint16 = 1 << 0
	cmdFlagNoHole   uint16 = 1 << 1
	cmdFlagDF       uint16 = 1 << 2
	cmdFlagReqOne   uint16 = 1 << 3
	cmdFlagFastZero uint16 = 1 << 4
)

// ZeroFlags select the behaviour of Client.WriteZeroes.
type ZeroFlags uint16

const (
	// ZeroNoHole asks the server to keep the range allocated (NBD_CMD_FLAG_NO_HOLE).
	ZeroNoHole ZeroFlags = ZeroFlags(cmdFlagNoHole)
	// ZeroFast asks the server to fail with ENOTSUP rather than zero slowly
	// (NBD_CMD_FLAG_FAST_ZERO).
	ZeroFast ZeroFlags = ZeroFlags(cmdFlagFastZero)
	// ZeroFUA asks for the zeroes to be durable before the reply (NBD_CMD_FLAG_FUA).
	ZeroFUA ZeroFlags = ZeroFlags(cmdFlagFUA)
)

// Structured reply chunk types and flags.
const (
	chunkFlagDone uint16 = 1 << 0

	chunkNone        uint16 = 0
	chunkOffsetData  uint16 = 1
	chunkOffsetHole  uint16 = 2
	chunkBlockStatus uint16 = 5
	chunkError       uint16 = 1<<15 | 1
	chunkErrorOffset uint16 = 1<<15 | 2
)

// Extent flags of the base:allocation metadata context.
const (
	ExtentHole uint32 = 1 << 0 // the range is not allocated
	ExtentZero uint32 = 1 << 1 // the range reads as zeroes
)

// MetaContextBaseAllocation is the only metadata context this package speaks.
const MetaContextBaseAllocation = "base:allocation"

// Limits.
const (
	// MaxPayload is the largest READ/WRITE payload this package sends or
	// accepts by default (the protocol's customary 32 MiB maximum).
	MaxPayload = 32 << 20
	// maxOptionLen caps the option data a server reads into memory.
	maxOptionLen = 64 << 10
	// maxStringLen caps export names, descriptions and context names.
	maxStringLen = 4096
)

// Request is a decoded transmission-phase request header.
type Request struct {
	Flags  uint16
	Type   uint16
	Handle uint64
	Offset uint64
	Length uint32
}

// DecodeRequest decodes a 28-byte request header.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) < requestHdrLen {
		return Request{}, fmt.Errorf("%w: request header is %d bytes, want %d", ErrProtocol, len(b), requestHdrLen)
	}
	if m := binary.BigEndian.Uint32(b[0:]); m != requestMagic {
		return Request{}, fmt.Errorf("%w: bad request magic %#x", ErrProtocol, m)
	}
	return Request{
		Flags:  binary.BigEndian.Uint16(b[4:]),
		Type:   binary.BigEndian.Uint16(b[6:]),
		Handle: binary.BigEndian.Uint64(b[8:]),
		Offset: binary.BigEndian.Uint64(b[16:]),
		Length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// encode appends the wire form of r to dst.
func (r Request) encode(dst []byte) []byte {
	dst = binary.BigEndian.AppendUint32(dst, requestMagic)
	dst = binary.BigEndian.AppendUint16(dst, r.Flags)
	dst = binary.BigEndian.AppendUint16(dst, r.Type)
	dst = binary.BigEndian.AppendUint64(dst, r.Handle)
	dst = binary.BigEndian.AppendUint64(dst, r.Offset)
	dst = binary.BigEndian.AppendUint32(dst, r.Length)
	return dst
}

// Reply is a decoded transmission-phase reply header: either a simple reply
// (Structured false; Errno set) or a structured reply chunk header
// (Structured true; Flags, Type and Length set).
type Reply struct {
	Structured bool
	Handle     uint64
	Errno      uint32 // simple replies
	Flags      uint16 // structured chunks
	Type       uint16 // structured chunks
	Length     uint32 // structured chunks: payload length
}

// replyHeaderLen returns how many bytes the header starting with magic
// occupies, or an error for an unknown magic.
func replyHeaderLen(magic uint32) (int, error) {
	switch magic {
	case simpleMagic:
		return simpleHdrLen, nil
	case structMagic:
		return structHdrLen, nil
	}
	return 0, fmt.Errorf("%w: bad reply magic %#x", ErrProtocol, magic)
}

// DecodeReply decodes a simple (16-byte) or structured (20-byte) reply
// header, selected by its magic.
func DecodeReply(b []byte) (Reply, error) {
	if len(b) < 4 {
		return Reply{}, fmt.Errorf("%w: short reply header", ErrProtocol)
	}
	n, err := replyHeaderLen(binary.BigEndian.Uint32(b))
	if err != nil {
		return Reply{}, err
	}
	if len(b) < n {
		return Reply{}, fmt.Errorf("%w: reply header is %d bytes, want %d", ErrProtocol, len(b), n)
	}
	if n == simpleHdrLen {
		return Reply{
			Errno:  binary.BigEndian.Uint32(b[4:]),
			Handle: binary.BigEndian.Uint64(b[8:]),
		}, nil
	}
	return Reply{
		Structured: true,
		Flags:      binary.BigEndian.Uint16(b[4:]),
		Type:       binary.BigEndian.Uint16(b[6:]),
		Handle:     binary.BigEndian.Uint64(b[8:]),
		Length:     binary.BigEndian.Uint32(b[16:]),
	}, nil
}

func appendSimpleReply(dst []byte, handle uint64, errno uint32) []byte {
	dst = binary.BigEndian.AppendUint32(dst, simpleMagic)
	dst = binary.BigEndian.AppendUint32(dst, errno)
	return binary.BigEndian.AppendUint64(dst, handle)
}

func appendChunkHeader(dst []byte, flags, typ uint16, handle uint64, length uint32) []byte {
	dst = binary.BigEndian.AppendUint32(dst, structMagic)
	dst = binary.BigEndian.AppendUint16(dst, flags)
	dst = binary.BigEndian.AppendUint16(dst, typ)
	dst = binary.BigEndian.AppendUint64(dst, handle)
	return binary.BigEndian.AppendUint32(dst, length)
}

// Extent is one run of the base:allocation map.
type Extent struct {
	Offset int64
	Length int64
	Flags  uint32 // ExtentHole, ExtentZero
}

// decodeBlockStatus parses a NBD_REPLY_TYPE_BLOCK_STATUS payload.
func decodeBlockStatus(p []byte) (contextID uint32, descs [][2]uint32, err error) {
	if len(p) < 4 || (len(p)-4)%8 != 0 || len(p) == 4 {
		return 0, nil, fmt.Errorf("%w: block status payload of %d bytes", ErrProtocol, len(p))
	}
	contextID = binary.BigEndian.Uint32(p)
	p = p[4:]
	descs = make([][2]uint32, 0, len(p)/8)
	for len(p) >= 8 {
		descs = append(descs, [2]uint32{binary.BigEndian.Uint32(p), binary.BigEndian.Uint32(p[4:])})
		p = p[8:]
	}
	return contextID, descs, nil
}

// decodeErrorChunk parses a NBD_REPLY_TYPE_ERROR(_OFFSET) payload.
func decodeErrorChunk(typ uint16, p []byte) (errno uint32, msg string, err error) {
	if len(p) < 6 {
		return 0, "", fmt.Errorf("%w: error chunk of %d bytes", ErrProtocol, len(p))
	}
	errno = binary.BigEndian.Uint32(p)
	ml := int(binary.BigEndian.Uint16(p[4:]))
	want := 6 + ml
	if typ == chunkErrorOffset {
		want += 8
	}
	if len(p) != want {
		return 0, "", fmt.Errorf("%w: error chunk of %d bytes, message %d", ErrProtocol, len(p), ml)
	}
	return errno, string(p[6 : 6+ml]), nil
}
