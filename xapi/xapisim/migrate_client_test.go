package xapisim

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
)

// TestMigrateWithGoClient drives a migration as the engine does, with the
// project's Go client: migrate_receive, Async migrate_send, WaitTask; and a
// cancel through the context.
func TestMigrateWithGoClient(t *testing.T) {
	s := startMigSim(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	client := func(i int) *xapi.Client {
		pi := s.Info().Pools[i]
		c, err := xapi.New(xapi.Config{URL: pi.URL, Username: pi.Username, Password: pi.Password, Logger: testutil.Logger(t),
			PollInterval: 20 * time.Millisecond})
		require.NoError(t, err)
		require.NoError(t, c.Login(ctx))
		t.Cleanup(func() { _ = c.Close(context.Background()) })
		return c
	}
	src, dst := client(0), client(1)
	vms, err := src.VMGetByNameLabel(ctx, DemoVMName)
	require.NoError(t, err)
	require.Len(t, vms, 1)
	vm := vms[0]
	rec, err := src.VMGetRecord(ctx, vm)
	require.NoError(t, err)
	require.NoError(t, s.StartGuest(rec.UUID, GuestConfig{Rate: 1 << 20, DirtyRate: 1 << 20}))
	hosts, err := dst.HostGetAll(ctx)
	require.NoError(t, err)
	nets, err := dst.NetworkGetByNameLabel(ctx, WANNetwork)
	require.NoError(t, err)
	srs, err := dst.SRGetAll(ctx)
	require.NoError(t, err)
	vbd, err := src.VBDGetRecord(ctx, rec.VBDs[0])
	require.NoError(t, err)
	vdiMap := map[xapi.VDIRef]xapi.SRRef{vbd.VDI: srs[0]}
	vifMap := map[xapi.VIFRef]xapi.NetworkRef{rec.VIFs[0]: nets[0]}

	// Cancelled through the context while a slow pre-migrate hook runs.
	writeHook(t, s, string(rec.ResidentOn), HookVMPreMigrate, "sleep 0.5")
	dest, err := dst.HostMigrateReceive(ctx, hosts[0], nets[0], nil)
	require.NoError(t, err)
	task, err := src.AsyncVMMigrateSend(ctx, vm, dest, true, vdiMap, vifMap, map[string]string{"force": "true"})
	require.NoError(t, err)
	cctx, ccancel := context.WithTimeout(ctx, 200*time.Millisecond)
	_, err = src.WaitTask(cctx, task)
	ccancel()
	require.Error(t, err)
	require.Eventually(t, func() bool {
		tr, err := src.TaskGetRecord(ctx, task)
		return err == nil && tr.Status == "cancelled"
	}, 10*time.Second, 20*time.Millisecond)
	ps, err := src.VMGetPowerState(ctx, vm)
	require.NoError(t, err)
	assert.Equal(t, xapi.VMPowerState(Running), ps)

	// Then for real, with a live vCPU count that differs from
	// VCPUs_at_startup (it must travel in the metadata).
	require.NoError(t, s.Pools()[0].SetLiveVCPUs(rec.UUID, 1))
	require.NoError(t, src.VMAssertCanMigrate(ctx, vm, dest, true, vdiMap, vifMap, nil))
	task, err = src.AsyncVMMigrateSend(ctx, vm, dest, true, vdiMap, vifMap, nil)
	require.NoError(t, err)
	res, err := src.WaitTask(ctx, task)
	require.NoError(t, err)
	v, err := res.Value()
	require.NoError(t, err)
	destVM := xapi.VMRef(v.(string))
	drec, err := dst.VMGetRecord(ctx, destVM)
	require.NoError(t, err)
	assert.Equal(t, rec.UUID, drec.UUID)
	assert.Equal(t, hosts[0], drec.ResidentOn)
	assert.NotEmpty(t, drec.OtherConfig["sim:migration_pause_ms"])
	// The guest metrics move with the VM (xapi exports them in the metadata).
	require.False(t, drec.GuestMetrics.IsNull())
	assert.NotEqual(t, rec.GuestMetrics, drec.GuestMetrics)
	dnets, err := dst.VMGuestMetricsGetNetworks(ctx, drec.GuestMetrics)
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"0/ip": DefaultDemoIPv4, "0/ipv4/0": DefaultDemoIPv4, "0/ipv6/0": DefaultDemoIPv6}, dnets)
	_, err = src.VMGuestMetricsGetNetworks(ctx, rec.GuestMetrics)
	require.Error(t, err, "the source's guest metrics went with the source VM")
	// So do the VM metrics, with the domain's vCPU count.
	require.False(t, drec.Metrics.IsNull())
	assert.NotEqual(t, rec.Metrics, drec.Metrics)
	dvcpus, err := dst.VMMetricsGetVCPUsNumber(ctx, drec.Metrics)
	require.NoError(t, err)
	assert.Equal(t, int64(1), dvcpus)
	assert.Equal(t, int64(2), drec.VCPUsAtStartup)
	_, err = src.VMMetricsGetRecord(ctx, rec.Metrics)
	require.Error(t, err, "the source's metrics went with the source VM")
	_, err = src.VMGetRecord(ctx, vm)
	var apiErr *xapi.APIError
	require.True(t, errors.As(err, &apiErr), "%v", err)
	assert.Equal(t, ErrHandleInvalid, apiErr.Code)
	gv, err := s.VerifyGuest(rec.UUID)
	require.NoError(t, err)
	assert.True(t, gv.OK)
}
