package main

import (
	"context"
	"errors"
	"io"
)

func runMigrate(_ context.Context, _ []string, _, _ io.Writer) error {
	return errors.New("the migration path is not built yet")
}
