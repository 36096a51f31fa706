package xapisim

import (
	"fmt"
	"strconv"
	"time"
)

// VM_metrics: xapi creates one with every VM (xapi_vm.ml create,
// xapi_vm_helpers.ml for clones and snapshots, import.ml for migrated VMs,
// dbsync_master.ml for a VM found without one), so VM.metrics is never null
// for a VM. VCPUs_number is the domain's vCPU count as xenopsd reports it
// (vcpu_target): VCPUs_at_startup when the domain is built, then whatever
// VM.set_VCPUs_number_live set.

var _ = addRegistrar(registerVMMetrics)

func registerVMMetrics() {
	Register(&Method{Name: "VM.set_VCPUs_number_live", Params: []Param{p("self", KRef), p("nvcpu", KInt)}, Handler: vmSetVCPUsNumberLive})
}

// vmSetVCPUsNumberLive is xapi_vm.ml set_VCPUs_number_live →
// xapi_xenops.ml set_vcpus: only a Running VM (changing_VCPUs_live), 1 ≤
// nvcpu ≤ VCPUs_max (else INVALID_VALUE), and it sets both
// VM.VCPUs_at_startup and VM_metrics.VCPUs_number.
func vmSetVCPUsNumberLive(c *Call) (any, error) {
	vm, err := c.db().get("VM", c.Str(0))
	if err != nil {
		return nil, err
	}
	if ps := vm.str("power_state"); ps != Running {
		return nil, badPowerState(vm.Ref, ps, Running)
	}
	n := c.Int(1)
	if n < 1 || n > vm.int("VCPUs_max") {
		return nil, Errorf(ErrInvalidValue, "VCPU values must satisfy: 0 < VCPUs ≤ VCPUs_max", strconv.FormatInt(n, 10))
	}
	c.db().set(vm, "VCPUs_at_startup", n)
	c.db().setLiveVCPUs(vm, n)
	return "", nil
}

// createVMMetrics creates a VM_metrics object as xapi's VM.create does
// (VCPUs_number 0 until a domain is built).
func (d *db) createVMMetrics() *object {
	now := time.Now().UTC().Truncate(time.Second)
	return d.create("VM_metrics", map[string]any{"install_time": now, "last_updated": now})
}

// ensureVMMetrics gives vm a VM_metrics object when its ref is null or
// dangling (dbsync_master.ml does this for every VM at xapi start), with
// VCPUs_number set from VCPUs_at_startup for a VM with a domain.
func (d *db) ensureVMMetrics(vm *object) {
	if _, err := d.get("VM_metrics", vm.str("metrics")); err == nil {
		return
	}
	m := d.createVMMetrics()
	if ps := vm.str("power_state"); ps == Running || ps == Paused {
		m.Fields["VCPUs_number"] = max(1, vm.int("VCPUs_at_startup"))
		m.Fields["start_time"] = vm.Fields["start_time"]
	}
	if d.objs[vm.Ref] == vm {
		d.set(vm, "metrics", m.Ref)
		return
	}
	vm.Fields["metrics"] = m.Ref
}

// setLiveVCPUs sets VM_metrics.VCPUs_number of vm (creating the object if
// it is missing).
func (d *db) setLiveVCPUs(vm *object, n int64) {
	d.ensureVMMetrics(vm)
	m, err := d.get("VM_metrics", vm.str("metrics"))
	if err != nil {
		return
	}
	d.set(m, "VCPUs_number", n)
	d.set(m, "last_updated", time.Now().UTC().Truncate(time.Second))
}

// domainBuilt records in vm's metrics that a new domain was built from
// the VM record (start, resume): VCPUs_number = VCPUs_at_startup.
func (d *db) domainBuilt(vm *object) {
	d.ensureVMMetrics(vm)
	m, err := d.get("VM_metrics", vm.str("metrics"))
	if err != nil {
		return
	}
	d.set(m, "VCPUs_number", max(1, vm.int("VCPUs_at_startup")))
	d.set(m, "start_time", vm.Fields["start_time"])
	d.set(m, "last_updated", time.Now().UTC().Truncate(time.Second))
}

