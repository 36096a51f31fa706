package main

import (
	"context"
	"errors"
	"io"
)

func runDemo(_ context.Context, _ []string, _, _ io.Writer) error {
	return errors.New("the demo is not built yet")
}
