package xapi

import (
	"encoding/base64"
	"fmt"
	"math/bits"
	"strings"
)

// CBTBlockSize is the granularity of VDI.list_changed_blocks: one bit per
// 64 KiB block.
const CBTBlockSize = 64 << 10

// ChangedBlocks is a decoded CBT bitmap: block i (bytes i*64KiB up to
// (i+1)*64KiB) is bit 7-i%8 of byte i/8 (MSB first), as xapi's SM builds it
// with a big-endian bitarray.
type ChangedBlocks struct {
	bits []byte
}

// NewChangedBlocks returns an empty bitmap with room for n blocks.
func NewChangedBlocks(n int64) *ChangedBlocks {
	if n < 0 {
		n = 0
	}
	return &ChangedBlocks{bits: make([]byte, (n+7)/8)}
}

// DecodeChangedBlocks decodes the base64 string VDI.list_changed_blocks
// returns. Surrounding white space and missing padding are tolerated.
func DecodeChangedBlocks(s string) (*ChangedBlocks, error) {
	s = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' || r == ' ' || r == '\t' {
			return -1
		}
		return r
	}, s)
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		b, err = base64.RawStdEncoding.DecodeString(strings.TrimRight(s, "="))
		if err != nil {
			return nil, fmt.Errorf("xapi: CBT bitmap is not base64: %w", err)
		}
	}
	return &ChangedBlocks{bits: b}, nil
}

// Encode returns the base64 form xapi sends.
func (b *ChangedBlocks) Encode() string { return base64.StdEncoding.EncodeToString(b.bits) }

// Bytes returns the raw bitmap (not a copy).
func (b *ChangedBlocks) Bytes() []byte { return b.bits }

// Len is the number of blocks the bitmap covers (a multiple of 8).
func (b *ChangedBlocks) Len() int64 { return int64(len(b.bits)) * 8 }

// IsSet reports whether block i changed. Blocks beyond Len are unchanged.
func (b *ChangedBlocks) IsSet(i int64) bool {
	if i < 0 || i >= b.Len() {
		return false
	}
	return b.bits[i/8]&(0x80>>(i%8)) != 0
}

// Set marks block i as changed, growing the bitmap when needed.
func (b *ChangedBlocks) Set(i int64) {
	if i < 0 {
		return
	}
	if need := i/8 + 1; need > int64(len(b.bits)) {
		b.bits = append(b.bits, make([]byte, need-int64(len(b.bits)))...)
	}
	b.bits[i/8] |= 0x80 >> (i % 8)
}

// Count returns the number of changed blocks.
func (b *ChangedBlocks) Count() int64 {
	var n int64
	for _, x := range b.bits {
		n += int64(bits.OnesCount8(x))
	}
	return n
}

// Blocks returns the indices of the changed blocks in increasing order.
func (b *ChangedBlocks) Blocks() []int64 {
	var out []int64
	for i, x := range b.bits {
		for x != 0 {
			lz := bits.LeadingZeros8(x)
			out = append(out, int64(i)*8+int64(lz))
			x &^= 0x80 >> lz
		}
	}
	return out
}

// Extent is a byte range of a disk.
type Extent struct {
	Offset int64
	Length int64
}

// Extents merges runs of changed blocks into byte ranges, clipped to
// virtualSize (the last block of a disk may be partial). virtualSize <= 0
// means no clipping.
func (b *ChangedBlocks) Extents(virtualSize int64) []Extent {
	var out []Extent
	for _, blk := range b.Blocks() {
		off := blk * CBTBlockSize
		if virtualSize > 0 && off >= virtualSize {
			break
		}
		length := int64(CBTBlockSize)
		if virtualSize > 0 && off+length > virtualSize {
			length = virtualSize - off
		}
		if n := len(out); n > 0 && out[n-1].Offset+out[n-1].Length == off {
			out[n-1].Length += length
			continue
		}
		out = append(out, Extent{Offset: off, Length: length})
	}
	return out
}
