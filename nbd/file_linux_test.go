package nbd

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestWritePiece(t *testing.T) {
	const s = fileWriteStep
	tests := []struct {
		name string
		off  int64
		n    int
		want int
	}{
		{"short aligned", 0, 4096, 4096},
		{"exactly one step", 0, s, s},
		{"longer than a step", 0, 4 << 20, s},
		{"unaligned start stops at the boundary", 4096, 4 << 20, s - 4096},
		{"unaligned short inside one step", 4096, 100, 100},
		{"crossing one boundary", s - 10, 20, 10},
		{"from a later boundary", 3 * s, s + 1, s},
		{"zero length", 5, 0, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, writePiece(tt.off, tt.n))
		})
	}
}

// TestFileBackendWriteSplits writes ranges longer than fileWriteStep at
// aligned and unaligned offsets and checks every byte of the file.
func TestFileBackendWriteSplits(t *testing.T) {
	const size = 4 << 20
	tests := []struct {
		name string
		off  int64
		n    int
	}{
		{"aligned 1 MiB", 0, 1 << 20},
		{"unaligned 1 MiB plus a bit", 4096 + 7, 1<<20 + 13},
		{"one byte before a boundary", fileWriteStep - 1, 2},
		{"up to the end", size - 3*fileWriteStep/2, 3 * fileWriteStep / 2},
		{"past the end extends the file", size - 100, fileWriteStep + 300},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "f.img")
			require.NoError(t, os.WriteFile(path, nil, 0o644))
			require.NoError(t, os.Truncate(path, size))
			b := fileBackend(t, path, false)
			data := randomData(tt.n, byte(i+1))
			n, err := b.WriteAt(data, tt.off)
			require.NoError(t, err)
			assert.Equal(t, tt.n, n)
			want := make([]byte, max(size, tt.off+int64(tt.n)))
			copy(want[tt.off:], data)
			got, err := os.ReadFile(path)
			require.NoError(t, err)
			require.Len(t, got, len(want))
			assert.True(t, bytesEqual(want, got), "file content differs")
		})
	}
}

func TestFileBackendWriteReadOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f.img")
	require.NoError(t, os.WriteFile(path, make([]byte, 4096), 0o644))
	b := fileBackend(t, path, true)
	_, err := b.WriteAt([]byte{1}, 0)
	assert.ErrorIs(t, err, ErrPerm)
}
