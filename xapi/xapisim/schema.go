package xapisim

import (
	"strings"
	"time"
)

// Kind is the wire type of a field or parameter.
type Kind int

// Field and parameter kinds. Values stored in the DB use these Go types:
// KString/KRef/KEnum string, KInt int64, KBool bool, KFloat float64,
// KDate time.Time, KSet/KRefSet []string, KMap map[string]string.
// KAny is a parameter kind accepting any decoded value (records).
const (
	KString Kind = iota
	KInt
	KBool
	KFloat
	KDate
	KRef
	KEnum
	KSet
	KRefSet
	KMap
	KAny
)

// Field describes one field of a class.
type Field struct {
	Name string
	Kind Kind
	// RW fields get a generic set_<name> (and add_to_/remove_from_ for
	// maps, add_/remove_ for sets).
	RW bool
	// Class is the target class of a KRef/KRefSet field.
	Class string
	// Derived, for a KRefSet, is "Child.field": the set is every Child
	// whose field points at this object (VM.VBDs = VBDs with VBD.VM = self).
	Derived string
	// Default is the initial value; nil means the kind's zero value.
	Default any
}

// ClassDef describes one class of the datamodel subset.
type ClassDef struct {
	Name   string
	Fields []Field
	// NoPersist classes (session) are kept in memory only.
	NoPersist bool
}

// Never is xapi's "never" date (the epoch).
var Never = time.Unix(0, 0).UTC()

func (f Field) zero() any {
	if f.Default != nil {
		return cloneValue(f.Default)
	}
	switch f.Kind {
	case KInt:
		return int64(0)
	case KBool:
		return false
	case KFloat:
		return float64(0)
	case KDate:
		return Never
	case KRef:
		return NullRef
	case KSet, KRefSet:
		return []string{}
	case KMap:
		return map[string]string{}
	}
	return ""
}

// NullRef is xapi's null reference.
const NullRef = "OpaqueRef:NULL"

// compact schema DSL: "name kind[:Class|:Child.field] [rw]". Kinds:
// s string, i int, b bool, f float, d date, r ref, e enum, S set, R ref set,
// m map.
func def(name string, specs ...string) *ClassDef {
	c := &ClassDef{Name: name}
	c.Fields = append(c.Fields, Field{Name: "uuid", Kind: KString})
	for _, spec := range specs {
		parts := strings.Fields(spec)
		f := Field{Name: parts[0]}
		kind := parts[1]
		if i := strings.IndexByte(kind, ':'); i >= 0 {
			arg := kind[i+1:]
			kind = kind[:i]
			if strings.Contains(arg, ".") {
				f.Derived = arg
				f.Class = arg[:strings.IndexByte(arg, '.')]
			} else {
				f.Class = arg
			}
		}
		f.Kind = map[string]Kind{"s": KString, "i": KInt, "b": KBool, "f": KFloat, "d": KDate,
			"r": KRef, "e": KEnum, "S": KSet, "R": KRefSet, "m": KMap}[kind]
		for _, p := range parts[2:] {
			switch {
			case p == "rw":
				f.RW = true
			case strings.HasPrefix(p, "="):
				f.Default = defaultFor(f.Kind, p[1:])
			}
		}
		c.Fields = append(c.Fields, f)
	}
	return c
}

func defaultFor(k Kind, s string) any {
	switch k {
	case KInt:
		n, _ := parseInt64(s)
		return n
	case KBool:
		return s == "true"
	case KFloat:
		f, _ := parseFloat(s)
		return f
	}
	return s
}

// Field looks a field up by name.
func (c *ClassDef) Field(name string) (Field, bool) {
	for _, f := range c.Fields {
		if f.Name == name {
			return f, true
		}
	}
	return Field{}, false
}

// Classes is the datamodel subset the simulator serves. Add a field here and
// it appears in records, get_<field>, set_<field> (if rw), events and
// persistence.
var Classes = map[string]*ClassDef{}

