package xapisim

import (
	"crypto/sha256"
	"encoding/hex"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func fileSHA256(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func TestGuestShadowSHA256(t *testing.T) {
	s := startMigSim(t)
	e := newMigEnv(t, s)
	_, f := call(t, e.srcURL, "sim.guest_shadow_sha256", e.srcSess, e.vm)
	require.NotNil(t, f, "no guest yet")

	ok(t, e.srcURL, "sim.guest_start", e.srcSess, e.vm, map[string]any{"rate": "4MiB/s", "pattern": "random"})
	require.Eventually(t, func() bool {
		st, err := s.GuestStats(e.vmUUID)
		return err == nil && st.Writes > 3
	}, 10*time.Second, 20*time.Millisecond)
	// Paused, the guest no longer writes: the shadow equals the disk.
	ok(t, e.srcURL, "VM.pause", e.srcSess, e.vm)
	sums := ok(t, e.srcURL, "sim.guest_shadow_sha256", e.srcSess, e.vm).(map[string]any)
	require.Len(t, sums, 1)
	path, err := s.VDIPath(e.vdiUUID)
	require.NoError(t, err)
	assert.Equal(t, fileSHA256(t, path), sums["0"])

	// A write behind the guest's back changes the disk, not the shadow.
	require.NoError(t, s.WriteVDI(e.vdiUUID, 4096, []byte("not the guest")))
	again, err := s.GuestShadowSHA256(e.vmUUID)
	require.NoError(t, err)
	assert.Equal(t, sums["0"], again["0"])
	assert.NotEqual(t, fileSHA256(t, path), again["0"])
	require.NoError(t, s.StopGuest(e.vmUUID))
	_, err = s.GuestShadowSHA256(e.vmUUID)
	require.ErrorIs(t, err, ErrNoGuest)
}
