package hostplugin

import (
	"errors"
	"time"
)

// Error codes the plugin returns (ErrorDescription[0]); the XenAPI caller
// sees them as the API error code.
const (
	CodeInvalidArgument = "WANMOTION_INVALID_ARGUMENT"
	CodeBackendNotFound = "WANMOTION_BACKEND_NOT_FOUND"
	CodeNotFound        = "WANMOTION_NOT_FOUND"
	CodeUnknownFunction = "WANMOTION_UNKNOWN_FUNCTION"
	CodeUnavailable     = "WANMOTION_UNAVAILABLE"
	CodeInternal        = "WANMOTION_INTERNAL"
)

// ErrInvalidArgument marks bad plugin arguments (CodeInvalidArgument).
var ErrInvalidArgument = errors.New("invalid argument")

func parseDuration(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err == nil && d < 0 {
		return 0, errors.New("negative")
	}
	return d, err
}
