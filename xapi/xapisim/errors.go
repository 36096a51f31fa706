package xapisim

import (
	"errors"
	"fmt"
	"strings"
)

// Error codes the simulator raises (names and params as xapi's
// api_errors.ml / datamodel_errors.ml; see xenapi-facts §1).
const (
	ErrSessionInvalid         = "SESSION_INVALID"                  // [handle]
	ErrHandleInvalid          = "HANDLE_INVALID"                   // [class, ref]
	ErrMethodUnknown          = "MESSAGE_METHOD_UNKNOWN"           // [method]
	ErrParamCountMismatch     = "MESSAGE_PARAMETER_COUNT_MISMATCH" // [method, expected, received]
	ErrHostIsSlave            = "HOST_IS_SLAVE"                    // [master address]
	ErrAuthFailed             = "SESSION_AUTHENTICATION_FAILED"    // [uname, msg]
	ErrVMBadPowerState        = "VM_BAD_POWER_STATE"               // [vm, expected, actual]
	ErrOperationNotAllowed    = "OPERATION_NOT_ALLOWED"            // [reason]
	ErrMapDuplicateKey        = "MAP_DUPLICATE_KEY"                // [tbl, fld, uuid, key]
	ErrUUIDInvalid            = "UUID_INVALID"                     // [type, uuid]
	ErrInternal               = "INTERNAL_ERROR"                   // [message]
	ErrFieldTypeError         = "FIELD_TYPE_ERROR"                 // [field]
	ErrEventTokenParse        = "EVENT_FROM_TOKEN_PARSE_FAILURE"   // [token]
	ErrEventSubscriptionParse = "EVENT_SUBSCRIPTION_PARSE_FAILURE" // [sub]; xapi never raises it in practice
	ErrTaskCancelled          = "TASK_CANCELLED"                   // [task]
	ErrVDICBTEnabled          = "VDI_CBT_ENABLED"                  // [vdi]
	ErrVDINoCBTMetadata       = "VDI_NO_CBT_METADATA"              // [vdi]
	ErrVDIInUse               = "VDI_IN_USE"                       // [vdi, operation]
	ErrVDIIncompatibleType    = "VDI_INCOMPATIBLE_TYPE"            // [vdi, type]
	ErrVMIsControlDomain      = "VM_IS_CONTROL_DOMAIN"             // [vm] (not in facts; xapi name)
	ErrSRBackendFailure       = "SR_BACKEND_FAILURE"               // ["", msg, ""] simulator approximation
	ErrValueNotSupported      = "VALUE_NOT_SUPPORTED"              // [field, value, reason]
	ErrInvalidValue           = "INVALID_VALUE"                    // [field, value]
	ErrDeviceAlreadyAttached  = "DEVICE_ALREADY_ATTACHED"          // [device]
	ErrDeviceAlreadyDetached  = "DEVICE_ALREADY_DETACHED"          // [device]
	ErrSRHasNoPBDs            = "SR_HAS_NO_PBDS"                   // [sr]
	ErrEventsLost             = "EVENTS_LOST"                      // []
)

// Fault is an API error: the ErrorDescription [Code, Params...] of a
// Failure response. Go code can match it with errors.As, or with errors.Is
// against another *Fault carrying the same Code.
type Fault struct {
	Code   string
	Params []string
}

// Errorf builds a Fault.
func Errorf(code string, params ...string) *Fault {
	return &Fault{Code: code, Params: params}
}

func (f *Fault) Error() string {
	if len(f.Params) == 0 {
		return f.Code
	}
	return f.Code + " [" + strings.Join(f.Params, ", ") + "]"
}

// Is matches another *Fault with the same code.
func (f *Fault) Is(target error) bool {
	var t *Fault
	return errors.As(target, &t) && t.Code == f.Code
}

// asFault converts any handler error into a Fault (INTERNAL_ERROR for
// unexpected ones).
func asFault(err error) *Fault {
	var f *Fault
	if errors.As(err, &f) {
		return f
	}
	return Errorf(ErrInternal, fmt.Sprint(err))
}

// badPowerState is VM_BAD_POWER_STATE [vm, expected, actual] as xapi's
// report_power_state_error writes it: the power states in lower case
// (Record_util.vm_power_state_to_lowercase_string), the expected ones
// joined by ", " ("halted, suspended").
func badPowerState(vm, actual string, expected ...string) *Fault {
	low := make([]string, len(expected))
	for i, s := range expected {
		low[i] = strings.ToLower(s)
	}
	return Errorf(ErrVMBadPowerState, vm, strings.Join(low, ", "), strings.ToLower(actual))
}
