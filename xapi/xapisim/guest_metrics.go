package xapisim

import (
	"fmt"
	"maps"
	"time"
)

// Addresses demo-vm's simulated guest agent reports for VIF 0 by default
// (documentation ranges, RFC 5737 and RFC 3849).
const (
	DefaultDemoIPv4 = "198.51.100.10"
	DefaultDemoIPv6 = "2001:db8:100::10"
)

// demoGuestNetworks is VM_guest_metrics.networks for one VIF (device 0) as
// xapi writes it from the new xenstore protocol (xapi_guest_agent.ml
// networks): the first IPv4 under both "0/ip" and "0/ipv4/0", IPv6 under
// "0/ipv6/<n>". "none" or "" leaves a family out.
func demoGuestNetworks(ipv4, ipv6 string) map[string]string {
	m := map[string]string{}
	if ipv4 != "" && ipv4 != "none" {
		m["0/ip"] = ipv4
		m["0/ipv4/0"] = ipv4
	}
	if ipv6 != "" && ipv6 != "none" {
		m["0/ipv6/0"] = ipv6
	}
	return m
}

// createGuestMetrics creates the VM_guest_metrics object a live Linux
// guest agent would produce, with the given networks map.
func (d *db) createGuestMetrics(networks map[string]string) *object {
	return d.create("VM_guest_metrics", map[string]any{
		"os_version": map[string]string{"name": "Debian GNU/Linux 12 (bookworm)", "distro": "debian",
			"major": "12", "minor": "0", "uname": "6.1.0-simulated"},
		"PV_drivers_version":    map[string]string{"major": "8", "minor": "3", "micro": "0", "build": "1"},
		"PV_drivers_up_to_date": true, "PV_drivers_detected": true, "live": true,
		"networks":            nonNilMap(maps.Clone(networks)),
		"other":               map[string]string{"feature-shutdown": "1", "feature-suspend": "1", "has-vendor-device": "0"},
		"last_updated":        time.Now().UTC().Truncate(time.Second),
		"can_use_hotplug_vbd": "yes", "can_use_hotplug_vif": "yes",
	})
}

// copyGuestMetrics returns a new VM_guest_metrics object with the fields
// of ref (as xapi's clone/snapshot and metadata import do), or NullRef
// when ref is null or dangling.
func (d *db) copyGuestMetrics(ref string) string {
	o, err := d.get("VM_guest_metrics", ref)
	if err != nil {
		return NullRef
	}
	fields := map[string]any{}
	for k, v := range o.Fields {
		fields[k] = cloneValue(v)
	}
	delete(fields, "uuid")
	return d.create("VM_guest_metrics", fields).Ref
}

// destroyGuestMetrics removes vm's VM_guest_metrics object, if any, and
// nulls the ref.
func (d *db) destroyGuestMetrics(vm *object) {
	if o, err := d.get("VM_guest_metrics", vm.str("guest_metrics")); err == nil {
		d.destroy(o)
	}
	if vm.str("guest_metrics") != NullRef {
		d.set(vm, "guest_metrics", NullRef)
	}
}

// guestMetricsImport is the part of a VM's guest metrics a simulated
// migration carries to the destination (xapi exports the whole
// VM_guest_metrics object in the VM metadata).
type guestMetricsImport struct {
	OSVersion        map[string]string `json:"os_version"`
	PVDriversVersion map[string]string `json:"PV_drivers_version"`
	Networks         map[string]string `json:"networks"`
	Other            map[string]string `json:"other"`
	Live             bool              `json:"live"`
}

// exportGuestMetrics returns what importVM needs to recreate vm's guest
// metrics, or nil when vm has none.
func (d *db) exportGuestMetrics(vm *object) *guestMetricsImport {
	o, err := d.get("VM_guest_metrics", vm.str("guest_metrics"))
	if err != nil {
		return nil
	}
	return &guestMetricsImport{OSVersion: maps2(o.strMap("os_version")), PVDriversVersion: maps2(o.strMap("PV_drivers_version")),
		Networks: maps2(o.strMap("networks")), Other: maps2(o.strMap("other")), Live: o.bool("live")}
}

func (d *db) importGuestMetrics(g *guestMetricsImport) string {
	if g == nil {
		return NullRef
	}
	o := d.createGuestMetrics(g.Networks)
	d.set(o, "os_version", nonNilMap(g.OSVersion))
	d.set(o, "PV_drivers_version", nonNilMap(g.PVDriversVersion))
	d.set(o, "other", nonNilMap(g.Other))
	d.set(o, "live", g.Live)
	return o.Ref
}

func nonNilMap(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

// SetGuestNetworks makes the VM with uuid report networks (a
// VM_guest_metrics.networks map such as {"0/ip": "10.0.0.5", "0/ipv6/0":
// "2001:db8::5"}) as if its guest agent had sent them, creating its
// VM_guest_metrics object if needed. A nil map removes the object and
// leaves VM.guest_metrics null, like a VM without a guest agent.
func (p *Pool) SetGuestNetworks(vmUUID string, networks map[string]string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err := p.db.byUUID("VM", vmUUID)
	if err != nil {
		return fmt.Errorf("set guest networks: %w", err)
	}
	if networks == nil {
		p.db.destroyGuestMetrics(vm)
		return nil
	}
	if gm, err := p.db.get("VM_guest_metrics", vm.str("guest_metrics")); err == nil {
		p.db.set(gm, "networks", maps.Clone(networks))
		p.db.set(gm, "last_updated", time.Now().UTC().Truncate(time.Second))
		return nil
	}
	p.db.set(vm, "guest_metrics", p.db.createGuestMetrics(networks).Ref)
	return nil
}
