package testutil

import (
	"testing"

	"github.com/hashicorp/go-hclog"
)

// A goroutine that outlives its test and logs must not panic the test
// binary ("Log in goroutine after Test... has completed").
func TestLoggerAfterTestEnds(t *testing.T) {
	var late hclog.Logger
	t.Run("sub", func(t *testing.T) {
		late = Logger(t)
		late.Info("during the test")
	})
	late.Info("after the test") // would panic without the guard
}