// classOrder lists classes in a stable order (listMethods, events "*").
var classOrder []string

func register(c *ClassDef) {
	Classes[c.Name] = c
	classOrder = append(classOrder, c.Name)
}

func initSchema() {
	register(def("pool",
		"name_label s rw", "name_description s rw", "master r:host", "default_SR r:SR rw",
		"suspend_image_SR r:SR rw", "crash_dump_SR r:SR rw", "other_config m rw", "tags S rw",
		"migration_compression b rw", "ha_enabled b", "gui_config m rw", "allowed_operations S",
		"current_operations m"))
	register(def("host",
		"name_label s rw", "name_description s rw", "allowed_operations S", "current_operations m",
		"API_version_major i =2", "API_version_minor i =21", "API_version_vendor s =XenServer",
		"API_version_vendor_implementation m", "enabled b =true", "software_version m",
		"other_config m rw", "capabilities S", "cpu_configuration m", "sched_policy s",
		"supported_bootloaders S", "resident_VMs R:VM.resident_on", "logging m rw",
		"PIFs R:PIF.host", "suspend_image_sr r:SR rw", "crash_dump_sr r:SR rw",
		"PBDs R:PBD.host", "hostname s", "address s", "memory_overhead i", "cpu_info m",
		"tags S rw", "control_domain r:VM", "edition s =xcp-ng", "license_params m"))
	register(def("VM",
		"allowed_operations S", "current_operations m", "name_label s rw", "name_description s rw",
		"power_state e =Halted", "user_version i rw =1", "is_a_template b rw", "is_default_template b",
		"suspend_VDI r:VDI", "resident_on r:host", "scheduled_to_be_resident_on r:host",
		"affinity r:host rw", "memory_overhead i", "memory_target i", "memory_static_max i rw",
		"memory_dynamic_max i rw", "memory_dynamic_min i rw", "memory_static_min i rw",
		"VCPUs_params m rw", "VCPUs_max i rw =1", "VCPUs_at_startup i rw =1",
		"actions_after_shutdown e rw =destroy", "actions_after_reboot e rw =restart",
		"actions_after_crash e rw =restart", "VIFs R:VIF.VM", "VBDs R:VBD.VM",
		"is_control_domain b", "domid i =-1", "domarch s", "HVM_boot_policy s rw",
		"HVM_boot_params m rw", "platform m rw", "PV_bootloader s rw", "PV_args s rw",
		"other_config m rw", "xenstore_data m rw", "is_a_snapshot b", "snapshot_of r:VM",
		"snapshots R:VM.snapshot_of", "snapshot_time d", "tags S rw", "blocked_operations m rw",
		"start_time d", "last_boot_CPU_flags m", "ha_restart_priority s rw",
		"guest_metrics r:VM_guest_metrics", "metrics r:VM_metrics"))
	// VM_metrics has no constructor on the wire: xapi creates one with
	// every VM (and dbsync_master for a VM that lacks one). Served subset
	// of the datamodel's fields; VCPUs_utilisation ("Removed") and
	// VCPUs_flags (int -> string set) are left out.
	register(def("VM_metrics",
		"memory_actual i", "VCPUs_number i", "VCPUs_CPU m", "VCPUs_params m", "state S",
		"start_time d", "install_time d", "last_updated d", "other_config m rw", "hvm b",
		"nested_virt b", "nomigrate b", "current_domain_type e =unspecified",
		"numa_optimised b", "numa_nodes i", "numa_node_memory m"))
	// VM_guest_metrics has no constructor on the wire (xapi creates it when
	// the guest agent first reports). memory and disks are "Removed" in
	// the datamodel but still in every record, always {}.
	register(def("VM_guest_metrics",
		"os_version m", "netbios_name m", "PV_drivers_version m", "PV_drivers_up_to_date b",
		"memory m", "disks m", "networks m", "other m", "last_updated d", "other_config m rw",
		"live b", "can_use_hotplug_vbd e =unspecified", "can_use_hotplug_vif e =unspecified",
		"PV_drivers_detected b", "services m"))
	register(def("VBD",
		"allowed_operations S", "current_operations m", "VM r:VM", "VDI r:VDI", "device s",
		"userdevice s rw", "bootable b rw", "mode e rw =RW", "type e rw =Disk", "unpluggable b rw =true",
		"storage_lock b", "empty b", "other_config m rw", "currently_attached b",
		"status_code i", "status_detail s", "runtime_properties m", "qos_algorithm_type s rw",
		"qos_algorithm_params m rw"))
	register(def("VDI",
		"name_label s rw", "name_description s rw", "allowed_operations S", "current_operations m",
		"SR r:SR", "VBDs R:VBD.VDI", "crash_dumps S", "virtual_size i", "physical_utilisation i",
		"type e =user", "sharable b", "read_only b", "other_config m rw", "storage_lock b",
		"location s", "managed b =true", "missing b", "parent r:VDI", "xenstore_data m rw",
		"sm_config m rw", "is_a_snapshot b", "snapshot_of r:VDI", "snapshots R:VDI.snapshot_of",
		"snapshot_time d", "tags S rw", "allow_caching b rw", "on_boot e rw =persist",
		"metadata_of_pool r:pool", "metadata_latest b", "is_tools_iso b", "cbt_enabled b"))
	register(def("SR",
		"name_label s rw", "name_description s rw", "allowed_operations S", "current_operations m",
		"VDIs R:VDI.SR", "PBDs R:PBD.SR", "virtual_allocation i", "physical_utilisation i",
		"physical_size i", "type s", "content_type s", "shared b rw", "other_config m rw",
		"tags S rw", "sm_config m rw", "local_cache_enabled b", "is_tools_sr b"))
	register(def("PBD",
		"host r:host", "SR r:SR", "device_config m", "currently_attached b", "other_config m rw"))
	register(def("network",
		"name_label s rw", "name_description s rw", "allowed_operations S", "current_operations m",
		"VIFs R:VIF.network", "PIFs R:PIF.network", "MTU i rw =1500", "other_config m rw",
		"bridge s", "managed b =true", "tags S rw", "purpose S", "default_locking_mode s =unlocked"))
	register(def("PIF",
		"device s", "network r:network", "host r:host", "MAC s", "MTU i", "VLAN i =-1",
		"physical b =true", "currently_attached b =true", "ip_configuration_mode e =Static",
		"IP s", "netmask s", "gateway s", "DNS s", "management b", "other_config m rw",
		"ipv6_configuration_mode e =None", "IPv6 S", "primary_address_type e =IPv4", "managed b =true"))
	register(def("VIF",
		"allowed_operations S", "current_operations m", "device s", "network r:network",
		"VM r:VM", "MAC s", "MTU i =1500", "other_config m rw", "currently_attached b",
		"status_code i", "status_detail s", "runtime_properties m", "locking_mode e rw =network_default",
		"MAC_autogenerated b"))
	register(def("task",
		"name_label s", "name_description s", "allowed_operations S", "current_operations m",
		"created d", "finished d", "status e =pending", "resident_on r:host", "progress f",
		"type s =<none/>", "result s", "error_info S", "other_config m rw", "subtask_of r:task",
		"subtasks R:task.subtask_of", "backtrace s =()"))
	c := def("session",
		"this_host r:host", "this_user s", "last_active d", "pool b", "other_config m rw",
		"is_local_superuser b =true", "subject r:subject", "validation_time d", "auth_user_sid s",
		"auth_user_name s", "rbac_permissions S", "parent r:session", "originator s")
	c.NoPersist = true
	register(c)
}

// nameLabelled reports whether class c has a name_label field.
func nameLabelled(c *ClassDef) bool {
	_, ok := c.Field("name_label")
	return ok
}
