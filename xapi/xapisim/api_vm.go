package xapisim

import (
	"fmt"
	"slices"
	"strconv"
	"time"
)

// VM power states as xapi spells them.
const (
	Halted    = "Halted"
	Running   = "Running"
	Paused    = "Paused"
	Suspended = "Suspended"
)

// powerOp is one row of the VM power state machine.
type powerOp struct {
	from []string // allowed power states, in xapi's order
	to   string   // resulting state ("" = same as before)
}

// powerOps is the state machine (Xapi_vm_lifecycle.allowed_power_states).
var powerOps = map[string]powerOp{
	"start":          {[]string{Halted}, Running},
	"start_on":       {[]string{Halted}, Running},
	"clean_shutdown": {[]string{Running}, Halted},
	"shutdown":       {[]string{Running}, Halted},
	"hard_shutdown":  {[]string{Paused, Suspended, Running}, Halted},
	"clean_reboot":   {[]string{Running}, Running},
	"hard_reboot":    {[]string{Paused, Running}, Running},
	"pause":          {[]string{Running}, Paused},
	"unpause":        {[]string{Paused}, Running},
	"suspend":        {[]string{Running}, Suspended},
	"resume":         {[]string{Suspended}, Running},
	"resume_on":      {[]string{Suspended}, Running},
}

// PowerHook is called on every VM power-state change, with the pool lock
// held (it must not block or call back into locked simulator APIs).
type PowerHook func(p *Pool, vmUUID, from, to string)

// OnPowerChange registers a hook (e.g. a guest workload that pauses while
// its VM is paused). Register hooks before Start.
func (s *Sim) OnPowerChange(h PowerHook) { s.powerHooks = append(s.powerHooks, h) }

var _ = addRegistrar(registerVM)

func registerVM() {
	vm := p("vm", KRef)
	for op := range powerOps {
		params := []Param{vm}
		switch op {
		case "start", "resume":
			params = append(params, p("start_paused", KBool), p("force", KBool))
		case "start_on", "resume_on":
			params = append(params, p("host", KRef), p("start_paused", KBool), p("force", KBool))
		}
		Register(&Method{Name: "VM." + op, Params: params, Handler: func(c *Call) (any, error) {
			return "", c.vmPowerOp(op)
		}})
	}
	Register(&Method{Name: "VM.destroy", Params: []Param{p("self", KRef)}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("VM", c.Str(0))
		if err != nil {
			return nil, err
		}
		if o.bool("is_control_domain") {
			return nil, Errorf(ErrOperationNotAllowed, "This operation is not allowed on dom0")
		}
		if ps := o.str("power_state"); ps != Halted && ps != Suspended {
			return nil, badPowerState(o.Ref, ps, Halted, Suspended)
		}
		for _, vbd := range c.db().find("VBD", "VM", o.Ref) {
			c.db().destroy(vbd)
		}
		for _, vif := range c.db().find("VIF", "VM", o.Ref) {
			c.db().destroy(vif)
		}
		c.db().destroyGuestMetrics(o)
		c.db().destroyVMMetrics(o)
		c.db().destroy(o)
		return "", nil
	}})
	Register(&Method{Name: "VBD.create", Params: []Param{p("args", KAny)}, Handler: vbdCreate})
	Register(&Method{Name: "VBD.destroy", Params: []Param{p("self", KRef)}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("VBD", c.Str(0))
		if err != nil {
			return nil, err
		}
		if o.bool("currently_attached") {
			return nil, Errorf(ErrOperationNotAllowed, fmt.Sprintf("VBD '%s' still attached to '%s'", o.str("uuid"), o.str("VM")))
		}
		c.db().destroy(o)
		return "", nil
	}})
	Register(&Method{Name: "VBD.plug", Params: []Param{p("self", KRef)}, Handler: vbdPlug})
	for _, n := range []string{"unplug", "unplug_force"} {
		Register(&Method{Name: "VBD." + n, Params: []Param{p("self", KRef)}, Handler: func(c *Call) (any, error) {
			o, err := c.db().get("VBD", c.Str(0))
			if err != nil {
				return nil, err
			}
			if !o.bool("currently_attached") {
				return nil, Errorf(ErrDeviceAlreadyDetached, o.Ref)
			}
			c.db().set(o, "currently_attached", false)
			if vm, err := c.db().get("VM", o.str("VM")); err == nil && vm.bool("is_control_domain") {
				oc := o.strMap("other_config")
				delete(oc, DeviceKey)
				c.db().set(o, "device", "")
			}
			return "", nil
		}})
	}
	Register(&Method{Name: "VIF.create", Params: []Param{p("args", KAny)}, Handler: vifCreate})
	Register(&Method{Name: "VIF.destroy", Params: []Param{p("self", KRef)}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("VIF", c.Str(0))
		if err != nil {
			return nil, err
		}
		c.db().destroy(o)
		return "", nil
	}})
}

