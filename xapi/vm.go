package xapi

import "context"

// VMGetAll returns VM.get_all (templates, snapshots and dom0 included).
func (c *Client) VMGetAll(ctx context.Context) ([]VMRef, error) {
	return call[[]VMRef](ctx, c, "VM.get_all")
}

// VMGetAllRecords returns VM.get_all_records.
func (c *Client) VMGetAllRecords(ctx context.Context) (map[VMRef]VMRecord, error) {
	return call[map[VMRef]VMRecord](ctx, c, "VM.get_all_records")
}

// VMGetRecord returns VM.get_record.
func (c *Client) VMGetRecord(ctx context.Context, vm VMRef) (VMRecord, error) {
	return call[VMRecord](ctx, c, "VM.get_record", vm)
}

// VMGetByUUID returns VM.get_by_uuid.
func (c *Client) VMGetByUUID(ctx context.Context, uuid string) (VMRef, error) {
	return call[VMRef](ctx, c, "VM.get_by_uuid", uuid)
}

// VMGetByNameLabel returns VM.get_by_name_label.
func (c *Client) VMGetByNameLabel(ctx context.Context, label string) ([]VMRef, error) {
	return call[[]VMRef](ctx, c, "VM.get_by_name_label", label)
}

// VMGetPowerState returns VM.get_power_state.
func (c *Client) VMGetPowerState(ctx context.Context, vm VMRef) (VMPowerState, error) {
	return call[VMPowerState](ctx, c, "VM.get_power_state", vm)
}

// VMSnapshot calls VM.snapshot(vm, new_name) and returns the snapshot VM.
func (c *Client) VMSnapshot(ctx context.Context, vm VMRef, newName string) (VMRef, error) {
	return call[VMRef](ctx, c, "VM.snapshot", vm, newName)
}

// AsyncVMSnapshot is Async.VM.snapshot; the task result is the snapshot VMRef.
func (c *Client) AsyncVMSnapshot(ctx context.Context, vm VMRef, newName string) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VM.snapshot", vm, newName)
}

// VMPause calls VM.pause (Running -> Paused).
func (c *Client) VMPause(ctx context.Context, vm VMRef) error {
	return callVoid(ctx, c, "VM.pause", vm)
}

// VMUnpause calls VM.unpause (Paused -> Running).
func (c *Client) VMUnpause(ctx context.Context, vm VMRef) error {
	return callVoid(ctx, c, "VM.unpause", vm)
}

// VMSuspend calls VM.suspend (Running -> Suspended).
func (c *Client) VMSuspend(ctx context.Context, vm VMRef) error {
	return callVoid(ctx, c, "VM.suspend", vm)
}

// AsyncVMSuspend is Async.VM.suspend.
func (c *Client) AsyncVMSuspend(ctx context.Context, vm VMRef) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VM.suspend", vm)
}

// VMResume calls VM.resume(vm, start_paused, force).
func (c *Client) VMResume(ctx context.Context, vm VMRef, startPaused, force bool) error {
	return callVoid(ctx, c, "VM.resume", vm, startPaused, force)
}

// AsyncVMResume is Async.VM.resume.
func (c *Client) AsyncVMResume(ctx context.Context, vm VMRef, startPaused, force bool) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VM.resume", vm, startPaused, force)
}

// VMAssertCanMigrate calls VM.assert_can_migrate(vm, dest, live, vdi_map,
// vif_map, options); vgpu_map is omitted (xapi defaults it to {}).
func (c *Client) VMAssertCanMigrate(ctx context.Context, vm VMRef, dest map[string]string, live bool,
	vdiMap map[VDIRef]SRRef, vifMap map[VIFRef]NetworkRef, options map[string]string) error {
	return callVoid(ctx, c, "VM.assert_can_migrate", vm, nonNil(dest), live, nonNil(vdiMap), nonNil(vifMap), nonNil(options))
}

// VMMigrateSend calls VM.migrate_send(vm, dest, live, vdi_map, vif_map,
// options) in xapi's positional order (vgpu_map omitted) and returns the VM
// ref in the destination pool. dest is the map host.migrate_receive returned.
func (c *Client) VMMigrateSend(ctx context.Context, vm VMRef, dest map[string]string, live bool,
	vdiMap map[VDIRef]SRRef, vifMap map[VIFRef]NetworkRef, options map[string]string) (VMRef, error) {
	return call[VMRef](ctx, c, "VM.migrate_send", vm, nonNil(dest), live, nonNil(vdiMap), nonNil(vifMap), nonNil(options))
}

// AsyncVMMigrateSend is Async.VM.migrate_send; the task result is a VMRef.
func (c *Client) AsyncVMMigrateSend(ctx context.Context, vm VMRef, dest map[string]string, live bool,
	vdiMap map[VDIRef]SRRef, vifMap map[VIFRef]NetworkRef, options map[string]string) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VM.migrate_send", vm, nonNil(dest), live, nonNil(vdiMap), nonNil(vifMap), nonNil(options))
}

// VMPoolMigrate calls VM.pool_migrate(vm, host, options) (intra-pool).
func (c *Client) VMPoolMigrate(ctx context.Context, vm VMRef, host HostRef, options map[string]string) error {
	return callVoid(ctx, c, "VM.pool_migrate", vm, host, nonNil(options))
}

// AsyncVMPoolMigrate is Async.VM.pool_migrate.
func (c *Client) AsyncVMPoolMigrate(ctx context.Context, vm VMRef, host HostRef, options map[string]string) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VM.pool_migrate", vm, host, nonNil(options))
}

// VMAddToOtherConfig calls VM.add_to_other_config (MAP_DUPLICATE_KEY if the
// key exists).
func (c *Client) VMAddToOtherConfig(ctx context.Context, vm VMRef, key, value string) error {
	return callVoid(ctx, c, "VM.add_to_other_config", vm, key, value)
}

// VMRemoveFromOtherConfig calls VM.remove_from_other_config.
func (c *Client) VMRemoveFromOtherConfig(ctx context.Context, vm VMRef, key string) error {
	return callVoid(ctx, c, "VM.remove_from_other_config", vm, key)
}

// nonNil turns a nil map into an empty one so that it encodes as <struct>.
func nonNil[K ~string, V any](m map[K]V) map[K]V {
	if m == nil {
		return map[K]V{}
	}
	return m
}
