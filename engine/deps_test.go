package engine

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmihailenco/msgpack/v5"
)

// VIF.IPv4/IPv6 are additive: a checkpoint written before they existed
// loads with both empty, a VIF without addresses encodes exactly as
// before (no keys), and addresses survive a round trip.
func TestVIFAddressesInCheckpoints(t *testing.T) {
	legacyVIF := map[string]any{"ref": "OpaqueRef:vif0", "device": "0", "mac": "aa:bb:cc:dd:ee:00", "network_ref": "OpaqueRef:net"}
	old, err := msgpack.Marshal(map[string]any{"version": CheckpointVersion, "migration_id": "mig-old",
		"phase": uint8(PhaseSeed), "vifs": []any{legacyVIF}})
	require.NoError(t, err)
	cp, err := DecodeCheckpoint(old)
	require.NoError(t, err)
	require.Len(t, cp.VIFs, 1)
	assert.Equal(t, VIF{Ref: "OpaqueRef:vif0", Device: "0", MAC: "aa:bb:cc:dd:ee:00", NetworkRef: "OpaqueRef:net"}, cp.VIFs[0])

	tests := []struct {
		name string
		vif  VIF
		keys []string
	}{
		{name: "no addresses", vif: cp.VIFs[0], keys: []string{"device", "mac", "network_ref", "ref"}},
		{name: "both families", vif: VIF{Ref: "r", Device: "0", MAC: "m", NetworkRef: "n",
			IPv4: []string{"10.0.0.5"}, IPv6: []string{"2001:db8::5", "fe80::1"}},
			keys: []string{"device", "ipv4", "ipv6", "mac", "network_ref", "ref"}},
		{name: "ipv6 only", vif: VIF{Ref: "r", IPv6: []string{"2001:db8::5"}},
			keys: []string{"device", "ipv6", "mac", "network_ref", "ref"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := EncodeCheckpoint(&Checkpoint{Version: CheckpointVersion, MigrationID: "m", Phase: PhasePrepare, VIFs: []VIF{tt.vif}})
			require.NoError(t, err)
			var raw struct {
				VIFs []map[string]any `msgpack:"vifs"`
			}
			require.NoError(t, msgpack.Unmarshal(b, &raw))
			require.Len(t, raw.VIFs, 1)
			var keys []string
			for k := range raw.VIFs[0] {
				keys = append(keys, k)
			}
			assert.ElementsMatch(t, tt.keys, keys)
			back, err := DecodeCheckpoint(b)
			require.NoError(t, err)
			assert.Equal(t, []VIF{tt.vif}, back.VIFs)
		})
	}
}