// vmPowerOp runs one power operation on the VM in Args[0].
func (c *Call) vmPowerOp(op string) error {
	o, err := c.db().get("VM", c.Str(0))
	if err != nil {
		return err
	}
	rule := powerOps[op]
	ps := o.str("power_state")
	if !slices.Contains(rule.from, ps) {
		return badPowerState(o.Ref, ps, rule.from...)
	}
	if o.bool("is_control_domain") && op != "start" && op != "start_on" {
		return Errorf(ErrOperationNotAllowed, "This operation is not allowed on a control domain")
	}
	if o.bool("is_a_snapshot") {
		return Errorf("VM_IS_SNAPSHOT", o.Ref, op)
	}
	if o.bool("is_a_template") {
		return Errorf("VM_IS_TEMPLATE", o.Ref, op)
	}
	host := c.Pool.Coordinator().Ref
	if r := o.str("resident_on"); r != NullRef && r != "" {
		host = r
	}
	to := rule.to
	switch op {
	case "start", "resume":
		if c.Bool(1) {
			to = Paused
		}
	case "start_on", "resume_on":
		if _, err := c.db().get("host", c.Str(1)); err != nil {
			return err
		}
		host = c.Str(1)
		if c.Bool(2) {
			to = Paused
		}
	}
	c.Pool.setPowerState(o, to, host)
	return nil
}

// SetPowerState moves the VM vmRef to state on host (pool lock held),
// without the API's state-machine checks: resident_on, domid, start_time,
// allowed_operations and device attachment follow, and power hooks run.
// Migration code uses it to stop/start VMs on either side.
func (p *Pool) SetPowerState(vmRef, state, host string) error {
	o, err := p.db.get("VM", vmRef)
	if err != nil {
		return err
	}
	p.setPowerState(o, state, host)
	return nil
}

// setPowerState is the single place VM power states change (domains come
// and go through setDomain).
func (p *Pool) setPowerState(o *object, state, host string) {
	from := o.str("power_state")
	o.Fields["power_state"] = state
	switch state {
	case Halted, Suspended:
		p.setDomain(o, NullRef, -1)
	case Running, Paused:
		if from == Halted || from == Suspended {
			p.setDomain(o, host, p.nextDomid())
			o.Fields["start_time"] = time.Now().UTC().Truncate(time.Second)
			p.db.domainBuilt(o)
		}
	}
	if !o.bool("is_control_domain") {
		o.Fields["allowed_operations"] = allowedVMOps(state)
	}
	p.db.touch(o)
	attached := state == Running || state == Paused
	for _, vbd := range p.db.find("VBD", "VM", o.Ref) {
		if vbd.bool("currently_attached") != attached {
			p.db.set(vbd, "currently_attached", attached)
		}
	}
	for _, vif := range p.db.find("VIF", "VM", o.Ref) {
		if vif.bool("currently_attached") != attached {
			p.db.set(vif, "currently_attached", attached)
		}
	}
	for _, h := range p.sim.powerHooks {
		h(p, o.str("uuid"), from, state)
	}
}

