package nbd

import (
	"fmt"
	"sync"
)

// Backend is the storage behind an export. The server calls it from several
// goroutines at once; implementations must be safe for concurrent use.
// Offsets and lengths are always inside [0, Size()).
type Backend interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the export size in bytes, read once per connection.
	Size() (int64, error)
	// Sync makes completed writes durable (NBD_CMD_FLUSH, FUA).
	Sync() error
}

// Trimmer is an optional Backend capability: discard a range (NBD_CMD_TRIM).
// After a trim the range's contents are unspecified.
type Trimmer interface {
	Trim(off, length int64) error
}

// Zeroer is an optional Backend capability: make a range read as zeroes
// without writing zero buffers. With noHole the range must stay allocated.
// It returns ErrNotFast (or an error wrapping it) when it cannot do so
// cheaply; the server then writes zeroes itself unless the client asked for
// NBD_CMD_FLAG_FAST_ZERO.
type Zeroer interface {
	ZeroAt(off, length int64, noHole bool) error
}

// ExtentLister is an optional Backend capability: describe allocation of
// [off, off+length) as consecutive extents starting at off. The list may end
// before off+length (the client asks again) but must not be empty.
type ExtentLister interface {
	Extents(off, length int64) ([]Extent, error)
}

// MemBackend is an in-memory Backend, for tests and small exports. Ranges
// never written (or trimmed/zeroed in whole blocks) are reported as holes.
type MemBackend struct {
	mu   sync.RWMutex
	data []byte
	used []bool // per memBlock: allocated
}

const memBlock = 64 << 10

// NewMemBackend returns a zero-filled, fully sparse in-memory backend.
func NewMemBackend(size int64) *MemBackend {
	return &MemBackend{data: make([]byte, size), used: make([]bool, (size+memBlock-1)/memBlock)}
}

// Bytes returns a copy of the contents.
func (m *MemBackend) Bytes() []byte {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return append([]byte(nil), m.data...)
}

func (m *MemBackend) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > int64(len(m.data)) || off+n < off {
		return fmt.Errorf("mem backend: range %d+%d outside %d: %w", off, n, len(m.data), ErrInvalid)
	}
	return nil
}

// ReadAt implements Backend.
func (m *MemBackend) ReadAt(p []byte, off int64) (int, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	return copy(p, m.data[off:]), nil
}

// WriteAt implements Backend.
func (m *MemBackend) WriteAt(p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if len(p) > 0 {
		for b := off / memBlock; b <= (off+int64(len(p))-1)/memBlock; b++ {
			m.used[b] = true
		}
	}
	return copy(m.data[off:], p), nil
}

// Size implements Backend.
func (m *MemBackend) Size() (int64, error) { return int64(len(m.data)), nil }

// Sync implements Backend.
func (m *MemBackend) Sync() error { return nil }

// Trim implements Trimmer: it zeroes the range and frees whole blocks.
func (m *MemBackend) Trim(off, length int64) error { return m.ZeroAt(off, length, false) }

// ZeroAt implements Zeroer.
func (m *MemBackend) ZeroAt(off, length int64, noHole bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, length); err != nil {
		return err
	}
	clear(m.data[off : off+length])
	if noHole {
		for b := off / memBlock; length > 0 && b <= (off+length-1)/memBlock; b++ {
			m.used[b] = true
		}
		return nil
	}
	for b := (off + memBlock - 1) / memBlock; (b+1)*memBlock <= off+length; b++ {
		m.used[b] = false
	}
	return nil
}

// Extents implements ExtentLister.
func (m *MemBackend) Extents(off, length int64) ([]Extent, error) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if err := m.check(off, length); err != nil {
		return nil, err
	}
	var out []Extent
	end := off + length
	for pos := off; pos < end; {
		b := pos / memBlock
		used := m.used[b]
		next := min((b+1)*memBlock, end)
		for next < end && m.used[next/memBlock] == used {
			next = min((next/memBlock+1)*memBlock, end)
		}
		var fl uint32
		if !used {
			fl = ExtentHole | ExtentZero
		}
		out = append(out, Extent{Offset: pos, Length: next - pos, Flags: fl})
		pos = next
	}
	return out, nil
}
