package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
)

// ErrLocked: another process is driving this migration.
var ErrLocked = errors.New("migration is being driven by another process")

// Locker is optionally implemented by a Store: the engine holds the lock of
// a migration while it drives it, so two controllers never drive the same
// migration at once.
type Locker interface {
	// Lock takes the migration's lock without waiting; it fails with an
	// error wrapping ErrLocked if another process holds it.
	Lock(ctx context.Context, migrationID string) (unlock func(), err error)
}

// Lock implements Locker with flock(2) on <dir>/<id>.lock. The lock is
// released by unlock or when the process dies.
func (s *FileStore) Lock(ctx context.Context, id string) (func(), error) {
	if !ValidMigrationID(id) {
		return nil, fmt.Errorf("invalid migration id %q", id)
	}
	p := filepath.Join(s.dir, id+".lock")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock migration: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		_ = f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("%w: %s", ErrLocked, id)
		}
		return nil, fmt.Errorf("lock migration: %w", err)
	}
	return func() {
		_ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
		_ = f.Close()
	}, nil
}
