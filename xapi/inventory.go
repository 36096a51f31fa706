package xapi

import "context"

// SRGetAll returns SR.get_all.
func (c *Client) SRGetAll(ctx context.Context) ([]SRRef, error) {
	return call[[]SRRef](ctx, c, "SR.get_all")
}

// SRGetAllRecords returns SR.get_all_records.
func (c *Client) SRGetAllRecords(ctx context.Context) (map[SRRef]SRRecord, error) {
	return call[map[SRRef]SRRecord](ctx, c, "SR.get_all_records")
}

// SRGetRecord returns SR.get_record.
func (c *Client) SRGetRecord(ctx context.Context, sr SRRef) (SRRecord, error) {
	return call[SRRecord](ctx, c, "SR.get_record", sr)
}

// SRGetByUUID returns SR.get_by_uuid.
func (c *Client) SRGetByUUID(ctx context.Context, uuid string) (SRRef, error) {
	return call[SRRef](ctx, c, "SR.get_by_uuid", uuid)
}

// SRGetByNameLabel returns SR.get_by_name_label.
func (c *Client) SRGetByNameLabel(ctx context.Context, label string) ([]SRRef, error) {
	return call[[]SRRef](ctx, c, "SR.get_by_name_label", label)
}

// VIFGetRecord returns VIF.get_record.
func (c *Client) VIFGetRecord(ctx context.Context, vif VIFRef) (VIFRecord, error) {
	return call[VIFRecord](ctx, c, "VIF.get_record", vif)
}

// VIFGetAllRecords returns VIF.get_all_records.
func (c *Client) VIFGetAllRecords(ctx context.Context) (map[VIFRef]VIFRecord, error) {
	return call[map[VIFRef]VIFRecord](ctx, c, "VIF.get_all_records")
}

// NetworkGetAll returns network.get_all.
func (c *Client) NetworkGetAll(ctx context.Context) ([]NetworkRef, error) {
	return call[[]NetworkRef](ctx, c, "network.get_all")
}

// NetworkGetAllRecords returns network.get_all_records.
func (c *Client) NetworkGetAllRecords(ctx context.Context) (map[NetworkRef]NetworkRecord, error) {
	return call[map[NetworkRef]NetworkRecord](ctx, c, "network.get_all_records")
}

// NetworkGetRecord returns network.get_record.
func (c *Client) NetworkGetRecord(ctx context.Context, n NetworkRef) (NetworkRecord, error) {
	return call[NetworkRecord](ctx, c, "network.get_record", n)
}

// NetworkGetByUUID returns network.get_by_uuid.
func (c *Client) NetworkGetByUUID(ctx context.Context, uuid string) (NetworkRef, error) {
	return call[NetworkRef](ctx, c, "network.get_by_uuid", uuid)
}

// NetworkGetByNameLabel returns network.get_by_name_label.
func (c *Client) NetworkGetByNameLabel(ctx context.Context, label string) ([]NetworkRef, error) {
	return call[[]NetworkRef](ctx, c, "network.get_by_name_label", label)
}

// PIFGetAllRecords returns PIF.get_all_records.
func (c *Client) PIFGetAllRecords(ctx context.Context) (map[PIFRef]PIFRecord, error) {
	return call[map[PIFRef]PIFRecord](ctx, c, "PIF.get_all_records")
}

// PIFGetRecord returns PIF.get_record.
func (c *Client) PIFGetRecord(ctx context.Context, pif PIFRef) (PIFRecord, error) {
	return call[PIFRecord](ctx, c, "PIF.get_record", pif)
}
