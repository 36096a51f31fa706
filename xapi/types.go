package xapi

import (
	"strings"
	"time"
)

// NullRef is xapi's null reference ("OpaqueRef:NULL").
const NullRef = "OpaqueRef:NULL"

// IsNullRef reports whether s is a null reference: "", "OpaqueRef:NULL", or an
// XO-style "Ref:..." placeholder.
func IsNullRef(s string) bool {
	return s == "" || s == NullRef || strings.HasPrefix(s, "Ref:")
}

// Distinct reference types, so a VDIRef cannot be passed where a VMRef is
// expected. Session refs are secrets: never log them.
type (
	SessionRef string
	PoolRef    string
	HostRef    string
	VMRef      string
	VBDRef     string
	VDIRef     string
	SRRef      string
	VIFRef     string
	NetworkRef string
	PIFRef     string
	PBDRef     string
	TaskRef    string
)

func (r PoolRef) IsNull() bool    { return IsNullRef(string(r)) }
func (r HostRef) IsNull() bool    { return IsNullRef(string(r)) }
func (r VMRef) IsNull() bool      { return IsNullRef(string(r)) }
func (r VBDRef) IsNull() bool     { return IsNullRef(string(r)) }
func (r VDIRef) IsNull() bool     { return IsNullRef(string(r)) }
func (r SRRef) IsNull() bool      { return IsNullRef(string(r)) }
func (r VIFRef) IsNull() bool     { return IsNullRef(string(r)) }
func (r NetworkRef) IsNull() bool { return IsNullRef(string(r)) }
func (r PIFRef) IsNull() bool     { return IsNullRef(string(r)) }
func (r PBDRef) IsNull() bool     { return IsNullRef(string(r)) }
func (r TaskRef) IsNull() bool    { return IsNullRef(string(r)) }

// String hides the session ref so that it cannot leak into logs by accident.
func (r SessionRef) String() string {
	if r == "" {
		return ""
	}
	return "OpaqueRef:(redacted)"
}

// enum is implemented by every enum type; the decoder maps wire strings onto
// the known values case-insensitively and anything else onto "unrecognized".
type enum interface {
	enumValues() []string
}

// Unrecognized is the value every enum type takes for a wire value this client
// does not know (a newer xapi). It is never a decode error.
const Unrecognized = "unrecognized"

func parseEnum(s string, known []string) string {
	for _, k := range known {
		if strings.EqualFold(s, k) {
			return k
		}
	}
	return Unrecognized
}

// VMPowerState is vm_power_state.
type VMPowerState string

const (
	VMPowerStateHalted       VMPowerState = "Halted"
	VMPowerStatePaused       VMPowerState = "Paused"
	VMPowerStateRunning      VMPowerState = "Running"
	VMPowerStateSuspended    VMPowerState = "Suspended"
	VMPowerStateUnrecognized VMPowerState = Unrecognized
)

func (VMPowerState) enumValues() []string {
	return []string{"Halted", "Paused", "Running", "Suspended"}
}

// ParseVMPowerState parses case-insensitively, with an Unrecognized fallback.
func ParseVMPowerState(s string) VMPowerState {
	return VMPowerState(parseEnum(s, VMPowerState("").enumValues()))
}

// TaskStatus is task_status_type.
type TaskStatus string

const (
	TaskStatusPending      TaskStatus = "pending"
	TaskStatusSuccess      TaskStatus = "success"
	TaskStatusFailure      TaskStatus = "failure"
	TaskStatusCancelling   TaskStatus = "cancelling"
	TaskStatusCancelled    TaskStatus = "cancelled"
	TaskStatusUnrecognized TaskStatus = Unrecognized
)

func (TaskStatus) enumValues() []string {
	return []string{"pending", "success", "failure", "cancelling", "cancelled"}
}

// ParseTaskStatus parses case-insensitively, with an Unrecognized fallback.
func ParseTaskStatus(s string) TaskStatus {
	return TaskStatus(parseEnum(s, TaskStatus("").enumValues()))
}

// Done reports whether the task has finished (success, failure or cancelled).
func (s TaskStatus) Done() bool {
	return s == TaskStatusSuccess || s == TaskStatusFailure || s == TaskStatusCancelled
}

// VDIType is vdi_type.
type VDIType string

const (
	VDITypeSystem       VDIType = "system"
	VDITypeUser         VDIType = "user"
	VDITypeEphemeral    VDIType = "ephemeral"
	VDITypeSuspend      VDIType = "suspend"
	VDITypeCrashdump    VDIType = "crashdump"
	VDITypeHAStatefile  VDIType = "ha_statefile"
	VDITypeMetadata     VDIType = "metadata"
	VDITypeRedoLog      VDIType = "redo_log"
	VDITypeRRD          VDIType = "rrd"
	VDITypePVSCache     VDIType = "pvs_cache"
	VDITypeCBTMetadata  VDIType = "cbt_metadata"
	VDITypeUnrecognized VDIType = Unrecognized
)

