package xapiadapt

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

type env struct {
	sim      *xapisim.Sim
	src, dst *xapi.Client
	sp, dp   *Pool
}

func newEnv(t *testing.T) env {
	t.Helper()
	ctx := context.Background()
	s, err := xapisim.New(xapisim.Config{StateDir: t.TempDir(), Pools: 2, DiskSize: 16 << 20, FillSize: 4 << 20,
		MemorySize: 8 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(ctx, "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	info := s.Info()
	login := func(i int) *xapi.Client {
		c, err := xapi.New(xapi.Config{URL: info.Pools[i].URL, Username: info.Pools[i].Username,
			Password: info.Pools[i].Password, PollInterval: 20 * time.Millisecond})
		require.NoError(t, err)
		require.NoError(t, c.Login(ctx))
		t.Cleanup(func() { _ = c.Close(context.Background()) })
		return c
	}
	e := env{sim: s, src: login(0), dst: login(1)}
	e.sp, e.dp = NewPool(e.src, testutil.Logger(t)), NewPool(e.dst, testutil.Logger(t))
	return e
}

func (e env) demoVM(t *testing.T) engine.VMRecord {
	t.Helper()
	vm, err := e.sp.FindVM(context.Background(), xapisim.DemoVMName)
	require.NoError(t, err)
	return vm
}

func TestVMRecords(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	vm := e.demoVM(t)
	assert.Equal(t, "Running", vm.PowerState)
	assert.Equal(t, int64(8<<20), vm.MemoryBytes)
	assert.NotEmpty(t, vm.ResidentOn)

	byUUID, err := e.sp.VMByUUID(ctx, vm.UUID)
	require.NoError(t, err)
	assert.Equal(t, vm.Ref, byUUID.Ref)
	byUUID2, err := e.sp.FindVM(ctx, vm.UUID)
	require.NoError(t, err)
	assert.Equal(t, vm.Ref, byUUID2.Ref)

	_, err = e.dp.VMByUUID(ctx, vm.UUID)
	require.ErrorIs(t, err, engine.ErrNotFound, "the VM is not in the destination pool")
	_, err = e.sp.FindVM(ctx, "no-such-vm")
	require.ErrorIs(t, err, engine.ErrNotFound)

	disks, err := e.sp.VMDisks(ctx, vm.Ref)
	require.NoError(t, err)
	require.Len(t, disks, 1)
	d := disks[0]
	assert.Equal(t, int64(16<<20), d.VirtualSize)
	assert.Positive(t, d.PhysicalUtilisation)
	assert.LessOrEqual(t, d.PhysicalUtilisation, d.VirtualSize)
	assert.NotEmpty(t, d.VDIUUID)
	assert.NotEmpty(t, d.SRRef)
	assert.Equal(t, "0", d.Device)
	assert.False(t, d.CBTEnabled)

	vifs, err := e.sp.VMVIFs(ctx, vm.Ref)
	require.NoError(t, err)
	require.Len(t, vifs, 1)
	wan, err := e.sp.FindNetwork(ctx, xapisim.WANNetwork)
	require.NoError(t, err)
	assert.Equal(t, wan, vifs[0].NetworkRef)
	assert.NotEmpty(t, vifs[0].MAC)
}

func TestPoolOtherConfigRemoveThenAdd(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	require.NoError(t, e.sp.SetPoolOtherConfig(ctx, map[string]string{engine.KeyStorage: "nbd", "x:keep": "1"}))
	// A plain add of an existing key fails; the adapter's write does not.
	ref, err := e.sp.PoolRef(ctx)
	require.NoError(t, err)
	err = e.src.PoolAddToOtherConfig(ctx, ref, engine.KeyStorage, "drbd")
	require.True(t, xapi.IsCode(err, xapi.CodeMapDuplicateKey), "got %v", err)
	require.NoError(t, e.sp.SetPoolOtherConfig(ctx, map[string]string{engine.KeyStorage: "drbd", engine.KeyNetwork: ""}))
	oc, err := e.sp.PoolOtherConfig(ctx)
	require.NoError(t, err)
	assert.Equal(t, "drbd", oc[engine.KeyStorage])
	assert.Equal(t, "1", oc["x:keep"])
	_, has := oc[engine.KeyNetwork]
	assert.False(t, has, "an empty value removes the key")

	dst, err := e.dp.PoolOtherConfig(ctx)
	require.NoError(t, err)
	assert.NotContains(t, dst, engine.KeyStorage, "pools are separate")
}

func TestCBTSnapshotsAndFind(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	vm := e.demoVM(t)
	disks, err := e.sp.VMDisks(ctx, vm.Ref)
	require.NoError(t, err)
	d := disks[0]

	require.NoError(t, e.sp.EnableCBT(ctx, d.VDIRef))
	require.NoError(t, e.sp.EnableCBT(ctx, d.VDIRef), "idempotent")
	disks, err = e.sp.VMDisks(ctx, vm.Ref)
	require.NoError(t, err)
	assert.True(t, disks[0].CBTEnabled)

	tags := func(round string) map[string]string {
		return map[string]string{"wanmotion:migration_id": "wm-test", "wanmotion:source_vdi": d.VDIUUID, "wanmotion:round": round}
	}
	s0, err := e.sp.SnapshotVDI(ctx, d.VDIRef, tags("0"))
	require.NoError(t, err)
	// Two 64 KiB blocks written by the guest: blocks 3 and 100.
	require.NoError(t, e.sim.WriteVDI(d.VDIUUID, 3*65536, bytes.Repeat([]byte{0xAB}, 100)))
	require.NoError(t, e.sim.WriteVDI(d.VDIUUID, 100*65536+10, []byte("hello")))
	s1, err := e.sp.SnapshotVDI(ctx, d.VDIRef, tags("1"))
	require.NoError(t, err)

	bm64, err := e.sp.ListChangedBlocks(ctx, s0, s1)
	require.NoError(t, err)
	bm, err := engine.DecodeCBTBitmap(bm64)
	require.NoError(t, err)
	cb, err := xapi.DecodeChangedBlocks(bm64)
	require.NoError(t, err)
	assert.Equal(t, []int64{3, 100}, cb.Blocks())
	assert.Equal(t, int64(2*65536), engine.ChangedBytes(bm, d.VirtualSize))

	c0, err := e.sp.VDIContentID(ctx, s0)
	require.NoError(t, err)
	c1, err := e.sp.VDIContentID(ctx, s1)
	require.NoError(t, err)
	assert.NotEmpty(t, c0)
	assert.NotEqual(t, c0, c1, "writes between the snapshots change the content id")
	require.NoError(t, e.sp.SetVDIContentID(ctx, s1, "content-x"))
	require.NoError(t, e.sp.SetVDIContentID(ctx, s1, "content-y"), "remove-then-add")
	c1, err = e.sp.VDIContentID(ctx, s1)
	require.NoError(t, err)
	assert.Equal(t, "content-y", c1)

	found, err := e.sp.FindVDIs(ctx, map[string]string{"wanmotion:migration_id": "wm-test"})
	require.NoError(t, err)
	assert.Len(t, found, 2)
	assert.Contains(t, found, s0)
	assert.Contains(t, found, s1)
	found, err = e.sp.FindVDIs(ctx, tags("1"))
	require.NoError(t, err)
	assert.Equal(t, []string{s1}, keys(found))
	found, err = e.sp.FindVDIs(ctx, map[string]string{"wanmotion:migration_id": "wm-other"})
	require.NoError(t, err)
	assert.Empty(t, found)

	require.NoError(t, e.sp.DataDestroyVDI(ctx, s0))
	require.NoError(t, e.sp.DestroyVDI(ctx, s0))
	err = e.sp.DestroyVDI(ctx, s0)
	require.ErrorIs(t, err, engine.ErrNotFound, "a destroyed VDI maps onto ErrNotFound")
	_, err = e.sp.VDIContentID(ctx, "OpaqueRef:no-such-vdi")
	require.ErrorIs(t, err, engine.ErrNotFound)

	require.NoError(t, e.sp.DisableCBT(ctx, d.VDIRef))
	require.NoError(t, e.sp.DestroyVDI(ctx, s1))
}

func keys(m map[string]string) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}

func TestDestPool(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	master, err := e.dp.PoolMaster(ctx)
	require.NoError(t, err)
	hostRec, err := e.dst.HostGetRecord(ctx, xapi.HostRef(master))
	require.NoError(t, err)
	assert.Equal(t, "site-b-host1", hostRec.NameLabel)

	sr, err := e.dp.DefaultSR(ctx)
	require.NoError(t, err)
	named, err := e.dp.FindSR(ctx, "site-b storage")
	require.NoError(t, err)
	assert.Equal(t, named, sr)

	mgmt, err := e.dp.ManagementNetwork(ctx, master)
	require.NoError(t, err)
	want, err := e.dp.FindNetwork(ctx, xapisim.ManagementNetwork)
	require.NoError(t, err)
	assert.Equal(t, want, mgmt)
	_, err = e.dp.ManagementNetwork(ctx, "OpaqueRef:nope")
	require.ErrorIs(t, err, engine.ErrNotFound)

	ref, uuid, err := e.dp.CreateVDI(ctx, engine.VDISpec{SRRef: sr, NameLabel: "replica", Description: "d",
		VirtualSize: 4 << 20, OtherConfig: map[string]string{"wanmotion:migration_id": "wm-1", "wanmotion:source_vdi": "u"}})
	require.NoError(t, err)
	rec, err := e.dst.VDIGetRecord(ctx, xapi.VDIRef(ref))
	require.NoError(t, err)
	assert.Equal(t, uuid, rec.UUID)
	assert.Equal(t, "replica", rec.NameLabel)
	assert.Equal(t, int64(4<<20), rec.VirtualSize)
	assert.Equal(t, xapi.VDITypeUser, rec.Type)
	assert.Equal(t, sr, string(rec.SR))
	assert.Equal(t, "wm-1", rec.OtherConfig["wanmotion:migration_id"])
	found, err := e.dp.FindVDIs(ctx, map[string]string{"wanmotion:migration_id": "wm-1", "wanmotion:source_vdi": "u"})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{ref: uuid}, found)
	require.NoError(t, e.dp.SetVDIContentID(ctx, ref, "cid"))
	require.NoError(t, e.dp.DestroyVDI(ctx, ref))

	// Without pool.default_SR the adapter picks the shared SR with space.
	pool, err := e.dp.PoolRef(ctx)
	require.NoError(t, err)
	_, err = e.dst.Call(ctx, "pool.set_default_SR", string(pool), xapi.NullRef)
	require.NoError(t, err)
	sr2, err := e.dp.DefaultSR(ctx)
	require.NoError(t, err)
	assert.Equal(t, sr, sr2)
}

func TestTasks(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	tk := NewTasks(e.src)
	vm := e.demoVM(t)
	desc := "wanmotion WAN migration wm-abc"
	task, err := tk.CreateTask(ctx, engine.TaskLabel, desc)
	require.NoError(t, err)
	applies := vm.Ref + "," + vm.ResidentOn
	require.NoError(t, tk.AddTaskOtherConfig(ctx, task, "applies_to", applies))
	require.NoError(t, tk.AddTaskOtherConfig(ctx, task, "applies_to", applies), "no MAP_DUPLICATE_KEY on a rewrite")
	require.NoError(t, tk.SetTaskProgress(ctx, task, 0.25))

	raw, err := e.src.TaskGetRecord(ctx, xapi.TaskRef(task))
	require.NoError(t, err)
	assert.Equal(t, "VM.migrate_send", raw.NameLabel)
	assert.Equal(t, applies, raw.OtherConfig["applies_to"])

	rec, err := tk.TaskRecord(ctx, task)
	require.NoError(t, err)
	assert.Equal(t, engine.TaskPending, rec.Status)
	assert.InDelta(t, 0.25, rec.Progress, 1e-9)
	assert.Empty(t, rec.CurrentOperations)

	pending, err := tk.FindPendingTasks(ctx, desc)
	require.NoError(t, err)
	assert.Equal(t, []string{task}, pending)
	other, err := tk.FindPendingTasks(ctx, "something else")
	require.NoError(t, err)
	assert.Empty(t, other)

	// XenCenter's cancel: task.cancel only marks current_operations.
	require.NoError(t, tk.Cancel(ctx, task))
	rec, err = tk.TaskRecord(ctx, task)
	require.NoError(t, err)
	assert.Equal(t, engine.TaskPending, rec.Status)
	assert.Contains(t, valuesOf(rec.CurrentOperations), "cancel")

	require.NoError(t, tk.SetTaskErrorInfo(ctx, task, []string{"WANMOTION_MIGRATION_CANCELLED", "seed", "x"}))
	require.NoError(t, tk.SetTaskStatus(ctx, task, engine.TaskCancelled))
	rec, err = tk.TaskRecord(ctx, task)
	require.NoError(t, err)
	assert.Equal(t, engine.TaskCancelled, rec.Status)
	assert.Equal(t, []string{"WANMOTION_MIGRATION_CANCELLED", "seed", "x"}, rec.ErrorInfo)
	pending, err = tk.FindPendingTasks(ctx, desc)
	require.NoError(t, err)
	assert.Empty(t, pending, "a finished task is not pending")

	// Result round trip: stored as an XML-RPC value string, read back decoded.
	t2, err := tk.CreateTask(ctx, engine.TaskLabel, "r")
	require.NoError(t, err)
	require.NoError(t, tk.SetTaskResult(ctx, t2, "OpaqueRef:dest-vm"))
	require.NoError(t, tk.SetTaskStatus(ctx, t2, engine.TaskSuccess))
	raw, err = e.src.TaskGetRecord(ctx, xapi.TaskRef(t2))
	require.NoError(t, err)
	assert.Equal(t, "<value>OpaqueRef:dest-vm</value>", raw.Result)
	rec, err = tk.TaskRecord(ctx, t2)
	require.NoError(t, err)
	assert.Equal(t, "OpaqueRef:dest-vm", rec.Result)

	require.NoError(t, e.src.TaskDestroy(ctx, xapi.TaskRef(t2)))
	_, err = tk.TaskRecord(ctx, t2)
	require.ErrorIs(t, err, engine.ErrNotFound)
}

func valuesOf(m map[string]string) []string {
	out := []string{}
	for _, v := range m {
		out = append(out, v)
	}
	return out
}

// TestMigrate drives the Handoff calls the engine makes against the
// simulator's host.migrate_receive / VM.migrate_send, with a guest writing,
// then the simulator-only pause meter and integrity check.
func TestMigrate(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	e := newEnv(t)
	vm := e.demoVM(t)
	disks, err := e.sp.VMDisks(ctx, vm.Ref)
	require.NoError(t, err)
	vifs, err := e.sp.VMVIFs(ctx, vm.Ref)
	require.NoError(t, err)

	// Integrity before any guest wrote: nothing to compare → an error (skipped).
	_, err = SimIntegrity{Dest: e.dst}.Check(ctx, engine.IntegrityRequest{VMUUID: vm.UUID})
	require.Error(t, err)
	assert.Equal(t, 1, strings.Count(err.Error(), "sim.guest_verify"), "the method is named once: %v", err)
	require.NoError(t, e.sim.StartGuest(vm.UUID, xapisim.GuestConfig{Rate: 2 << 20, DirtyRate: 1 << 20}))
	t.Cleanup(func() { _ = e.sim.StopGuest(vm.UUID) })

	host, err := e.dp.PoolMaster(ctx)
	require.NoError(t, err)
	mgmt, err := e.dp.ManagementNetwork(ctx, host)
	require.NoError(t, err)
	dest, err := e.dp.MigrateReceive(ctx, host, mgmt, nil)
	if xapi.IsCode(err, xapi.CodeMessageMethodUnknown) {
		t.Skip("the simulator has no host.migrate_receive")
	}
	require.NoError(t, err)
	for _, k := range []string{"SM", "host", "xenops", "session_id", "master"} {
		assert.Contains(t, dest, k)
	}
	sr, err := e.dp.DefaultSR(ctx)
	require.NoError(t, err)
	wan, err := e.dp.FindNetwork(ctx, xapisim.WANNetwork)
	require.NoError(t, err)
	args := engine.MigrateArgs{VM: vm.Ref, Dest: dest, Live: true,
		VDIMap: map[string]string{disks[0].VDIRef: sr}, VIFMap: map[string]string{vifs[0].Ref: wan}}

	// CBT on a moving disk: VDI_CBT_ENABLED maps onto ErrCBTEnabled.
	require.NoError(t, e.sp.EnableCBT(ctx, disks[0].VDIRef))
	err = e.sp.AssertCanMigrate(ctx, args)
	require.ErrorIs(t, err, engine.ErrCBTEnabled)
	require.NoError(t, e.sp.DisableCBT(ctx, disks[0].VDIRef))
	require.NoError(t, e.sp.AssertCanMigrate(ctx, args))

	tk := NewTasks(e.src)
	task, err := e.sp.MigrateSend(ctx, args)
	require.NoError(t, err)
	var rec engine.TaskRecord
	for {
		rec, err = tk.TaskRecord(ctx, task)
		require.NoError(t, err)
		if rec.Status != engine.TaskPending {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatal("migrate_send did not finish")
		case <-time.After(20 * time.Millisecond):
		}
	}
	require.Equal(t, engine.TaskSuccess, rec.Status, "error_info %v", rec.ErrorInfo)
	dv, err := e.dp.VMByUUID(ctx, vm.UUID)
	require.NoError(t, err)
	assert.Equal(t, dv.Ref, rec.Result, "the task result decodes to the destination VM ref")
	assert.Equal(t, "Running", dv.PowerState)
	_, err = e.sp.VMByUUID(ctx, vm.UUID)
	require.ErrorIs(t, err, engine.ErrNotFound, "the VM left the source pool")

	d, measured, err := SimPauseMeter{Dest: e.dst}.GuestPause(ctx, "wm-x", vm.UUID)
	require.NoError(t, err)
	assert.True(t, measured)
	last, ok := e.sim.LastMigration(vm.UUID)
	require.True(t, ok)
	assert.Equal(t, time.Duration(last.PauseMS)*time.Millisecond, d)

	good, err := SimIntegrity{Dest: e.dst}.Check(ctx, engine.IntegrityRequest{VMUUID: vm.UUID, DestVM: dv.Ref})
	require.NoError(t, err)
	assert.True(t, good, "the destination disk holds everything the guest wrote")

	// Corrupt the destination disk behind the guest's back: mismatch.
	// (The guest keeps running: its shadow is what verify compares with.)
	dd, err := e.dp.VMDisks(ctx, dv.Ref)
	require.NoError(t, err)
	path, err := e.sim.VDIPath(dd[0].VDIUUID)
	require.NoError(t, err)
	corrupt(t, path)
	good, err = SimIntegrity{Dest: e.dst}.Check(ctx, engine.IntegrityRequest{VMUUID: vm.UUID, DestVM: dv.Ref})
	require.NoError(t, err)
	assert.False(t, good)
}

func TestSimMetersOnMissingData(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	vm := e.demoVM(t)
	// No migration yet: not measured, no error.
	_, measured, err := SimPauseMeter{Dest: e.src}.GuestPause(ctx, "wm-x", vm.UUID)
	require.NoError(t, err)
	assert.False(t, measured)
	_, _, err = SimPauseMeter{Dest: e.dst}.GuestPause(ctx, "wm-x", vm.UUID)
	require.ErrorIs(t, err, engine.ErrNotFound, "no such VM in the destination")
	require.False(t, errors.Is(err, ErrNotSimulator))
}
