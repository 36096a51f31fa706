package nbd

import (
	"errors"
	"fmt"
	"syscall"
)

// NBD error numbers (doc/proto.md "Error values"; the same numbers as Linux).
const (
	EPERM     uint32 = 1
	EIO       uint32 = 5
	ENOMEM    uint32 = 12
	EINVAL    uint32 = 22
	ENOSPC    uint32 = 28
	EOVERFLOW uint32 = 75
	ENOTSUP   uint32 = 95
	ESHUTDOWN uint32 = 108
)

// Error is a per-request error returned by the server, carrying its NBD
// errno. It matches the sentinels below with errors.Is.
type Error struct {
	Errno   uint32
	Message string // optional text from a structured error chunk
}

func (e *Error) Error() string {
	name := errnoName(e.Errno)
	if e.Message != "" {
		return fmt.Sprintf("nbd: server error %s: %s", name, e.Message)
	}
	return "nbd: server error " + name
}

// Is makes errors.Is(err, ErrNoSpace) and friends work, comparing errnos.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Errno == e.Errno && t.Message == ""
}

// Sentinels for errors.Is on per-request errors.
var (
	ErrPerm      = &Error{Errno: EPERM}
	ErrIO        = &Error{Errno: EIO}
	ErrNoMem     = &Error{Errno: ENOMEM}
	ErrInvalid   = &Error{Errno: EINVAL}
	ErrNoSpace   = &Error{Errno: ENOSPC}
	ErrOverflow  = &Error{Errno: EOVERFLOW}
	ErrNotSup    = &Error{Errno: ENOTSUP}
	ErrShutdown  = &Error{Errno: ESHUTDOWN}
	errnoStrings = map[uint32]string{
		EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL",
		ENOSPC: "ENOSPC", EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN",
	}
)

func errnoName(n uint32) string {
	if s, ok := errnoStrings[n]; ok {
		return s
	}
	return fmt.Sprintf("errno %d", n)
}

// Connection- and handshake-level errors.
var (
	// ErrProtocol marks a peer that violated the protocol.
	ErrProtocol = errors.New("nbd: protocol error")
	// ErrClosed is returned for requests on a closed or broken client.
	ErrClosed = errors.New("nbd: connection closed")
	// ErrUnknownExport is returned by an ExportFunc for a name it does not
	// serve (the client sees NBD_REP_ERR_UNKNOWN), and by Dial when the
	// server replies so.
	ErrUnknownExport = errors.New("nbd: unknown export")
	// ErrPolicy is returned by an ExportFunc to refuse a client (the client
	// sees NBD_REP_ERR_POLICY), and by Dial when the server refuses so.
	ErrPolicy = errors.New("nbd: refused by server policy")
	// ErrTLSRequired is returned by Dial when the server requires TLS and
	// no TLS configuration was given.
	ErrTLSRequired = errors.New("nbd: server requires TLS")
	// ErrUnsupported is returned by Dial when the server lacks a needed
	// option, and by client methods when the export does not advertise the
	// command.
	ErrUnsupported = errors.New("nbd: not supported by server")
	// ErrNotFast is returned by a Zeroer that cannot zero a range cheaply.
	ErrNotFast = errors.New("nbd: no fast zeroing for this range")
)

// OptionError is a handshake error reply (NBD_REP_ERR_*) from the server.
type OptionError struct {
	Option  uint32
	Reply   uint32
	Message string
}

func (e *OptionError) Error() string {
	return fmt.Sprintf("nbd: option %d refused with reply %#x: %q", e.Option, e.Reply, e.Message)
}

// Unwrap maps well-known replies to the sentinels above.
func (e *OptionError) Unwrap() error {
	switch e.Reply {
	case repErrUnknown:
		return ErrUnknownExport
	case repErrPolicy:
		return ErrPolicy
	case repErrTLSReqd:
		return ErrTLSRequired
	case repErrUnsup:
		return ErrUnsupported
	}
	return nil
}

// errnoOf maps a backend error to the NBD errno the server replies with.
func errnoOf(err error) uint32 {
	var ne *Error
	if errors.As(err, &ne) {
		return ne.Errno
	}
	var en syscall.Errno
	if errors.As(err, &en) {
		switch en {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.EOPNOTSUPP:
			return ENOTSUP
		}
	}
	if errors.Is(err, ErrNotFast) {
		return ENOTSUP
	}
	return EIO
}
