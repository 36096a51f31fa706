package contract

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/rpc"
	"strings"
)

// Sentinel errors. Backends return (or wrap) them; the host matches them
// with errors.Is after they have crossed the RPC boundary.
var (
	// ErrNotFound: the handle, VDI, snapshot or other named object is unknown.
	ErrNotFound = errors.New("not found")
	// ErrInvalidArgument: the request is malformed or does not fit the
	// handle's role or state.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrAlreadyExists: a prepare for the same key exists with a different request.
	ErrAlreadyExists = errors.New("already exists")
	// ErrCancelled: the call's context was cancelled or its deadline passed.
	ErrCancelled = errors.New("cancelled")
	// ErrUnavailable: a resource the backend needs is unreachable now
	// (peer, WAN channel, xapi); retrying later may work.
	ErrUnavailable = errors.New("unavailable")
	// ErrUnsupported: the backend does not implement this method, role,
	// capability or API version.
	ErrUnsupported = errors.New("unsupported")
	// ErrFailedPrecondition: the system is not in the state the call needs
	// (e.g. SR full, snapshot deleted under us, VDI too large for the target).
	ErrFailedPrecondition = errors.New("failed precondition")
	// ErrPermissionDenied: credentials were refused.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrPluginExited: the backend process is gone (crashed, killed or
	// closed). Produced on the host side only.
	ErrPluginExited = errors.New("plugin exited")
	// ErrInternal: anything else; the message says what.
	ErrInternal = errors.New("internal error")
)

// Code is the stable, wire-level name of an error class.
type Code string

// Error codes. They are part of the protocol: never rename one.
const (
	CodeNotFound           Code = "not_found"
	CodeInvalidArgument    Code = "invalid_argument"
	CodeAlreadyExists      Code = "already_exists"
	CodeCancelled          Code = "cancelled"
	CodeDeadlineExceeded   Code = "deadline_exceeded"
	CodeUnavailable        Code = "unavailable"
	CodeUnsupported        Code = "unsupported"
	CodeFailedPrecondition Code = "failed_precondition"
	CodePermissionDenied   Code = "permission_denied"
	CodePluginExited       Code = "plugin_exited"
	CodeInternal           Code = "internal"
)

// codeTable maps codes to sentinels; the order is the classification order
// used by ToWire.
var codeTable = []struct {
	code Code
	err  error
}{
	{CodeNotFound, ErrNotFound},
	{CodeInvalidArgument, ErrInvalidArgument},
	{CodeAlreadyExists, ErrAlreadyExists},
	{CodeUnavailable, ErrUnavailable},
	{CodeUnsupported, ErrUnsupported},
	{CodeFailedPrecondition, ErrFailedPrecondition},
	{CodePermissionDenied, ErrPermissionDenied},
	{CodePluginExited, ErrPluginExited},
	{CodeInternal, ErrInternal},
}

// Codes lists every error code, for documentation and tests.
func Codes() []Code {
	out := []Code{CodeCancelled, CodeDeadlineExceeded}
	for _, e := range codeTable {
		out = append(out, e.code)
	}
	return out
}

// Sentinel returns the sentinel error of a code (ErrInternal for unknown codes).
func (c Code) Sentinel() error {
	switch c {
	case CodeCancelled, CodeDeadlineExceeded:
		return ErrCancelled
	}
	for _, e := range codeTable {
		if e.code == c {
			return e.err
		}
	}
	return ErrInternal
}

// WireError is the error envelope carried in every RPC response.
type WireError struct {
	Code    Code
	Message string
}

// Error implements error.
func (w *WireError) Error() string { return w.Message }

// ToWire classifies err for the wire. A nil error gives a nil envelope.
// Unclassified errors get CodeInternal; the message is err.Error().
func ToWire(err error) *WireError {
	if err == nil {
		return nil
	}
	w := &WireError{Code: CodeInternal, Message: err.Error()}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		w.Code = CodeDeadlineExceeded
		return w
	case errors.Is(err, ErrCancelled), errors.Is(err, context.Canceled):
		w.Code = CodeCancelled
		return w
	}
	for _, e := range codeTable {
		if errors.Is(err, e.err) {
			w.Code = e.code
			return w
		}
	}
	return w
}

// remoteError is what FromWire returns: it keeps the backend's message as
// its text and matches the code's sentinel (and, for cancellations, the
// matching context error) with errors.Is.
type remoteError struct {
	code Code
	msg  string
}

func (e *remoteError) Error() string { return e.msg }

// Code returns the wire code of the error.
func (e *remoteError) Code() Code { return e.code }

func (e *remoteError) Is(target error) bool {
	if target == e.code.Sentinel() {
		return true
	}
	switch e.code {
	case CodeCancelled:
		return target == context.Canceled
	case CodeDeadlineExceeded:
		return target == context.DeadlineExceeded
	}
	return false
}

// FromWire turns an envelope back into an error (nil for nil).
func FromWire(w *WireError) error {
	if w == nil {
		return nil
	}
	msg := w.Message
	if msg == "" {
		msg = string(w.Code)
	}
	return &remoteError{code: w.Code, msg: msg}
}

// CodeOf returns the code err would travel with.
func CodeOf(err error) Code {
	var re *remoteError
	if errors.As(err, &re) {
		return re.code
	}
	if w := ToWire(err); w != nil {
		return w.Code
	}
	return ""
}

// transportError classifies a net/rpc transport failure on the host side.
// A closed or broken connection means the plugin process is gone.
func transportError(method string, err error) error {
	var se rpc.ServerError
	if errors.As(err, &se) {
		if strings.Contains(string(se), "can't find") {
			return fmt.Errorf("%s: backend does not serve this method (%s): %w", method, string(se), ErrUnsupported)
		}
		return fmt.Errorf("%s: %s: %w", method, string(se), ErrInternal)
	}
	if errors.Is(err, rpc.ErrShutdown) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) ||
		strings.Contains(err.Error(), "session shutdown") || strings.Contains(err.Error(), "stream closed") ||
		strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe") {
		return fmt.Errorf("%s: %w: %v", method, ErrPluginExited, err)
	}
	return fmt.Errorf("%s: %w: %v", method, ErrUnavailable, err)
}
