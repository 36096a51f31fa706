package xapi

import (
	"context"
	"time"
)

// VMMetricsRef is a reference to a VM_metrics object. xapi creates one with
// every VM, so VM.metrics is not null in practice; callers still treat a
// null or dangling ref as "no metrics".
type VMMetricsRef string

// IsNull reports whether r is a null reference.
func (r VMMetricsRef) IsNull() bool { return IsNullRef(string(r)) }

// VMMetricsRecord is a subset of the VM_metrics class: what xapi knows of
// the VM's running domain.
type VMMetricsRecord struct {
	UUID         string `xapi:"uuid"`
	MemoryActual int64  `xapi:"memory_actual"`
	// VCPUsNumber is the domain's current vCPU count (xenopsd's
	// vcpu_target): VCPUs_at_startup when the domain was built, changed by
	// VM.set_VCPUs_number_live. VM.VCPUs_at_startup is the count for the
	// next boot and may differ while the VM runs. 0 for a VM that never ran.
	VCPUsNumber       int64             `xapi:"VCPUs_number"`
	State             []string          `xapi:"state"`
	StartTime         time.Time         `xapi:"start_time"`
	InstallTime       time.Time         `xapi:"install_time"`
	LastUpdated       time.Time         `xapi:"last_updated"`
	OtherConfig       map[string]string `xapi:"other_config"`
	HVM               bool              `xapi:"hvm"`
	NestedVirt        bool              `xapi:"nested_virt"`
	Nomigrate         bool              `xapi:"nomigrate"`
	CurrentDomainType string            `xapi:"current_domain_type"`
}

// VMMetricsGetRecord returns VM_metrics.get_record.
func (c *Client) VMMetricsGetRecord(ctx context.Context, m VMMetricsRef) (VMMetricsRecord, error) {
	return call[VMMetricsRecord](ctx, c, "VM_metrics.get_record", m)
}

// VMMetricsGetVCPUsNumber returns VM_metrics.get_VCPUs_number.
func (c *Client) VMMetricsGetVCPUsNumber(ctx context.Context, m VMMetricsRef) (int64, error) {
	return call[int64](ctx, c, "VM_metrics.get_VCPUs_number", m)
}

// VMSetVCPUsNumberLive runs VM.set_VCPUs_number_live: hot-plugs or unplugs
// vCPUs of a running VM (1 ≤ n ≤ VCPUs_max). xapi updates both
// VM_metrics.VCPUs_number and VM.VCPUs_at_startup.
func (c *Client) VMSetVCPUsNumberLive(ctx context.Context, vm VMRef, n int64) error {
	return callVoid(ctx, c, "VM.set_VCPUs_number_live", vm, n)
}
