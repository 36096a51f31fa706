package xapi

import (
	"encoding/base64"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestChangedBlocksMSBFirst(t *testing.T) {
	// Byte 0 = 0b1000_0001: blocks 0 and 7; byte 1 = 0b0100_0000: block 9;
	// byte 2 = 0xFF: blocks 16..23.
	raw := []byte{0x81, 0x40, 0xFF, 0x00}
	cb, err := DecodeChangedBlocks(base64.StdEncoding.EncodeToString(raw))
	require.NoError(t, err)
	assert.Equal(t, int64(32), cb.Len())
	assert.Equal(t, []int64{0, 7, 9, 16, 17, 18, 19, 20, 21, 22, 23}, cb.Blocks())
	assert.Equal(t, int64(11), cb.Count())
	assert.True(t, cb.IsSet(0))
	assert.False(t, cb.IsSet(1))
	assert.False(t, cb.IsSet(1000))
	assert.Equal(t, []Extent{
		{Offset: 0, Length: CBTBlockSize},
		{Offset: 7 * CBTBlockSize, Length: CBTBlockSize},
		{Offset: 9 * CBTBlockSize, Length: CBTBlockSize},
		{Offset: 16 * CBTBlockSize, Length: 8 * CBTBlockSize},
	}, cb.Extents(0))
	// A disk of 20.5 blocks: the extent is clipped at the end of the disk.
	size := int64(20*CBTBlockSize + CBTBlockSize/2)
	ext := cb.Extents(size)
	require.Len(t, ext, 4)
	assert.Equal(t, Extent{Offset: 16 * CBTBlockSize, Length: 4*CBTBlockSize + CBTBlockSize/2}, ext[3])
}

func TestChangedBlocksSetAndEncode(t *testing.T) {
	cb := NewChangedBlocks(10)
	cb.Set(3)
	cb.Set(9)
	cb.Set(40) // grows
	assert.Equal(t, []int64{3, 9, 40}, cb.Blocks())
	again, err := DecodeChangedBlocks(cb.Encode())
	require.NoError(t, err)
	assert.Equal(t, cb.Bytes(), again.Bytes())
}

func TestDecodeChangedBlocksInput(t *testing.T) {
	for in, want := range map[string][]int64{
		"":         nil,
		"gA==":     {0},
		"gA":       {0}, // unpadded
		" gA==\n":  {0},
		"AAAAAAAB": {47},
	} {
		cb, err := DecodeChangedBlocks(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, cb.Blocks(), in)
	}
	_, err := DecodeChangedBlocks("not base64!")
	assert.Error(t, err)
}

func FuzzDecodeChangedBlocks(f *testing.F) {
	f.Add("gA==")
	f.Add("/////w==")
	f.Add("AAAAAAAB")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		cb, err := DecodeChangedBlocks(s)
		if err != nil {
			return
		}
		blocks := cb.Blocks()
		require.Equal(t, cb.Count(), int64(len(blocks)))
		for i, b := range blocks {
			require.True(t, cb.IsSet(b))
			if i > 0 {
				require.Greater(t, b, blocks[i-1])
			}
		}
		var covered int64
		for _, e := range cb.Extents(0) {
			require.Zero(t, e.Offset%CBTBlockSize)
			covered += e.Length
		}
		require.Equal(t, cb.Count()*CBTBlockSize, covered)
		again, err := DecodeChangedBlocks(cb.Encode())
		require.NoError(t, err)
		require.Equal(t, cb.Bytes(), again.Bytes())
	})
}
