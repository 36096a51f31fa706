package xapi

import "context"

// VBDCreateSpec is the record VBD.create takes as one <struct>.
type VBDCreateSpec struct {
	VM                 VMRef             `xapi:"VM"`
	VDI                VDIRef            `xapi:"VDI"`
	Device             string            `xapi:"device"`
	Userdevice         string            `xapi:"userdevice"` // "autodetect" picks a free slot
	Bootable           bool              `xapi:"bootable"`
	Mode               VBDMode           `xapi:"mode"`
	Type               VBDType           `xapi:"type"`
	Unpluggable        bool              `xapi:"unpluggable"`
	Empty              bool              `xapi:"empty"`
	OtherConfig        map[string]string `xapi:"other_config"`
	QOSAlgorithmType   string            `xapi:"qos_algorithm_type"`
	QOSAlgorithmParams map[string]string `xapi:"qos_algorithm_params"`
}

// VBDGetRecord returns VBD.get_record.
func (c *Client) VBDGetRecord(ctx context.Context, vbd VBDRef) (VBDRecord, error) {
	return call[VBDRecord](ctx, c, "VBD.get_record", vbd)
}

// VBDGetAllRecords returns VBD.get_all_records.
func (c *Client) VBDGetAllRecords(ctx context.Context) (map[VBDRef]VBDRecord, error) {
	return call[map[VBDRef]VBDRecord](ctx, c, "VBD.get_all_records")
}

// VBDCreate calls VBD.create. Defaults: Userdevice "autodetect", Mode RW,
// Type Disk.
func (c *Client) VBDCreate(ctx context.Context, spec VBDCreateSpec) (VBDRef, error) {
	if spec.Userdevice == "" {
		spec.Userdevice = "autodetect"
	}
	if spec.Mode == "" {
		spec.Mode = VBDModeRW
	}
	if spec.Type == "" {
		spec.Type = VBDTypeDisk
	}
	spec.OtherConfig = nonNil(spec.OtherConfig)
	spec.QOSAlgorithmParams = nonNil(spec.QOSAlgorithmParams)
	return call[VBDRef](ctx, c, "VBD.create", spec)
}

// VBDPlug calls VBD.plug (hot-plug into a running VM).
func (c *Client) VBDPlug(ctx context.Context, vbd VBDRef) error {
	return callVoid(ctx, c, "VBD.plug", vbd)
}

// VBDUnplug calls VBD.unplug.
func (c *Client) VBDUnplug(ctx context.Context, vbd VBDRef) error {
	return callVoid(ctx, c, "VBD.unplug", vbd)
}

// VBDDestroy calls VBD.destroy.
func (c *Client) VBDDestroy(ctx context.Context, vbd VBDRef) error {
	return callVoid(ctx, c, "VBD.destroy", vbd)
}

// AsyncVBDPlug is Async.VBD.plug.
func (c *Client) AsyncVBDPlug(ctx context.Context, vbd VBDRef) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VBD.plug", vbd)
}

// AsyncVBDUnplug is Async.VBD.unplug.
func (c *Client) AsyncVBDUnplug(ctx context.Context, vbd VBDRef) (TaskRef, error) {
	return call[TaskRef](ctx, c, "Async.VBD.unplug", vbd)
}
