package xapi

import "context"

// HostGetAll returns host.get_all.
func (c *Client) HostGetAll(ctx context.Context) ([]HostRef, error) {
	return call[[]HostRef](ctx, c, "host.get_all")
}

// HostGetAllRecords returns host.get_all_records.
func (c *Client) HostGetAllRecords(ctx context.Context) (map[HostRef]HostRecord, error) {
	return call[map[HostRef]HostRecord](ctx, c, "host.get_all_records")
}

// HostGetRecord returns host.get_record.
func (c *Client) HostGetRecord(ctx context.Context, host HostRef) (HostRecord, error) {
	return call[HostRecord](ctx, c, "host.get_record", host)
}

// HostGetByUUID returns host.get_by_uuid.
func (c *Client) HostGetByUUID(ctx context.Context, uuid string) (HostRef, error) {
	return call[HostRef](ctx, c, "host.get_by_uuid", uuid)
}

// HostGetByNameLabel returns host.get_by_name_label.
func (c *Client) HostGetByNameLabel(ctx context.Context, label string) ([]HostRef, error) {
	return call[[]HostRef](ctx, c, "host.get_by_name_label", label)
}

// HostGetAPIVersionMajor returns host.get_API_version_major.
func (c *Client) HostGetAPIVersionMajor(ctx context.Context, host HostRef) (int64, error) {
	return call[int64](ctx, c, "host.get_API_version_major", host)
}

// HostGetAPIVersionMinor returns host.get_API_version_minor.
func (c *Client) HostGetAPIVersionMinor(ctx context.Context, host HostRef) (int64, error) {
	return call[int64](ctx, c, "host.get_API_version_minor", host)
}

// HostMigrateReceive calls host.migrate_receive(host, network, options) on the
// destination pool and returns the dest map (keys SM, host, xenops,
// session_id, master) to hand to VM.migrate_send on the source pool.
func (c *Client) HostMigrateReceive(ctx context.Context, host HostRef, network NetworkRef, options map[string]string) (map[string]string, error) {
	return call[map[string]string](ctx, c, "host.migrate_receive", host, network, nonNil(options))
}

// HostCallPlugin calls host.call_plugin(host, plugin, fn, args) and returns
// the plugin's string result. xapi applies no timeout; use AsyncHostCallPlugin
// and WaitTask for long calls.
func (c *Client) HostCallPlugin(ctx context.Context, host HostRef, plugin, fn string, args map[string]string) (string, error) {
	return call[string](ctx, c, "host.call_plugin", host, plugin, fn, nonNil(args))
}

// AsyncHostCallPlugin is Async.host.call_plugin; the task result is a string.
func (c *Client) AsyncHostCallPlugin(ctx context.Context, host HostRef, plugin, fn string, args map[string]string) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.host.call_plugin", host, plugin, fn, nonNil(args))
}
