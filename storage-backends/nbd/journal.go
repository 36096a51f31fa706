package nbdstore

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/wanmotion/wanmotion/nbd"
)

// blockSize is the granularity of the applied-block journal and of the
// verification hashes (the CBT block size).
const blockSize = 64 << 10

// hashSize is the size of one block hash in the hash export.
const hashSize = sha256.Size

// journalRecord is the receiver's applied-block record, persisted (file,
// atomically replaced) at every FLUSH and served read-only to the sender
// (export "<token>/journal") so a restarted round skips what is durable.
type journalRecord struct {
	Round     int    `msgpack:"round"`
	Snapshot  string `msgpack:"snapshot"`
	BlockSize int64  `msgpack:"block_size"`
	Applied   []byte `msgpack:"applied"` // bit i (MSB first): block i written and flushed in this round
}

func (r *journalRecord) isSet(i int64) bool {
	return i/8 < int64(len(r.Applied)) && r.Applied[i/8]&(0x80>>(i%8)) != 0
}

// journal tracks writes of the current round; a FLUSH makes the pending
// blocks durable (file fsync first, then the journal file).
//
// Each (round, snapshot) key is a generation. A data export is bound to the
// generation current when it was opened, and its writes are fenced: once a
// new key begins, a write still arriving on an older export (a connection
// the sender gave up on, delivered late through the WAN) is refused instead
// of overwriting newer data and being recorded as applied in the new round.
type journal struct {
	path    string
	nblocks int64

	// fence is held shared by every write (check, write, mark) and
	// exclusively by begin when the key changes.
	fence sync.RWMutex

	mu      sync.Mutex
	gen     uint64 // bumped by begin on a new key
	rec     journalRecord
	pending []byte // blocks written since the last flush
	applied int64  // bytes applied in this round (status)
}

func newJournal(path string, size int64) *journal {
	n := (size + blockSize - 1) / blockSize
	return &journal{path: path, nblocks: n,
		rec:     journalRecord{Round: -1, BlockSize: blockSize, Applied: make([]byte, (n+7)/8)},
		pending: make([]byte, (n+7)/8)}
}

// loadJournal reads a persisted journal; a missing or unreadable file
// gives an empty one (the round is then sent again in full).
func loadJournal(path string, size int64) *journal {
	j := newJournal(path, size)
	b, err := os.ReadFile(path)
	if err != nil {
		return j
	}
	rec, err := decodeJournal(b)
	if err != nil || len(rec.Applied) != len(j.rec.Applied) {
		return j
	}
	j.rec = *rec
	return j
}

// decodeJournal decodes a journal record (from our state directory or,
// at the sender, from the receiver's journal export).
func decodeJournal(b []byte) (*journalRecord, error) {
	var rec journalRecord
	if err := msgpack.Unmarshal(b, &rec); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if rec.BlockSize != blockSize {
		return nil, fmt.Errorf("journal: block size %d, want %d", rec.BlockSize, blockSize)
	}
	if rec.Round < -1 {
		return nil, fmt.Errorf("journal: round %d", rec.Round)
	}
	return &rec, nil
}

// errStaleRound refuses a write made through the data export of a round
// that is no longer the journal's current one.
var errStaleRound = errors.New("write for a round that is no longer current")

// begin switches the journal to (round, snapshot) and returns the key's
// generation; a new key clears the record and waits for writes in flight.
func (j *journal) begin(round int, snapshot string) uint64 {
	j.mu.Lock()
	if j.rec.Round == round && j.rec.Snapshot == snapshot {
		defer j.mu.Unlock()
		return j.gen
	}
	j.mu.Unlock()
	j.fence.Lock()
	defer j.fence.Unlock()
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.rec.Round == round && j.rec.Snapshot == snapshot {
		return j.gen
	}
	j.gen++
	j.rec.Round, j.rec.Snapshot = round, snapshot
	clear(j.rec.Applied)
	clear(j.pending)
	j.applied = 0
	return j.gen
}

// write runs fn (a write of [off, off+n)) for generation gen and records
// the blocks it covered; it refuses with errStaleRound when gen is not
// the current generation.
func (j *journal) write(gen uint64, off, n, size int64, fn func() error) error {
	j.fence.RLock()
	defer j.fence.RUnlock()
	j.mu.Lock()
	cur := j.gen
	j.mu.Unlock()
	if cur != gen {
		return errStaleRound
	}
	if err := fn(); err != nil {
		return err
	}
	j.mark(off, n, size)
	return nil
}

