package nbdstore

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmihailenco/msgpack/v5"

	"github.com/wanmotion/wanmotion/nbd"
)

// FuzzDecodeJournal feeds the decoder of the receiver's journal (which the
// sender reads from the peer) arbitrary bytes: it must never panic, and a
// record it accepts must be safe to query.
func FuzzDecodeJournal(f *testing.F) {
	for _, rec := range []journalRecord{
		{Round: -1, BlockSize: blockSize},
		{Round: 3, Snapshot: "snap", BlockSize: blockSize, Applied: []byte{0xff, 0x01}},
		{Round: 1, BlockSize: 4096, Applied: []byte{1}},
	} {
		b, err := msgpack.Marshal(&rec)
		require.NoError(f, err)
		f.Add(b)
	}
	f.Add([]byte{0xc1})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		rec, err := decodeJournal(b)
		if err != nil {
			return
		}
		assert.Equal(t, int64(blockSize), rec.BlockSize)
		for i := int64(-1); i < int64(len(rec.Applied))*8+9; i += 7 {
			if i >= 0 {
				_ = rec.isSet(i)
			}
		}
		_ = rangeApplied(rec, 0, 4*blockSize)
	})
}

func TestJournalPersistsFlushedBlocksOnly(t *testing.T) {
	path := t.TempDir() + "/j.msgpack"
	j := newJournal(path, 10*blockSize+100)
	j.begin(2, "s2")
	j.mark(0, 2*blockSize, 10*blockSize+100)           // blocks 0, 1
	j.mark(3*blockSize+1, blockSize, 10*blockSize+100) // no whole block
	j.mark(10*blockSize, 100, 10*blockSize+100)        // the short last block
	require.NoError(t, j.commit(j.takePending()))
	j.mark(5*blockSize, blockSize, 10*blockSize+100) // written, never flushed

	got := loadJournal(path, 10*blockSize+100)
	assert.Equal(t, 2, got.rec.Round)
	assert.Equal(t, "s2", got.rec.Snapshot)
	var set []int64
	for i := int64(0); i < 11; i++ {
		if got.rec.isSet(i) {
			set = append(set, i)
		}
	}
	assert.Equal(t, []int64{0, 1, 10}, set)
	got.begin(3, "s3")
	assert.False(t, got.rec.isSet(0), "a new round starts empty")
}

func TestRedactKeepsTheChain(t *testing.T) {
	base := fmt.Errorf("negotiate export %q: %w", "/vdi?session_id=OpaqueRef:secret", nbd.ErrPolicy)
	err := redact(base, "OpaqueRef:secret")
	assert.NotContains(t, err.Error(), "OpaqueRef:secret")
	assert.Contains(t, err.Error(), "[redacted]")
	assert.ErrorIs(t, err, nbd.ErrPolicy)
	assert.Equal(t, base, redact(base, ""), "nothing to hide")
	assert.Nil(t, redact(nil, "x"))
}
