package xapiadapt

import (
	"fmt"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/xapi"
)

// mapErr wraps xapi errors the engine recognises with its sentinels.
func mapErr(err error) error {
	switch {
	case err == nil:
		return nil
	case xapi.IsCode(err, xapi.CodeHandleInvalid), xapi.IsCode(err, xapi.CodeUUIDInvalid):
		return fmt.Errorf("%w: %w", engine.ErrNotFound, err)
	case xapi.IsCode(err, xapi.CodeVDICBTEnabled):
		return fmt.Errorf("%w: %w", engine.ErrCBTEnabled, err)
	}
	return err
}
