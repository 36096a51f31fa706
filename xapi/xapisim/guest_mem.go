package xapisim

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"math/bits"
	"sync"
	"sync/atomic"
)

// PageSize is the guest memory page size the simulator streams (4 KiB, as
// Xen's migration stream).
const PageSize = 4096

// simExt holds the per-simulator state of the guest and migration code.
// It lives outside Sim (in a package-level registry) so this code needs no
// fields in sim.go.
type simExt struct {
	s *Sim

	// lifecycle serialises guest starts and stops (taken before mu).
	lifecycle sync.Mutex

	mu      sync.Mutex           // guards the maps below; never held while taking a pool lock
	guests  map[string]*guest    // by VM uuid
	mems    map[string]*memImage // by VM uuid
	mirrors map[string]*mirror   // by source VDI uuid
	tracks  map[string]map[string][]byte
	records map[string]MigrationRecord // by VM uuid
	faults  map[string]int             // armed fault points
	active  map[*Pool]int              // storage migrations in flight per source pool

	smBytes, xenopsBytes atomic.Int64
}

var exts sync.Map // *Sim -> *simExt

func (s *Sim) ext() *simExt {
	if e, ok := exts.Load(s); ok {
		return e.(*simExt)
	}
	e, _ := exts.LoadOrStore(s, &simExt{s: s, guests: map[string]*guest{}, mems: map[string]*memImage{},
		mirrors: map[string]*mirror{}, tracks: map[string]map[string][]byte{},
		records: map[string]MigrationRecord{}, faults: map[string]int{}, active: map[*Pool]int{}})
	return e.(*simExt)
}

func init() {
	RegisterStartHook(func(_ context.Context, s *Sim) (func(), error) {
		return func() {
			e := s.ext()
			e.lifecycle.Lock()
			defer e.lifecycle.Unlock()
			e.mu.Lock()
			gs := make([]*guest, 0, len(e.guests))
			for _, g := range e.guests {
				gs = append(gs, g)
			}
			e.mu.Unlock()
			for _, g := range gs {
				g.stopWriter()
			}
			exts.Delete(s)
		}, nil
	})
}

// memImage is a VM's synthetic memory: memory_static_max bytes in 4 KiB
// pages. A page's content is a function of (seed, page, version); the
// guest dirties pages by bumping their version. The bytes are generated
// when streamed, so memory costs 4 bytes per page, not the image size.
type memImage struct {
	mu    sync.Mutex
	seed  uint64
	ver   []uint32
	dirty []uint64 // bitset: pages dirtied since the last takeDirty
	// tracking: dirty bits are recorded only while a migration tracks.
	tracking int
	dirtied  int64
}

func newMemImage(size int64, seed uint64) *memImage {
	n := (size + PageSize - 1) / PageSize
	return &memImage{seed: seed, ver: make([]uint32, n), dirty: make([]uint64, (n+63)/64)}
}

// pages returns the number of pages.
func (m *memImage) pages() int64 { return int64(len(m.ver)) }

// fillPage writes page i at version v into buf (PageSize bytes). About a
// quarter of never-written pages are zero (free memory); the rest hold a
// header and pseudo-random words.
func (m *memImage) fillPage(buf []byte, i int64, v uint32) {
	h := mix(m.seed ^ uint64(i)*0x9e3779b97f4a7c15 ^ uint64(v)<<40)
	if v == 0 && h%4 == 0 {
		clear(buf[:PageSize])
		return
	}
	binary.LittleEndian.PutUint64(buf[0:], uint64(i))
	binary.LittleEndian.PutUint32(buf[8:], v)
	binary.LittleEndian.PutUint32(buf[12:], 0x57414e4d) // "WANM"
	x := h | 1
	for j := 16; j < PageSize; j += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(buf[j:], x)
	}
}

func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	return x ^ x>>31
}

// dirtyPage bumps page i's version (m.mu held).
func (m *memImage) dirtyPage(i int64) {
	m.ver[i]++
	m.dirtied++
	if m.tracking > 0 {
		m.dirty[i/64] |= 1 << (i % 64)
	}
}

// startTracking begins recording dirty pages (a migration's round 1 sends
// everything, so earlier dirt does not matter).
func (m *memImage) startTracking() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tracking++
	clear(m.dirty)
}

func (m *memImage) stopTracking() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.tracking--
}

// takeDirty returns the pages dirtied since the last call (with their
// current versions) and clears the set.
func (m *memImage) takeDirty() (idx []int64, ver []uint32) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for w, word := range m.dirty {
		for word != 0 {
			b := bits.TrailingZeros64(word)
			word &^= 1 << b
			i := int64(w)*64 + int64(b)
			idx = append(idx, i)
			ver = append(ver, m.ver[i])
		}
		m.dirty[w] = 0
	}
	return idx, ver
}

// dirtyCount returns how many pages are dirty now.
func (m *memImage) dirtyCount() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, w := range m.dirty {
		n += bits.OnesCount64(w)
	}
	return n
}

// versions returns a copy of every page's version.
func (m *memImage) versions() []uint32 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]uint32(nil), m.ver...)
}

// digest is the SHA-256 of the image at the given versions.
func (m *memImage) digest(ver []uint32) [32]byte {
	h := sha256.New()
	buf := make([]byte, PageSize)
	for i, v := range ver {
		m.fillPage(buf, int64(i), v)
		_, _ = h.Write(buf)
	}
	var out [32]byte
	copy(out[:], h.Sum(nil))
	return out
}

// memFor returns (creating) the memory image of a VM of size bytes.
func (e *simExt) memFor(vmUUID string, size int64) *memImage {
	e.mu.Lock()
	defer e.mu.Unlock()
	m, ok := e.mems[vmUUID]
	if !ok || m.pages() != (size+PageSize-1)/PageSize {
		m = newMemImage(size, mix(uint64(len(vmUUID))^hashString(vmUUID)))
		e.mems[vmUUID] = m
	}
	return m
}

func hashString(s string) uint64 {
	h := sha256.Sum256([]byte(s))
	return binary.LittleEndian.Uint64(h[:8])
}
