package nbd

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"
)

// FileBackend serves a regular file or a block device. It is sparse-aware:
// block status comes from SEEK_DATA/SEEK_HOLE, TRIM and WRITE_ZEROES use
// fallocate(PUNCH_HOLE|KEEP_SIZE) or fallocate(ZERO_RANGE|KEEP_SIZE).
type FileBackend struct {
	f        *os.File
	fd       int
	readOnly bool
	blockDev bool
	ownsFile bool
}

// OpenFile opens path (a regular file or a block device) as a Backend.
func OpenFile(path string, readOnly bool) (*FileBackend, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, fmt.Errorf("nbd: open backend: %w", err)
	}
	b, err := NewFileBackend(f, readOnly)
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	b.ownsFile = true
	return b, nil
}

// NewFileBackend wraps an open file. Close does not close f.
func NewFileBackend(f *os.File, readOnly bool) (*FileBackend, error) {
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("nbd: stat backend: %w", err)
	}
	m := st.Mode()
	if !m.IsRegular() && m&os.ModeDevice == 0 {
		return nil, fmt.Errorf("nbd: backend %s is neither a regular file nor a block device", f.Name())
	}
	return &FileBackend{f: f, fd: int(f.Fd()), readOnly: readOnly, blockDev: m&os.ModeDevice != 0}, nil
}

// Close closes the file if OpenFile opened it.
func (b *FileBackend) Close() error {
	if b.ownsFile {
		return b.f.Close()
	}
	return nil
}

// ReadOnly reports whether the backend refuses writes; the server then
// serves it read-only whatever the Export says.
func (b *FileBackend) ReadOnly() bool { return b.readOnly }

// ReadAt implements Backend. Reads past end of file return zeroes.
func (b *FileBackend) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.f.ReadAt(p, off)
	if errors.Is(err, io.EOF) {
		clear(p[n:])
		return len(p), nil
	}
	return n, err
}

// fileWriteStep is the largest single pwrite FileBackend.WriteAt issues;
// longer writes are split at multiples of it in the file.
//
// Why: recent kernels (seen on 6.18) let ext4, like xfs, cache file data
// in large folios sized from each write's length, so a 2 MiB or 4 MiB
// pwrite into a hole allocates 2 MiB folios. On our test VM, copying into
// freshly allocated 2 MiB folios was 5-10x slower than with 256 KiB
// writes (likely because the balloon driver's free page reporting hands
// free 2 MiB blocks back to the hypervisor); see docs/benchmarks.md, "NBD
// copy over loopback". 256 KiB is also nbdcopy's request size.
const fileWriteStep = 256 << 10

// WriteAt implements Backend. Writes longer than 256 KiB are issued as
// several pwrites, each within one 256 KiB-aligned piece of the file.
func (b *FileBackend) WriteAt(p []byte, off int64) (int, error) {
	if b.readOnly {
		return 0, ErrPerm
	}
	done := 0
	for done < len(p) {
		k := writePiece(off+int64(done), len(p)-done)
		n, err := b.f.WriteAt(p[done:done+k], off+int64(done))
		done += n
		if err != nil {
			return done, err
		}
	}
	return done, nil
}

// writePiece is the length of the next pwrite of a write of n bytes at off:
// up to the next multiple of fileWriteStep, at most n.
func writePiece(off int64, n int) int {
	return int(min(int64(n), fileWriteStep-off%fileWriteStep))
}

// Size implements Backend.
func (b *FileBackend) Size() (int64, error) {
	if b.blockDev {
		n, err := unix.Seek(b.fd, 0, io.SeekEnd)
		if err != nil {
			return 0, fmt.Errorf("nbd: block device size: %w", err)
		}
		return n, nil
	}
	st, err := b.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("nbd: backend size: %w", err)
	}
	return st.Size(), nil
}

// Sync implements Backend.
func (b *FileBackend) Sync() error {
	if b.readOnly {
		return nil
	}
	return b.f.Sync()
}

// Trim implements Trimmer; it is a no-op where punching holes is unsupported.
func (b *FileBackend) Trim(off, length int64) error {
	if b.readOnly {
		return ErrPerm
	}
	if b.isHole(off, length) {
		return nil
	}
	err := unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return nil
	}
	return err
}

// isHole reports whether [off, off+length) of a regular file is entirely a
// hole (no data at or after off before off+length).
func (b *FileBackend) isHole(off, length int64) bool {
	if b.blockDev {
		return false
	}
	data, err := unix.Seek(b.fd, off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true
	}
	return err == nil && data >= off+length
}

// ZeroAt implements Zeroer.
func (b *FileBackend) ZeroAt(off, length int64, noHole bool) error {
	if b.readOnly {
		return ErrPerm
	}
	unsupported := func(err error) bool {
		return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EINVAL)
	}
	if !noHole {
		if b.isHole(off, length) {
			return nil // already reads as zeroes; punching would only take locks
		}
		err := unix.Fallocate(b.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if err == nil || !unsupported(err) {
			return err
		}
	}
	err := unix.Fallocate(b.fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil && unsupported(err) {
		return fmt.Errorf("%w: fallocate: %v", ErrNotFast, err)
	}
	return err
}

// maxExtents bounds one Extents answer.
const maxExtents = 4096

// Extents implements ExtentLister via SEEK_DATA/SEEK_HOLE. Where seeking is
// unsupported (some block devices, old file systems) the range is data.
func (b *FileBackend) Extents(off, length int64) ([]Extent, error) {
	end := off + length
	var out []Extent
	add := func(o, e int64, hole bool) {
		if e > end {
			e = end
		}
		if e <= o {
			return
		}
		var fl uint32
		if hole {
			fl = ExtentHole | ExtentZero
		}
		if n := len(out); n > 0 && out[n-1].Flags == fl && out[n-1].Offset+out[n-1].Length == o {
			out[n-1].Length += e - o
			return
		}
		out = append(out, Extent{Offset: o, Length: e - o, Flags: fl})
	}
	pos := off
	for pos < end && len(out) < maxExtents {
		data, err := unix.Seek(b.fd, pos, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) { // no data at or after pos
			add(pos, end, true)
			break
		}
		if err != nil {
			add(pos, end, false)
			break
		}
		if data > pos {
			add(pos, data, true)
			pos = data
			if pos >= end {
				break
			}
		}
		hole, err := unix.Seek(b.fd, pos, unix.SEEK_HOLE)
		if err != nil || hole <= pos {
			add(pos, end, false)
			break
		}
		add(pos, hole, false)
		pos = hole
	}
	if len(out) == 0 {
		out = append(out, Extent{Offset: off, Length: length})
	}
	return out, nil
}
