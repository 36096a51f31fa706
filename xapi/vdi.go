package xapi

import "context"

// VDICreateSpec is the record VDI.create takes as one <struct>.
type VDICreateSpec struct {
	NameLabel       string            `xapi:"name_label"`
	NameDescription string            `xapi:"name_description"`
	SR              SRRef             `xapi:"SR"`
	VirtualSize     int64             `xapi:"virtual_size"`
	Type            VDIType           `xapi:"type"`
	Sharable        bool              `xapi:"sharable"`
	ReadOnly        bool              `xapi:"read_only"`
	OtherConfig     map[string]string `xapi:"other_config"`
	XenstoreData    map[string]string `xapi:"xenstore_data"`
	SMConfig        map[string]string `xapi:"sm_config"`
	Tags            []string          `xapi:"tags"`
}

// VDIGetAll returns VDI.get_all.
func (c *Client) VDIGetAll(ctx context.Context) ([]VDIRef, error) {
	return call[[]VDIRef](ctx, c, "VDI.get_all")
}

// VDIGetAllRecords returns VDI.get_all_records.
func (c *Client) VDIGetAllRecords(ctx context.Context) (map[VDIRef]VDIRecord, error) {
	return call[map[VDIRef]VDIRecord](ctx, c, "VDI.get_all_records")
}

// VDIGetRecord returns VDI.get_record.
func (c *Client) VDIGetRecord(ctx context.Context, vdi VDIRef) (VDIRecord, error) {
	return call[VDIRecord](ctx, c, "VDI.get_record", vdi)
}

// VDIGetByUUID returns VDI.get_by_uuid.
func (c *Client) VDIGetByUUID(ctx context.Context, uuid string) (VDIRef, error) {
	return call[VDIRef](ctx, c, "VDI.get_by_uuid", uuid)
}

// VDIGetByNameLabel returns VDI.get_by_name_label.
func (c *Client) VDIGetByNameLabel(ctx context.Context, label string) ([]VDIRef, error) {
	return call[[]VDIRef](ctx, c, "VDI.get_by_name_label", label)
}

// VDIGetVirtualSize returns VDI.get_virtual_size in bytes.
func (c *Client) VDIGetVirtualSize(ctx context.Context, vdi VDIRef) (int64, error) {
	return call[int64](ctx, c, "VDI.get_virtual_size", vdi)
}

// VDICreate calls VDI.create with the whole record as one struct. Nil maps
// and slices are sent empty; an empty Type is sent as "user".
func (c *Client) VDICreate(ctx context.Context, spec VDICreateSpec) (VDIRef, error) {
	if spec.Type == "" {
		spec.Type = VDITypeUser
	}
	spec.OtherConfig = nonNil(spec.OtherConfig)
	spec.XenstoreData = nonNil(spec.XenstoreData)
	spec.SMConfig = nonNil(spec.SMConfig)
	if spec.Tags == nil {
		spec.Tags = []string{}
	}
	return call[VDIRef](ctx, c, "VDI.create", spec)
}

// VDIDestroy calls VDI.destroy.
func (c *Client) VDIDestroy(ctx context.Context, vdi VDIRef) error {
	return callVoid(ctx, c, "VDI.destroy", vdi)
}

// VDISnapshot calls VDI.snapshot(vdi, driver_params).
func (c *Client) VDISnapshot(ctx context.Context, vdi VDIRef, driverParams map[string]string) (VDIRef, error) {
	return call[VDIRef](ctx, c, "VDI.snapshot", vdi, nonNil(driverParams))
}

// AsyncVDISnapshot is Async.VDI.snapshot; the task result is a VDIRef.
func (c *Client) AsyncVDISnapshot(ctx context.Context, vdi VDIRef, driverParams map[string]string) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VDI.snapshot", vdi, nonNil(driverParams))
}

// VDIEnableCBT calls VDI.enable_cbt (idempotent).
func (c *Client) VDIEnableCBT(ctx context.Context, vdi VDIRef) error {
	return callVoid(ctx, c, "VDI.enable_cbt", vdi)
}

// VDIDisableCBT calls VDI.disable_cbt (idempotent).
func (c *Client) VDIDisableCBT(ctx context.Context, vdi VDIRef) error {
	return callVoid(ctx, c, "VDI.disable_cbt", vdi)
}

// VDIListChangedBlocks calls VDI.list_changed_blocks(vdi_from, vdi_to) and
// returns xapi's base64 bitmap as is. See VDIChangedBlocks for a decoded form.
func (c *Client) VDIListChangedBlocks(ctx context.Context, from, to VDIRef) (string, error) {
	return call[string](ctx, c, "VDI.list_changed_blocks", from, to)
}

// VDIChangedBlocks is VDIListChangedBlocks decoded into a ChangedBlocks.
func (c *Client) VDIChangedBlocks(ctx context.Context, from, to VDIRef) (*ChangedBlocks, error) {
	s, err := c.VDIListChangedBlocks(ctx, from, to)
	if err != nil {
		return nil, err
	}
	return DecodeChangedBlocks(s)
}

// VDIDataDestroy calls VDI.data_destroy (snapshot becomes cbt_metadata).
func (c *Client) VDIDataDestroy(ctx context.Context, vdi VDIRef) error {
	return callVoid(ctx, c, "VDI.data_destroy", vdi)
}

// AsyncVDIDataDestroy is Async.VDI.data_destroy.
func (c *Client) AsyncVDIDataDestroy(ctx context.Context, vdi VDIRef) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VDI.data_destroy", vdi)
}

// VDIGetNBDInfo calls VDI.get_nbd_info (no Async form exists). An empty list
// means no network has an NBD purpose.
func (c *Client) VDIGetNBDInfo(ctx context.Context, vdi VDIRef) ([]VDINBDServerInfo, error) {
	return call[[]VDINBDServerInfo](ctx, c, "VDI.get_nbd_info", vdi)
}

// VDISetOtherConfig calls VDI.set_other_config (replaces the whole map).
func (c *Client) VDISetOtherConfig(ctx context.Context, vdi VDIRef, m map[string]string) error {
	return callVoid(ctx, c, "VDI.set_other_config", vdi, nonNil(m))
}

// VDIAddToOtherConfig calls VDI.add_to_other_config.
func (c *Client) VDIAddToOtherConfig(ctx context.Context, vdi VDIRef, key, value string) error {
	return callVoid(ctx, c, "VDI.add_to_other_config", vdi, key, value)
}

// VDIRemoveFromOtherConfig calls VDI.remove_from_other_config.
func (c *Client) VDIRemoveFromOtherConfig(ctx context.Context, vdi VDIRef, key string) error {
	return callVoid(ctx, c, "VDI.remove_from_other_config", vdi, key)
}
