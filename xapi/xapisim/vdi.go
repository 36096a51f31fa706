package xapisim

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sync"

	"golang.org/x/sys/unix"
)

// CBTBlockSize is the changed-block-tracking granularity (64 KiB).
const CBTBlockSize = 64 << 10

// vdiState is the simulator-side state of a VDI beyond its DB record:
// changed block tracking and the data lock.
//
// CBT model: a live VDI with CBT enabled belongs to a chain (ChainID). Its
// Bitmap holds the blocks written since its last snapshot. A snapshot
// taken while CBT is on gets Seq = the live VDI's next sequence number and
// takes over the live bitmap (the blocks changed between the previous
// snapshot and this one); the live bitmap restarts empty. The blocks that
// differ between two points of a chain are the union of the bitmaps of the
// points after the older one up to and including the newer one. Destroying
// a snapshot merges its bitmap into the next point, so nothing is lost.
type vdiState struct {
	ChainID string `json:"chain_id,omitempty"`
	Seq     int64  `json:"seq,omitempty"`
	Live    string `json:"live,omitempty"` // for snapshots: the live VDI's uuid
	Bitmap  []byte `json:"bitmap,omitempty"`
	// Clean: no write since the content_id was assigned.
	Clean bool `json:"clean"`
	// stale: written since physical_utilisation was last refreshed.
	stale bool

	data sync.RWMutex // writers RLock (pwrite), snapshot/copy Lock
}

func (v *vdiState) snapshotForSave() vdiState {
	return vdiState{ChainID: v.ChainID, Seq: v.Seq, Live: v.Live, Bitmap: slices.Clone(v.Bitmap), Clean: v.Clean}
}

func bitmapLen(size int64) int {
	blocks := (size + CBTBlockSize - 1) / CBTBlockSize
	return int((blocks + 7) / 8)
}

// markBlocks sets the bits of [off, off+n) in bm (MSB-first).
func markBlocks(bm []byte, off, n int64) {
	if n <= 0 {
		return
	}
	for b := off / CBTBlockSize; b <= (off+n-1)/CBTBlockSize; b++ {
		if int(b/8) < len(bm) {
			bm[b/8] |= 0x80 >> (b % 8)
		}
	}
}

func orInto(dst, src []byte) {
	for i := range min(len(dst), len(src)) {
		dst[i] |= src[i]
	}
}

// vdiPath returns a VDI's backing file (pool lock held).
func (p *Pool) vdiPath(o *object) string {
	sr, err := p.db.get("SR", o.str("SR"))
	if err != nil {
		return ""
	}
	return filepath.Join(p.sim.srDir(sr.str("uuid")), o.str("uuid")+".img")
}

// state returns (creating) the vdiState of a VDI (pool lock held).
func (p *Pool) state(uuid string) *vdiState {
	v, ok := p.vdis[uuid]
	if !ok {
		v = &vdiState{}
		p.vdis[uuid] = v
	}
	return v
}

// ErrVDIRange is returned by WriteVDI for a write outside the disk.
var ErrVDIRange = errors.New("write outside the VDI")

// WriteVDI is the one write path for guest and host writes to a VDI: it
// writes data at off in the backing file and records the change for CBT
// and content_id. Guest workloads, NBD and dom0-attach paths use it.
func (s *Sim) WriteVDI(uuid string, off int64, data []byte) error {
	p, _, err := s.findVDI(uuid)
	if err != nil {
		return err
	}
	st := p.state(uuid)
	p.mu.Unlock()
	// Lock order: VDI data lock, then pool lock.
	st.data.RLock()
	defer st.data.RUnlock()
	p.mu.Lock()
	o, err := p.db.byUUID("VDI", uuid)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	size := o.int("virtual_size")
	if off < 0 || off+int64(len(data)) > size || o.str("type") == "cbt_metadata" {
		p.mu.Unlock()
		return fmt.Errorf("%w: offset %d length %d size %d", ErrVDIRange, off, len(data), size)
	}
	path := p.vdiPath(o)
	p.noteWrite(o, st, off, int64(len(data)))
	p.mu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("write VDI %s: %w", uuid, err)
	}
	defer func() { _ = f.Close() }()
	if _, err := f.WriteAt(data, off); err != nil {
		return fmt.Errorf("write VDI %s: %w", uuid, err)
	}
	// A storage migration in flight mirrors the write synchronously
	// (migrate.go); the data lock is still held, so it is ordered with the
	// migration's bulk copy.
	s.ext().mirrorWrite(uuid, off, data)
	return nil
}

// NoteWrite records a write done by other means (e.g. a device path
// opened by a dom0 process) for CBT and content_id. Pool lock not held.
func (s *Sim) NoteWrite(uuid string, off, n int64) error {
	p, o, err := s.findVDI(uuid)
	if err != nil {
		return err
	}
	defer p.mu.Unlock()
	p.noteWrite(o, p.state(uuid), off, n)
	return nil
}

