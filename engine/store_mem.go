package engine

import (
	"context"
	"fmt"
	"sort"
	"sync"
)

// MemStore is an in-memory Store (tests, simulations). It stores encoded
// checkpoints, so what is loaded is what a FileStore would give back.
type MemStore struct {
	mu sync.Mutex
	m  map[string][]byte
}

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore { return &MemStore{m: map[string][]byte{}} }

// Save implements Store.
func (s *MemStore) Save(ctx context.Context, c *Checkpoint) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if !ValidMigrationID(c.MigrationID) {
		return fmt.Errorf("invalid migration id %q", c.MigrationID)
	}
	b, err := EncodeCheckpoint(c)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[c.MigrationID] = b
	return nil
}

// Load implements Store.
func (s *MemStore) Load(ctx context.Context, id string) (*Checkpoint, error) {
	s.mu.Lock()
	b, ok := s.m[id]
	s.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("migration %s: %w", id, ErrNotFound)
	}
	return DecodeCheckpoint(b)
}

// List implements Store.
func (s *MemStore) List(ctx context.Context) ([]string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ids := make([]string, 0, len(s.m))
	for id := range s.m {
		ids = append(ids, id)
	}
	sort.Strings(ids)
	return ids, nil
}
