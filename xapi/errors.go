package xapi

import (
	"errors"
	"fmt"
	"strings"
)

// Error codes from xapi's ocaml/xapi-consts/api_errors.ml that callers are
// expected to branch on. The list is not exhaustive: any code xapi sends is
// kept verbatim in APIError.Code.
const (
	CodeSessionInvalid                = "SESSION_INVALID"
	CodeSessionAuthenticationFailed   = "SESSION_AUTHENTICATION_FAILED"
	CodeHandleInvalid                 = "HANDLE_INVALID"
	CodeUUIDInvalid                   = "UUID_INVALID"
	CodeHostIsSlave                   = "HOST_IS_SLAVE"
	CodeVMBadPowerState               = "VM_BAD_POWER_STATE"
	CodeVMMigrateFailed               = "VM_MIGRATE_FAILED"
	CodeMessageMethodUnknown          = "MESSAGE_METHOD_UNKNOWN"
	CodeMessageParameterCountMismatch = "MESSAGE_PARAMETER_COUNT_MISMATCH"
	CodeOtherOperationInProgress      = "OTHER_OPERATION_IN_PROGRESS"
	CodeOperationNotAllowed           = "OPERATION_NOT_ALLOWED"
	CodeMapDuplicateKey               = "MAP_DUPLICATE_KEY"
	CodeInternalError                 = "INTERNAL_ERROR"
	CodeCannotContactHost             = "CANNOT_CONTACT_HOST"
	CodeVDICBTEnabled                 = "VDI_CBT_ENABLED"
	CodeVDINoCBTMetadata              = "VDI_NO_CBT_METADATA"
	CodeVDIInUse                      = "VDI_IN_USE"
	CodeVDIIncompatibleType           = "VDI_INCOMPATIBLE_TYPE"
	CodeSROperationNotSupported       = "SR_OPERATION_NOT_SUPPORTED"
	CodeTooManyStorageMigrates        = "TOO_MANY_STORAGE_MIGRATES"
	CodeTaskCancelled                 = "TASK_CANCELLED"
	CodeEventsLost                    = "EVENTS_LOST"
	CodeEventFromTokenParseFailure    = "EVENT_FROM_TOKEN_PARSE_FAILURE"
	CodeXenAPIPluginFailure           = "XENAPI_PLUGIN_FAILURE"
	CodeXenAPIMissingPlugin           = "XENAPI_MISSING_PLUGIN"
	CodeXAPIHookFailed                = "XAPI_HOOK_FAILED"
	CodeLicenseRestriction            = "LICENSE_RESTRICTION"
)

// APIError is a xapi Failure response: ErrorDescription = [Code, Params...].
type APIError struct {
	Method string   // the XML-RPC method that failed ("VM.migrate_send")
	Code   string   // ErrorDescription[0]
	Params []string // ErrorDescription[1:]
}

// Error renders "VM.migrate_send: VM_BAD_POWER_STATE [OpaqueRef:.. running halted]".
// SESSION_INVALID echoes the session ref, which is a secret, so its params are
// not printed.
func (e *APIError) Error() string {
	var b strings.Builder
	if e.Method != "" {
		b.WriteString(e.Method + ": ")
	}
	b.WriteString(e.Code)
	if len(e.Params) > 0 {
		if e.Code == CodeSessionInvalid {
			b.WriteString(" [redacted]")
		} else {
			b.WriteString(" [" + strings.Join(e.Params, " ") + "]")
		}
	}
	return b.String()
}

// Is makes errors.Is(err, xapi.ErrSessionInvalid) (or any &APIError{Code: c}
// without a Method) match every APIError with the same code.
func (e *APIError) Is(target error) bool {
	t, ok := target.(*APIError)
	return ok && t.Method == "" && t.Code == e.Code
}

// Param returns Params[i], or "" when xapi sent fewer params.
func (e *APIError) Param(i int) string {
	if i < 0 || i >= len(e.Params) {
		return ""
	}
	return e.Params[i]
}

// Sentinels for errors.Is.
var (
	ErrSessionInvalid              = &APIError{Code: CodeSessionInvalid}
	ErrSessionAuthenticationFailed = &APIError{Code: CodeSessionAuthenticationFailed}
	ErrHandleInvalid               = &APIError{Code: CodeHandleInvalid}
	ErrHostIsSlave                 = &APIError{Code: CodeHostIsSlave}
	ErrVMBadPowerState             = &APIError{Code: CodeVMBadPowerState}
	ErrVMMigrateFailed             = &APIError{Code: CodeVMMigrateFailed}
	ErrMessageMethodUnknown        = &APIError{Code: CodeMessageMethodUnknown}
	ErrOtherOperationInProgress    = &APIError{Code: CodeOtherOperationInProgress}
	ErrMapDuplicateKey             = &APIError{Code: CodeMapDuplicateKey}
	ErrVDICBTEnabled               = &APIError{Code: CodeVDICBTEnabled}
	ErrTooManyStorageMigrates      = &APIError{Code: CodeTooManyStorageMigrates}
	ErrTaskCancelled               = &APIError{Code: CodeTaskCancelled}
	ErrEventsLost                  = &APIError{Code: CodeEventsLost}
	ErrXenAPIPluginFailure         = &APIError{Code: CodeXenAPIPluginFailure}
	ErrXenAPIMissingPlugin         = &APIError{Code: CodeXenAPIMissingPlugin}
)

// IsCode reports whether err wraps an *APIError with the given code.
func IsCode(err error, code string) bool {
	var e *APIError
	return errors.As(err, &e) && e.Code == code
}

// AsAPIError returns the *APIError wrapped in err, if any.
func AsAPIError(err error) (*APIError, bool) {
	var e *APIError
	ok := errors.As(err, &e)
	return e, ok
}

// ErrProtocol is wrapped by errors about responses that are not well-formed
// xapi XML-RPC (bad XML, no Status, an HTTP status other than 200, ...).
var ErrProtocol = errors.New("xapi protocol error")

// ErrNotLoggedIn is returned by calls made before Login or after Logout.
var ErrNotLoggedIn = errors.New("xapi: not logged in")

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrProtocol}, args...)...)
}