// liveVCPUs is VM_metrics.VCPUs_number of vm, 0 without metrics.
func (d *db) liveVCPUs(vm *object) int64 {
	m, err := d.get("VM_metrics", vm.str("metrics"))
	if err != nil {
		return 0
	}
	return m.int("VCPUs_number")
}

// copyVMMetrics returns a new VM_metrics object with the fields of ref (as
// xapi_vm_helpers.ml copy_metrics does for clones and snapshots), or a
// fresh one when ref is null or dangling.
func (d *db) copyVMMetrics(ref string) string {
	o, err := d.get("VM_metrics", ref)
	if err != nil {
		return d.createVMMetrics().Ref
	}
	fields := map[string]any{}
	for k, v := range o.Fields {
		fields[k] = cloneValue(v)
	}
	delete(fields, "uuid")
	return d.create("VM_metrics", fields).Ref
}

// destroyVMMetrics removes vm's VM_metrics object, if any.
func (d *db) destroyVMMetrics(vm *object) {
	if o, err := d.get("VM_metrics", vm.str("metrics")); err == nil {
		d.destroy(o)
	}
}

// vmMetricsImport is the part of a VM's metrics a simulated migration
// carries to the destination (xapi exports the VM_metrics object in the
// VM metadata and import.ml recreates it).
type vmMetricsImport struct {
	MemoryActual int64  `json:"memory_actual"`
	VCPUsNumber  int64  `json:"VCPUs_number"`
	StartTime    string `json:"start_time"`
	InstallTime  string `json:"install_time"`
}

// exportVMMetrics returns what importVM needs to recreate vm's metrics, or
// nil when vm has none.
func (d *db) exportVMMetrics(vm *object) *vmMetricsImport {
	o, err := d.get("VM_metrics", vm.str("metrics"))
	if err != nil {
		return nil
	}
	start, _ := o.Fields["start_time"].(time.Time)
	install, _ := o.Fields["install_time"].(time.Time)
	return &vmMetricsImport{MemoryActual: o.int("memory_actual"), VCPUsNumber: o.int("VCPUs_number"),
		StartTime: FormatDate(start), InstallTime: FormatDate(install)}
}

// importVMMetrics creates the VM_metrics object of an imported VM (a fresh
// one when the metadata has none).
func (d *db) importVMMetrics(m *vmMetricsImport) string {
	o := d.createVMMetrics()
	if m == nil {
		return o.Ref
	}
	d.set(o, "memory_actual", m.MemoryActual)
	d.set(o, "VCPUs_number", m.VCPUsNumber)
	if t, err := ParseDate(m.StartTime); err == nil {
		d.set(o, "start_time", t)
	}
	if t, err := ParseDate(m.InstallTime); err == nil {
		d.set(o, "install_time", t)
	}
	return o.Ref
}

// SetLiveVCPUs sets VM_metrics.VCPUs_number of the VM with uuid to n
// without touching VCPUs_at_startup, as if the domain's vCPU count had
// changed behind xapi's back (tests: a record whose VCPUs_at_startup no
// longer matches the running domain).
func (p *Pool) SetLiveVCPUs(vmUUID string, n int64) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err := p.db.byUUID("VM", vmUUID)
	if err != nil {
		return fmt.Errorf("set live vcpus: %w", err)
	}
	p.db.setLiveVCPUs(vm, n)
	return nil
}

// DropVMMetrics destroys the VM_metrics object of the VM with uuid,
// leaving VM.metrics dangling, or null when null is set (tests: clients
// must cope with metrics they cannot read; xapi itself recreates them at
// its next start, as this simulator does when it loads its state).
func (p *Pool) DropVMMetrics(vmUUID string, null bool) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err := p.db.byUUID("VM", vmUUID)
	if err != nil {
		return fmt.Errorf("drop vm metrics: %w", err)
	}
	p.db.destroyVMMetrics(vm)
	if null {
		p.db.set(vm, "metrics", NullRef)
	}
	return nil
}
