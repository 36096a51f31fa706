package main

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/wanmotion/wanmotion/agent"
)

// runAgent is `wanmotion agent`, the site agent (see agent.Command and docs/agent.md).
func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := agent.Command(ctx, args, stdout, stderr)
	if errors.Is(err, agent.ErrUsage) {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	return err
}