// allowedVMOps lists the operations allowed in a power state (a subset of
// what xapi computes: power operations plus the copy/migrate ones).
func allowedVMOps(state string) []string {
	var ops []string
	for op, rule := range powerOps {
		if slices.Contains(rule.from, state) {
			ops = append(ops, op)
		}
	}
	switch state {
	case Running:
		ops = append(ops, "snapshot", "migrate_send", "pool_migrate", "changing_dynamic_range")
	case Halted:
		ops = append(ops, "snapshot", "clone", "copy", "destroy", "export", "migrate_send", "changing_dynamic_range", "changing_static_range")
	case Suspended:
		ops = append(ops, "snapshot", "destroy", "migrate_send")
	}
	slices.Sort(ops)
	return ops
}

func (p *Pool) nextDomid() int64 {
	m := p.lastDomid
	for _, vm := range p.db.all("VM") {
		m = max(m, vm.int("domid"))
	}
	p.lastDomid = m + 1
	return p.lastDomid
}

// DeviceKey is the VBD other_config key holding the backing-file path of a
// VDI plugged into a control domain (dom0); VBD.device holds it too.
const DeviceKey = "sim-device-path"

func vbdCreate(c *Call) (any, error) {
	fields, err := recordFields("VBD", c.Record(0))
	if err != nil {
		return nil, err
	}
	vm, _ := fields["VM"].(string)
	if _, err := c.db().get("VM", vm); err != nil {
		return nil, err
	}
	empty, _ := fields["empty"].(bool)
	vdi, _ := fields["VDI"].(string)
	if !empty || (vdi != "" && vdi != NullRef) {
		if _, err := c.db().get("VDI", vdi); err != nil {
			return nil, err
		}
	} else {
		fields["VDI"] = NullRef
	}
	if ud, _ := fields["userdevice"].(string); ud == "" || ud == "autodetect" {
		used := map[string]bool{}
		for _, o := range c.db().find("VBD", "VM", vm) {
			used[o.str("userdevice")] = true
		}
		for i := 0; ; i++ {
			if !used[strconv.Itoa(i)] {
				fields["userdevice"] = strconv.Itoa(i)
				break
			}
		}
	}
	fields["currently_attached"] = false
	fields["device"] = ""
	return c.db().create("VBD", fields).Ref, nil
}

func vbdPlug(c *Call) (any, error) {
	o, err := c.db().get("VBD", c.Str(0))
	if err != nil {
		return nil, err
	}
	if o.bool("currently_attached") {
		return nil, Errorf(ErrDeviceAlreadyAttached, o.Ref)
	}
	vm, err := c.db().get("VM", o.str("VM"))
	if err != nil {
		return nil, err
	}
	if ps := vm.str("power_state"); ps != Running && ps != Paused {
		return nil, badPowerState(vm.Ref, ps, Running)
	}
	if vm.bool("is_control_domain") {
		vdi, err := c.db().get("VDI", o.str("VDI"))
		if err != nil {
			return nil, err
		}
		path := c.Pool.vdiPath(vdi)
		o.strMap("other_config")[DeviceKey] = path
		o.Fields["device"] = path
	} else {
		o.Fields["device"] = "xvda"
		if n, err := strconv.Atoi(o.str("userdevice")); err == nil {
			o.Fields["device"] = "xvd" + string(rune('a'+n%26))
		}
	}
	c.db().set(o, "currently_attached", true)
	return "", nil
}

func vifCreate(c *Call) (any, error) {
	fields, err := recordFields("VIF", c.Record(0))
	if err != nil {
		return nil, err
	}
	vm, _ := fields["VM"].(string)
	if _, err := c.db().get("VM", vm); err != nil {
		return nil, err
	}
	network, _ := fields["network"].(string)
	if _, err := c.db().get("network", network); err != nil {
		return nil, err
	}
	if mac, _ := fields["MAC"].(string); mac == "" {
		fields["MAC"] = randomMAC()
		fields["MAC_autogenerated"] = true
	}
	return c.db().create("VIF", fields).Ref, nil
}

