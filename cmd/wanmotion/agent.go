package main

import (
	"context"
	"errors"
	"io"
)

func runAgent(_ context.Context, _ []string, _, _ io.Writer) error {
	return errors.New("the site agent is not built yet")
}
