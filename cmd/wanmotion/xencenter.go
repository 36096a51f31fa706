package main

// `wanmotion xencenter <url> <session> VM <uuid>`: the XenCenter menu item
// (package xencenter; Windows builds use cmd/wanmotion-xencenter).

import (
	"context"
	"errors"
	"fmt"
	"io"

	"github.com/wanmotion/wanmotion/xencenter"
)

func runXencenter(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	err := xencenter.Command(ctx, args, stdout, stderr)
	if errors.Is(err, xencenter.ErrUsage) {
		return fmt.Errorf("%w: %w", errUsage, err)
	}
	return err
}