func (p *Pool) noteWrite(o *object, st *vdiState, off, n int64) {
	// Changed-block log for migrate_send's incremental copy (migrate.go).
	p.sim.ext().trackWrite(o.str("uuid"), o.strMap("other_config")["content_id"], st.Clean, o.int("virtual_size"), off, n)
	if !st.stale {
		st.stale = true
		p.sim.markDirty()
	}
	if o.bool("cbt_enabled") && st.ChainID != "" {
		if len(st.Bitmap) == 0 {
			st.Bitmap = make([]byte, bitmapLen(o.int("virtual_size")))
		}
		markBlocks(st.Bitmap, off, n)
		p.sim.markDirty()
	}
	if st.Clean {
		st.Clean = false
		oc := o.strMap("other_config")
		oc["content_id"] = NewUUID()
		p.db.touch(o)
	}
}

// copySparse copies size bytes of src into dst keeping holes (SEEK_DATA /
// SEEK_HOLE + copy_file_range). dst must be empty and sized already.
func copySparse(dst, src *os.File, size int64) error {
	var off int64
	for off < size {
		data, err := unix.Seek(int(src.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				return nil // only a hole remains
			}
			return copyRange(dst, src, off, size-off)
		}
		hole, err := unix.Seek(int(src.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		hole = min(hole, size)
		if err := copyRange(dst, src, data, hole-data); err != nil {
			return err
		}
		off = hole
	}
	return nil
}

func copyRange(dst, src *os.File, off, n int64) error {
	for n > 0 {
		roff, woff := off, off
		c, err := unix.CopyFileRange(int(src.Fd()), &roff, int(dst.Fd()), &woff, int(min(n, 1<<30)), 0)
		if err != nil || c == 0 {
			// Fallback: plain read/write.
			buf := make([]byte, 1<<20)
			for n > 0 {
				k := min(int64(len(buf)), n)
				r, rerr := src.ReadAt(buf[:k], off)
				if r > 0 {
					if _, werr := dst.WriteAt(buf[:r], off); werr != nil {
						return werr
					}
				}
				off += int64(r)
				n -= int64(r)
				if rerr != nil {
					if errors.Is(rerr, io.EOF) {
						return nil
					}
					return rerr
				}
			}
			return nil
		}
		off += int64(c)
		n -= int64(c)
	}
	return nil
}

// copyFile makes dstPath (dstSize bytes) a sparse copy of the first size
// bytes of srcPath, the rest holes.
func copyFile(dstPath, srcPath string, size, dstSize int64) error {
	src, err := os.Open(srcPath)
	if err != nil {
		return fmt.Errorf("copy VDI data: %w", err)
	}
	defer func() { _ = src.Close() }()
	dst, err := os.OpenFile(dstPath, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("copy VDI data: %w", err)
	}
	if err := dst.Truncate(dstSize); err != nil {
		_ = dst.Close()
		return fmt.Errorf("copy VDI data: %w", err)
	}
	if err := copySparse(dst, src, size); err != nil {
		_ = dst.Close()
		return fmt.Errorf("copy VDI data: %w", err)
	}
	if err := dst.Close(); err != nil {
		return fmt.Errorf("copy VDI data: %w", err)
	}
	return nil
}

// createVDIFile makes an empty sparse file of size.
func createVDIFile(path string, size int64) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("create VDI file: %w", err)
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o644)
	if err != nil {
		return fmt.Errorf("create VDI file: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		_ = f.Close()
		return fmt.Errorf("create VDI file: %w", err)
	}
	return f.Close()
}

// physicalUtilisation returns the allocated bytes of a file.
func physicalUtilisation(path string) int64 {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0
	}
	return st.Blocks * 512
}

// refreshUsage updates physical_utilisation of written VDIs and the SRs'
// physical_utilisation / virtual_allocation (pool lock held). It runs with
// each periodic save, so the figures lag writes by a fraction of a second.
func (p *Pool) refreshUsage() {
	changed := false
	for uuid, st := range p.vdis {
		if !st.stale {
			continue
		}
		st.stale = false
		if o, err := p.db.byUUID("VDI", uuid); err == nil && o.str("type") != "cbt_metadata" {
			if u := physicalUtilisation(p.vdiPath(o)); u != o.int("physical_utilisation") {
				p.db.set(o, "physical_utilisation", u)
				changed = true
			}
		}
	}
	if !changed {
		return
	}
	for _, sr := range p.db.all("SR") {
		var phys, virt int64
		for _, v := range p.db.find("VDI", "SR", sr.Ref) {
			phys += v.int("physical_utilisation")
			virt += v.int("virtual_size")
		}
		if sr.int("physical_utilisation") != phys || sr.int("virtual_allocation") != virt {
			sr.Fields["physical_utilisation"] = phys
			sr.Fields["virtual_allocation"] = virt
			p.db.touch(sr)
		}
	}
}