func (VDIType) enumValues() []string {
	return []string{"system", "user", "ephemeral", "suspend", "crashdump", "ha_statefile",
		"metadata", "redo_log", "rrd", "pvs_cache", "cbt_metadata"}
}

// ParseVDIType parses case-insensitively, with an Unrecognized fallback.
func ParseVDIType(s string) VDIType { return VDIType(parseEnum(s, VDIType("").enumValues())) }

// VBDMode is vbd_mode.
type VBDMode string

const (
	VBDModeRO           VBDMode = "RO"
	VBDModeRW           VBDMode = "RW"
	VBDModeUnrecognized VBDMode = Unrecognized
)

func (VBDMode) enumValues() []string { return []string{"RO", "RW"} }

// ParseVBDMode parses case-insensitively, with an Unrecognized fallback.
func ParseVBDMode(s string) VBDMode { return VBDMode(parseEnum(s, VBDMode("").enumValues())) }

// VBDType is vbd_type.
type VBDType string

const (
	VBDTypeCD           VBDType = "CD"
	VBDTypeDisk         VBDType = "Disk"
	VBDTypeFloppy       VBDType = "Floppy"
	VBDTypeUnrecognized VBDType = Unrecognized
)

func (VBDType) enumValues() []string { return []string{"CD", "Disk", "Floppy"} }

// ParseVBDType parses case-insensitively, with an Unrecognized fallback.
func ParseVBDType(s string) VBDType { return VBDType(parseEnum(s, VBDType("").enumValues())) }

// NetworkPurpose is network_purpose.
type NetworkPurpose string

const (
	NetworkPurposeNBD          NetworkPurpose = "nbd"
	NetworkPurposeInsecureNBD  NetworkPurpose = "insecure_nbd"
	NetworkPurposeUnrecognized NetworkPurpose = Unrecognized
)

func (NetworkPurpose) enumValues() []string { return []string{"nbd", "insecure_nbd"} }

// ParseNetworkPurpose parses case-insensitively, with an Unrecognized fallback.
func ParseNetworkPurpose(s string) NetworkPurpose {
	return NetworkPurpose(parseEnum(s, NetworkPurpose("").enumValues()))
}

// EventOperation is the "operation" of an event.from event.
type EventOperation string

const (
	EventOperationAdd          EventOperation = "add"
	EventOperationMod          EventOperation = "mod"
	EventOperationDel          EventOperation = "del"
	EventOperationUnrecognized EventOperation = Unrecognized
)

func (EventOperation) enumValues() []string { return []string{"add", "mod", "del"} }

// OnBoot is on_boot (VDI).
type OnBoot string

const (
	OnBootPersist      OnBoot = "persist"
	OnBootReset        OnBoot = "reset"
	OnBootUnrecognized OnBoot = Unrecognized
)

func (OnBoot) enumValues() []string { return []string{"persist", "reset"} }

// dateLayouts are tried in order by ParseDate (after the official SDK's list).
var dateLayouts = []string{
	"20060102T15:04:05Z07:00",
	"20060102T15:04:05Z0700",
	"20060102T15:04:05Z07",
	"20060102T15:04:05",
	"20060102T150405Z07:00",
	"20060102T150405Z0700",
	"20060102T150405Z07",
	"20060102T150405",
	"2006-01-02T15:04:05Z07:00",
	"2006-01-02T15:04:05Z0700",
	"2006-01-02T15:04:05Z07",
	"2006-01-02T15:04:05",
	"2006-01-02 15:04:05Z07:00",
	"2006-01-02 15:04:05",
	"20060102",
	"2006-01-02",
}

// ParseDate parses the date forms xapi and its databases produce:
// "20250319T04:16:24Z", with or without hyphens and colons, with or without a
// zone (no zone means UTC) and with optional fractional seconds. The empty
// string is the zero time.
func ParseDate(s string) (time.Time, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return time.Time{}, nil
	}
	var firstErr error
	for _, l := range dateLayouts {
		t, err := time.Parse(l, s)
		if err == nil {
			return t.UTC(), nil
		}
		if firstErr == nil {
			firstErr = err
		}
	}
	return time.Time{}, firstErr
}

// IsNever reports whether t is xapi's "never" (the epoch) or the zero time.
func IsNever(t time.Time) bool { return t.IsZero() || t.Unix() <= 0 }

// FormatDate formats t the way xapi does: "20250319T04:16:24Z".
func FormatDate(t time.Time) string { return t.UTC().Format("20060102T15:04:05Z") }
