package xapiadapt

import (
	"os"
	"testing"

	"github.com/stretchr/testify/require"
)

// corrupt flips one byte at offset 4096 of a file.
func corrupt(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	defer f.Close()
	b := make([]byte, 1)
	_, err = f.ReadAt(b, 4096)
	require.NoError(t, err)
	b[0] ^= 0xFF
	_, err = f.WriteAt(b, 4096)
	require.NoError(t, err)
}