func randomMAC() string {
	u := NewUUID()
	return "76:" + u[0:2] + ":" + u[2:4] + ":" + u[4:6] + ":" + u[6:8] + ":" + u[9:11]
}

var _ = addRegistrar(func() {
	Register(&Method{Name: "VM.snapshot", Unlocked: true,
		Params:  []Param{p("vm", KRef), p("new_name", KString), pd("ignore_vdis", KRefSet, []string{})},
		Handler: vmSnapshot})
})

// vmSnapshot implements VM.snapshot: a snapshot of every disk (except
// ignore_vdis) and a halted snapshot VM holding VBDs and VIFs like the
// source's. The pool lock is taken around DB work only.
func vmSnapshot(c *Call) (any, error) {
	p := c.Pool
	p.mu.Lock()
	vm, err := p.db.get("VM", c.Str(0))
	if err != nil {
		p.mu.Unlock()
		return nil, err
	}
	if vm.bool("is_control_domain") {
		p.mu.Unlock()
		return nil, Errorf(ErrOperationNotAllowed, "This operation is not allowed on a control domain")
	}
	if vm.bool("is_a_snapshot") {
		p.mu.Unlock()
		return nil, Errorf("VM_IS_SNAPSHOT", vm.Ref, "snapshot")
	}
	ignore := c.Set(2)
	var disks []string // VDI refs to snapshot
	for _, vbd := range p.db.find("VBD", "VM", vm.Ref) {
		vdi := vbd.str("VDI")
		if vbd.str("type") == "Disk" && vdi != NullRef && !slices.Contains(ignore, vdi) {
			disks = append(disks, vdi)
		}
	}
	p.mu.Unlock()

	snaps := map[string]string{}
	for _, vdi := range disks {
		ref, err := p.copyVDI(vdi, copySnapshot, "", "")
		if err != nil {
			p.mu.Lock()
			for _, s := range snaps {
				if o, gerr := p.db.get("VDI", s); gerr == nil {
					p.destroyVDI(o)
				}
			}
			p.mu.Unlock()
			return nil, err
		}
		snaps[vdi] = ref
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	if vm, err = p.db.get("VM", c.Str(0)); err != nil {
		return nil, err
	}
	fields := map[string]any{}
	for k, v := range vm.Fields {
		fields[k] = cloneValue(v)
	}
	fields["uuid"] = NewUUID()
	fields["name_label"] = c.Str(1)
	fields["is_a_snapshot"] = true
	fields["snapshot_of"] = vm.Ref
	fields["snapshot_time"] = time.Now().UTC().Truncate(time.Second)
	fields["power_state"] = Halted
	fields["resident_on"] = NullRef
	fields["domid"] = int64(-1)
	fields["current_operations"] = map[string]string{}
	fields["allowed_operations"] = []string{}
	// xapi's clone copies the guest metrics into a new object.
	fields["guest_metrics"] = p.db.copyGuestMetrics(vm.str("guest_metrics"))
	fields["metrics"] = p.db.copyVMMetrics(vm.str("metrics"))
	snap := p.db.create("VM", fields)
	for _, vbd := range p.db.find("VBD", "VM", vm.Ref) {
		vdi := vbd.str("VDI")
		if vbd.str("type") == "Disk" && vdi != NullRef {
			s, ok := snaps[vdi]
			if !ok {
				continue // ignored disk
			}
			vdi = s
		}
		f := map[string]any{}
		for k, v := range vbd.Fields {
			f[k] = cloneValue(v)
		}
		f["uuid"], f["VM"], f["VDI"], f["currently_attached"], f["device"] = NewUUID(), snap.Ref, vdi, false, ""
		f["other_config"] = map[string]string{}
		p.db.create("VBD", f)
	}
	for _, vif := range p.db.find("VIF", "VM", vm.Ref) {
		f := map[string]any{}
		for k, v := range vif.Fields {
			f[k] = cloneValue(v)
		}
		f["uuid"], f["VM"], f["currently_attached"] = NewUUID(), snap.Ref, false
		p.db.create("VIF", f)
	}
	return snap.Ref, nil
}
