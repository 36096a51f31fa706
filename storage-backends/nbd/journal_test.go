package nbdstore

import (
	"bytes"
	"os"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/nbd"
)

func newTestReplica(t *testing.T, size int64) (*receiver, string) {
	t.Helper()
	dir := t.TempDir()
	path := dir + "/replica"
	require.NoError(t, os.WriteFile(path, make([]byte, size), 0o600))
	f, err := nbd.OpenFile(path, false)
	require.NoError(t, err)
	t.Cleanup(func() { _ = f.Close() })
	return &receiver{file: f, size: size, j: newJournal(dir+"/journal", size)}, path
}

func (r *receiver) dataBackend(t *testing.T, round int, snap string) *replicaBackend {
	t.Helper()
	exp, err := r.exports("tok")(t.Context(), dataExport("tok", round, snap))
	require.NoError(t, err)
	rb, ok := exp.Backend.(*replicaBackend)
	require.True(t, ok)
	return rb
}

// A write that arrives late on the export of a previous round (a
// connection the sender gave up on) must neither overwrite the new round's
// data nor be recorded as applied in the new round's journal.
func TestStaleRoundWriteIsFenced(t *testing.T) {
	const size = 4 * blockSize
	r, path := newTestReplica(t, size)
	old := r.dataBackend(t, 1, "snap-a")
	cur := r.dataBackend(t, 2, "snap-b")

	newData := bytes.Repeat([]byte{0xBB}, blockSize)
	_, err := cur.WriteAt(newData, 0)
	require.NoError(t, err)

	_, err = old.WriteAt(bytes.Repeat([]byte{0xAA}, blockSize), 0)
	require.ErrorIs(t, err, errStaleRound)
	_, err = old.WriteAt(bytes.Repeat([]byte{0xAA}, blockSize), blockSize)
	require.ErrorIs(t, err, errStaleRound)
	require.ErrorIs(t, old.ZeroAt(0, blockSize, false), errStaleRound)
	require.NoError(t, cur.Sync())

	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, newData, got[:blockSize], "the newer round's data survives")
	assert.Equal(t, make([]byte, blockSize), got[blockSize:2*blockSize], "the stale write did not land")
	assert.True(t, r.j.rec.isSet(0))
	assert.False(t, r.j.rec.isSet(1), "a refused write is not recorded as applied")

	again := r.dataBackend(t, 2, "snap-b")
	_, err = again.WriteAt(newData, blockSize)
	assert.NoError(t, err, "a second connection of the current round writes")
}

// Blocks taken for a flush of the previous round must not be merged into
// the record of a round that began while the flush ran.
func TestJournalCommitAcrossBeginDropsOldBlocks(t *testing.T) {
	const size = 4 * blockSize
	j := newJournal(t.TempDir()+"/j", size)
	gen := j.begin(1, "a")
	require.NoError(t, j.write(gen, 0, blockSize, size, func() error { return nil }))
	p := j.takePending()
	j.begin(2, "b")
	require.NoError(t, j.commit(p))
	assert.False(t, j.rec.isSet(0), "round 1's block is not applied in round 2")
	assert.Equal(t, 2, j.rec.Round)
}

// begin of a new round waits for writes in flight on the old one.
func TestJournalBeginWaitsForWritesInFlight(t *testing.T) {
	const size = 4 * blockSize
	j := newJournal(t.TempDir()+"/j", size)
	gen := j.begin(1, "a")
	inWrite, release := make(chan struct{}), make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		assert.NoError(t, j.write(gen, 0, blockSize, size, func() error {
			close(inWrite)
			<-release
			return nil
		}))
	}()
	<-inWrite
	began := make(chan uint64)
	go func() { began <- j.begin(2, "b") }()
	select {
	case <-began:
		t.Fatal("begin returned while a write of the old round was in flight")
	default:
	}
	close(release)
	wg.Wait()
	g2 := <-began
	assert.NotEqual(t, gen, g2)
	assert.False(t, j.rec.isSet(0))
}
