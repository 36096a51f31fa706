package main

import (
	"context"
	"errors"
	"io"
)

func runPool(_ context.Context, _ []string, _, _ io.Writer) error {
	return errors.New("pool configuration is not built yet")
}