// mark records the blocks wholly covered by [off, off+n) as written.
func (j *journal) mark(off, n, size int64) {
	first := (off + blockSize - 1) / blockSize
	end := off + n
	last := end / blockSize // exclusive
	if end == size {
		last = (end + blockSize - 1) / blockSize
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	for i := first; i < last && i < j.nblocks; i++ {
		j.pending[i/8] |= 0x80 >> (i % 8)
	}
	j.applied += n
}

// pendingSet is the set of blocks taken by takePending, with the
// generation they were written in.
type pendingSet struct {
	gen    uint64
	blocks []byte
}

// takePending returns and clears the pending set.
func (j *journal) takePending() pendingSet {
	j.mu.Lock()
	defer j.mu.Unlock()
	p := append([]byte(nil), j.pending...)
	clear(j.pending)
	return pendingSet{gen: j.gen, blocks: p}
}

// commit merges blocks made durable into the record and persists it.
// Blocks of an older generation (a new round began since takePending)
// are dropped: they belong to the previous round's record.
func (j *journal) commit(durable pendingSet) error {
	j.mu.Lock()
	if durable.gen == j.gen {
		for i, b := range durable.blocks {
			j.rec.Applied[i] |= b
		}
	}
	b, err := msgpack.Marshal(&j.rec)
	j.mu.Unlock()
	if err != nil {
		return err
	}
	return writeFileSync(j.path, b)
}

// encoded returns the record as served on the journal export.
func (j *journal) encoded() ([]byte, error) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return msgpack.Marshal(&j.rec)
}

func (j *journal) status() (round int, applied int64) {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.rec.Round, j.applied
}

// writeFileSync replaces path atomically and durably.
func writeFileSync(path string, b []byte) error {
	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(b); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		_ = f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// replicaBackend is the writable export: the replica device, with every
// completed write recorded in the journal and FLUSH persisting it.
type replicaBackend struct {
	f    *nbd.FileBackend
	j    *journal
	gen  uint64 // journal generation of the round this export serves
	size int64
	// syncMu orders journal commits (two FLUSHes on two connections).
	syncMu *sync.Mutex
}

var (
	_ nbd.Backend      = (*replicaBackend)(nil)
	_ nbd.Zeroer       = (*replicaBackend)(nil)
	_ nbd.Trimmer      = (*replicaBackend)(nil)
	_ nbd.ExtentLister = (*replicaBackend)(nil)
)

func (r *replicaBackend) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }
func (r *replicaBackend) Size() (int64, error)                    { return r.size, nil }
func (r *replicaBackend) Extents(off, n int64) ([]nbd.Extent, error) {
	return r.f.Extents(off, n)
}

func (r *replicaBackend) WriteAt(p []byte, off int64) (int, error) {
	var n int
	err := r.j.write(r.gen, off, int64(len(p)), r.size, func() error {
		var err error
		n, err = r.f.WriteAt(p, off)
		return err
	})
	return n, err
}

func (r *replicaBackend) ZeroAt(off, n int64, noHole bool) error {
	return r.j.write(r.gen, off, n, r.size, func() error { return r.f.ZeroAt(off, n, noHole) })
}

func (r *replicaBackend) Trim(off, n int64) error {
	// A trim is a zeroing for us: the replica must read back as the source.
	return r.ZeroAt(off, n, false)
}

// Sync makes completed writes durable, then records them as applied.
func (r *replicaBackend) Sync() error {
	r.syncMu.Lock()
	defer r.syncMu.Unlock()
	pending := r.j.takePending()
	if err := r.f.Sync(); err != nil {
		return err
	}
	if err := r.j.commit(pending); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// hashBackend is the read-only verification export: bytes
// [i*32, (i+1)*32) are the SHA-256 of replica block i (64 KiB, the last
// one short), computed when read.
type hashBackend struct {
	f       *nbd.FileBackend
	size    int64 // replica size
	nblocks int64
}

func newHashBackend(f *nbd.FileBackend, size int64) *hashBackend {
	return &hashBackend{f: f, size: size, nblocks: (size + blockSize - 1) / blockSize}
}

func (h *hashBackend) Size() (int64, error) { return h.nblocks * hashSize, nil }
func (h *hashBackend) Sync() error          { return nil }
func (h *hashBackend) ReadOnly() bool       { return true }

func (h *hashBackend) WriteAt([]byte, int64) (int, error) {
	return 0, errors.New("hash export is read-only")
}

func (h *hashBackend) ReadAt(p []byte, off int64) (int, error) {
	buf := make([]byte, blockSize)
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		i := pos / hashSize
		n := min(blockSize, h.size-i*blockSize)
		if _, err := h.f.ReadAt(buf[:n], i*blockSize); err != nil {
			return done, err
		}
		sum := sha256.Sum256(buf[:n])
		done += copy(p[done:], sum[pos%hashSize:])
	}
	return done, nil
}
