package engine

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
)

// FileStore keeps one file per migration, <dir>/<id>.ckpt, replaced with
// write-temp, fsync, rename, fsync-dir.
type FileStore struct {
	dir string
}

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidMigrationID reports whether id is usable as a migration id (and file name).
func ValidMigrationID(id string) bool { return idRE.MatchString(id) && !strings.Contains(id, "..") }

// NewFileStore creates dir (0700) if needed.
func NewFileStore(dir string) (*FileStore, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	return &FileStore{dir: dir}, nil
}

// Dir returns the state directory.
func (s *FileStore) Dir() string { return s.dir }

func (s *FileStore) path(id string) (string, error) {
	if !ValidMigrationID(id) {
		return "", fmt.Errorf("invalid migration id %q", id)
	}
	return filepath.Join(s.dir, id+".ckpt"), nil
}

// Save implements Store.
func (s *FileStore) Save(ctx context.Context, c *Checkpoint) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	p, err := s.path(c.MigrationID)
	if err != nil {
		return err
	}
	b, err := EncodeCheckpoint(c)
	if err != nil {
		return err
	}
	f, err := os.CreateTemp(s.dir, "."+c.MigrationID+".*.tmp")
	if err != nil {
		return fmt.Errorf("save checkpoint: %w", err)
	}
	tmp := f.Name()
	_, werr := f.Write(b)
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr == nil {
		werr = os.Rename(tmp, p)
	}
	if werr != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("save checkpoint: %w", werr)
	}
	if d, err := os.Open(s.dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// Load implements Store.
func (s *FileStore) Load(ctx context.Context, id string) (*Checkpoint, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p, err := s.path(id)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("migration %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("load checkpoint: %w", err)
	}
	c, err := DecodeCheckpoint(b)
	if err != nil {
		return nil, fmt.Errorf("load checkpoint %s: %w", p, err)
	}
	return c, nil
}

// List implements Store.
func (s *FileStore) List(ctx context.Context) ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list checkpoints: %w", err)
	}
	var ids []string
	for _, e := range ents {
		n := e.Name()
		if e.Type().IsRegular() && strings.HasSuffix(n, ".ckpt") && !strings.HasPrefix(n, ".") {
			ids = append(ids, strings.TrimSuffix(n, ".ckpt"))
		}
	}
	sort.Strings(ids)
	return ids, nil
}
