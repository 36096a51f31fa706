package xapi

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestGoldenVMMetricsRecord(t *testing.T) {
	c := goldenServer(t)
	ctx := context.Background()
	got, err := c.VMMetricsGetRecord(ctx, "OpaqueRef:vmm-1")
	require.NoError(t, err)
	assert.Equal(t, VMMetricsRecord{
		UUID:              "9a3c1e7f-2b4d-4e6a-8c1f-0d2e3f4a5b6c",
		MemoryActual:      4294963200,
		VCPUsNumber:       2,
		State:             []string{},
		StartTime:         date("2025-03-19T04:16:24Z"),
		InstallTime:       date("2025-01-01T10:00:00Z"),
		LastUpdated:       epoch,
		OtherConfig:       map[string]string{},
		HVM:               true,
		CurrentDomainType: "hvm",
	}, got)

	n, err := c.VMMetricsGetVCPUsNumber(ctx, "OpaqueRef:vmm-1")
	require.NoError(t, err)
	assert.Equal(t, int64(2), n)
}

func TestVMMetricsRefNull(t *testing.T) {
	assert.True(t, VMMetricsRef(NullRef).IsNull())
	assert.True(t, VMMetricsRef("").IsNull())
	assert.False(t, VMMetricsRef("OpaqueRef:vmm-1").IsNull())
}
