package xapisim

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzReceivePages feeds arbitrary memory streams (outside input on the
// xenops endpoint) to the receiver: it must never write outside the image
// and must accept exactly the well-formed records.
func FuzzReceivePages(f *testing.F) {
	rec := func(i uint64, fill byte) []byte {
		b := make([]byte, 8+PageSize)
		binary.LittleEndian.PutUint64(b, i)
		for j := 8; j < len(b); j++ {
			b[j] = fill
		}
		return b
	}
	f.Add([]byte{})
	f.Add(rec(0, 1))
	f.Add(append(rec(3, 2), rec(1, 3)...))
	f.Add(rec(4, 1))                     // outside a 4-page image
	f.Add(rec(0, 1)[:100])               // truncated
	f.Add(rec(1<<62, 9))                 // huge index
	f.Add(append(rec(2, 5), 0, 1, 2, 3)) // trailing garbage
	dir := f.TempDir()
	s := &Sim{cfg: Config{StateDir: dir}}
	f.Fuzz(func(t *testing.T, data []byte) {
		vm := "OpaqueRef:fuzz"
		require.NoError(t, s.newMemFile(vm, 4*PageSize))
		err := s.receivePages(vm, bytes.NewReader(data))
		st, serr := os.Stat(s.memPath(vm))
		require.NoError(t, serr)
		require.Equal(t, int64(4*PageSize), st.Size(), "the image never grows")
		wellFormed := len(data)%(8+PageSize) == 0
		for off := 0; wellFormed && off < len(data); off += 8 + PageSize {
			wellFormed = binary.LittleEndian.Uint64(data[off:]) < 4
		}
		if wellFormed {
			require.NoError(t, err)
		} else {
			require.Error(t, err)
		}
		_ = os.Remove(filepath.Join(dir, "xenops", "fuzz.mem"))
	})
}
