package xapi

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// goldenServer answers each method with testdata/<method>.xml, recorded in
// xapi's exact style (no whitespace, untyped strings and ints, <value></value>
// in the middle of records, <nil/>, odd dates, <i4> counts).
func goldenServer(t *testing.T) *Client {
	t.Helper()
	f := newFake(t, func(method string, _ []any) string {
		switch method {
		case "session.login_with_password":
			return successXML(xv("OpaqueRef:s1"))
		case "session.logout":
			return successXML(xv(""))
		}
		b, err := os.ReadFile(filepath.Join("testdata", method+".xml"))
		if err != nil {
			return failureXML(CodeMessageMethodUnknown, method)
		}
		return string(b)
	})
	c := newTestClient(t, f.URL(), func(c *Config) { c.DisableMemberDiscovery = true })
	require.NoError(t, c.Login(context.Background()))
	return c
}

func date(s string) time.Time {
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		panic(err)
	}
	return t.UTC()
}

var epoch = time.Unix(0, 0).UTC()

func TestGoldenVMRecord(t *testing.T) {
	c := goldenServer(t)
	got, err := c.VMGetRecord(context.Background(), "OpaqueRef:vm-1")
	require.NoError(t, err)
	assert.Equal(t, VMRecord{
		UUID:              "0b2f6a4c-1e1c-4f77-9d0e-3f1e2a9c8b7d",
		NameLabel:         "demo-vm",
		NameDescription:   "",
		PowerState:        VMPowerStateRunning,
		SnapshotOf:        NullRef,
		Snapshots:         []VMRef{},
		SnapshotTime:      epoch,
		ResidentOn:        "OpaqueRef:host-1",
		Affinity:          NullRef,
		MemoryStaticMax:   4294967296,
		MemoryStaticMin:   1073741824,
		MemoryDynamicMax:  4294967296,
		MemoryDynamicMin:  2147483648,
		MemoryTarget:      4294967296,
		VCPUsMax:          4,
		VCPUsAtStartup:    2,
		Domid:             7,
		VBDs:              []VBDRef{"OpaqueRef:vbd-1", "OpaqueRef:vbd-2"},
		VIFs:              []VIFRef{"OpaqueRef:vif-1"},
		GuestMetrics:      "OpaqueRef:vgm-1",
		Metrics:           "OpaqueRef:vmm-1",
		OtherConfig:       map[string]string{"base_template_name": "Debian Bookworm 12", "mac_seed": "a1b2", "empty": ""},
		Platform:          map[string]string{"viridian": "true", "acpi": "1"},
		BlockedOperations: map[string]string{"destroy": "protected"},
		AllowedOperations: []string{"pause", "suspend", "migrate_send"},
		CurrentOperations: map[string]string{},
		HVMBootPolicy:     "BIOS order",
		PVBootloader:      "",
		Tags:              []string{"wan", "", "prod"},
	}, got)
	assert.True(t, IsNever(got.SnapshotTime))
}

func TestGoldenVDIRecord(t *testing.T) {
	c := goldenServer(t)
	got, err := c.VDIGetRecord(context.Background(), "OpaqueRef:vdi-1")
	require.NoError(t, err)
	assert.Equal(t, VDIRecord{
		UUID:                "7c1d2e3f-0000-4000-8000-00000000abcd",
		NameLabel:           "demo-vm disk 0",
		SR:                  "OpaqueRef:sr-1",
		VBDs:                []VBDRef{"OpaqueRef:vbd-1"},
		VirtualSize:         10737418240,
		PhysicalUtilisation: 0,
		Type:                VDITypeUser,
		OtherConfig:         map[string]string{"content_id": "abc&<def>"},
		SMConfig:            map[string]string{"vhd-parent": "11111111-2222-3333-4444-555555555555", "image-format": "vhd"},
		XenstoreData:        map[string]string{},
		Location:            "7c1d2e3f-0000-4000-8000-00000000abcd",
		Managed:             true,
		IsASnapshot:         true,
		SnapshotOf:          "OpaqueRef:vdi-base",
		Snapshots:           []VDIRef{},
		SnapshotTime:        date("2025-03-19T04:16:24Z"),
		Tags:                []string{},
		CBTEnabled:          true,
		OnBoot:              OnBootPersist,
		AllowedOperations:   []string{"snapshot", "clone"},
		CurrentOperations:   map[string]string{"OpaqueRef:task-9": "snapshot"},
	}, got)
}

func TestGoldenHostAllRecords(t *testing.T) {
	c := goldenServer(t)
	got, err := c.HostGetAllRecords(context.Background())
	require.NoError(t, err)
	assert.Equal(t, map[HostRef]HostRecord{
		"OpaqueRef:host-1": {
			UUID: "h1", NameLabel: "xcp-a1", NameDescription: "Default install", Hostname: "xcp-a1",
			Address: "192.0.2.10", Enabled: true, APIVersionMajor: 2, APIVersionMinor: 21,
			APIVersionVendor: "XenSource", SoftwareVersion: map[string]string{"product_version": "8.3.0", "xapi": "24.19"},
			CPUInfo: map[string]string{"cpu_count": "8"}, OtherConfig: map[string]string{}, PIFs: []PIFRef{"OpaqueRef:pif-1"},
			PBDs: []PBDRef{}, ResidentVMs: []VMRef{"OpaqueRef:dom0-1", "OpaqueRef:vm-1"}, ControlDomain: "OpaqueRef:dom0-1",
			MemoryOverhead: 123456789012, AllowedOperations: []string{}, CurrentOperations: map[string]string{},
			SuspendImageSR: "OpaqueRef:sr-1", CrashDumpSR: NullRef,
		},
		"OpaqueRef:host-2": {
			UUID: "h2", NameLabel: "xcp-a2", Hostname: "xcp-a2", Address: "fd00::2",
			APIVersionMajor: 2, APIVersionMinor: 21, APIVersionVendor: "XenSource",
			SoftwareVersion: map[string]string{}, CPUInfo: map[string]string{}, OtherConfig: map[string]string{},
			PIFs: []PIFRef{}, PBDs: []PBDRef{}, ResidentVMs: []VMRef{}, ControlDomain: "OpaqueRef:dom0-2",
			AllowedOperations: []string{}, CurrentOperations: map[string]string{},
			SuspendImageSR: NullRef, CrashDumpSR: NullRef,
		},
	}, got)
}

var goldenTask = TaskRecord{
	UUID: "t1", NameLabel: "Async.VDI.snapshot", Status: TaskStatusPending, Progress: 0.42,
	Result: "<value>OpaqueRef:vdi-snap</value>", ErrorInfo: []string{}, Type: "<none/>",
	Created: date("2025-03-19T01:16:24Z"), Finished: epoch, ResidentOn: "OpaqueRef:host-1",
	SubtaskOf: NullRef, Subtasks: []TaskRef{}, OtherConfig: map[string]string{"applies_to": "OpaqueRef:vm-1"},
	AllowedOperations: []string{}, CurrentOperations: map[string]string{"OpaqueRef:t2": "cancel"}, Backtrace: "()",
}

func TestGoldenTaskRecord(t *testing.T) {
	c := goldenServer(t)
	got, err := c.TaskGetRecord(context.Background(), "OpaqueRef:task-1")
	require.NoError(t, err)
	assert.Equal(t, goldenTask, got)
	assert.True(t, got.CancelRequested())
	assert.False(t, got.Status.Done())
	res := TaskResult{Record: got}
	var snap VDIRef
	require.NoError(t, res.Decode(&snap))
	assert.Equal(t, VDIRef("OpaqueRef:vdi-snap"), snap)
}

func TestGoldenEventFrom(t *testing.T) {
	c := goldenServer(t)
	got, err := c.EventFrom(context.Background(), []string{"task", "vm"}, "", 30)
	require.NoError(t, err)
	assert.Equal(t, "00000000000000001235,00000000000000000000", got.Token)
	assert.Equal(t, map[string]int64{"task": 2, "vm": 1}, got.ValidRefCounts)
	require.Len(t, got.Events, 2)
	ev := got.Events[0]
	assert.Equal(t, "1234", ev.ID)
	assert.Equal(t, "0.0", ev.Timestamp)
	assert.Equal(t, "task", ev.Class)
	assert.Equal(t, EventOperationMod, ev.Operation)
	assert.Equal(t, "OpaqueRef:task-1", ev.Ref)
	assert.Equal(t, "Pending", ev.Snapshot["status"], "snapshot is the raw map")
	assert.Equal(t, "", ev.Snapshot["name_description"])
	var rec TaskRecord
	require.NoError(t, ev.Decode(&rec))
	assert.Equal(t, goldenTask, rec)
	del := got.Events[1]
	assert.Equal(t, EventOperationDel, del.Operation)
	assert.Equal(t, "vm", del.Class)
	assert.Nil(t, del.Snapshot)
}

func TestGoldenNBDInfo(t *testing.T) {
	c := goldenServer(t)
	got, err := c.VDIGetNBDInfo(context.Background(), "OpaqueRef:vdi-1")
	require.NoError(t, err)
	assert.Equal(t, []VDINBDServerInfo{
		{Exportname: "/7c1d2e3f-0000-4000-8000-00000000abcd?session_id=OpaqueRef:s1", Address: "192.0.2.10", Port: 10809,
			Cert: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", Subject: "xcp-a1"},
		{Exportname: "/7c1d2e3f-0000-4000-8000-00000000abcd?session_id=OpaqueRef:s1", Address: "fd00::10", Port: 10809, Subject: "xcp-a1"},
	}, got)
}

func TestGoldenSmallRecords(t *testing.T) {
	c := goldenServer(t)
	ctx := context.Background()

	pool, err := c.PoolGetRecord(ctx, "OpaqueRef:pool")
	require.NoError(t, err)
	assert.Equal(t, PoolRecord{UUID: "p1", NameLabel: "site-a", Master: "OpaqueRef:host-1", DefaultSR: "OpaqueRef:sr-1",
		OtherConfig: map[string]string{"wanmotion:peer": "site-b", "memory-ratio-hvm": "0.25"}, Tags: []string{}}, pool)

	sr, err := c.SRGetRecord(ctx, "OpaqueRef:sr-1")
	require.NoError(t, err)
	assert.Equal(t, SRRecord{UUID: "s1", NameLabel: "Local storage", Type: "ext", ContentType: "user",
		PhysicalSize: 1099511627776, PhysicalUtilisation: 4096, VirtualAllocation: 10737418240,
		VDIs: []VDIRef{"OpaqueRef:vdi-1"}, PBDs: []PBDRef{"OpaqueRef:pbd-1"}, OtherConfig: map[string]string{},
		SMConfig: map[string]string{"devserial": "x"}, AllowedOperations: []string{"vdi_create"}, CurrentOperations: map[string]string{}}, sr)

	vif, err := c.VIFGetRecord(ctx, "OpaqueRef:vif-1")
	require.NoError(t, err)
	assert.Equal(t, VIFRecord{UUID: "v1", Device: "0", Network: "OpaqueRef:net-1", VM: "OpaqueRef:vm-1",
		MAC: "aa:bb:cc:dd:ee:ff", MACAutogenerated: true, MTU: 1500, CurrentlyAttached: true, OtherConfig: map[string]string{}}, vif)

	n, err := c.NetworkGetRecord(ctx, "OpaqueRef:net-1")
	require.NoError(t, err)
	assert.Equal(t, NetworkRecord{UUID: "n1", NameLabel: "Pool-wide network associated with eth0", Bridge: "xenbr0",
		MTU: 9000, Managed: true, PIFs: []PIFRef{"OpaqueRef:pif-1"}, VIFs: []VIFRef{},
		Purpose: []NetworkPurpose{NetworkPurposeNBD, NetworkPurposeUnrecognized}, OtherConfig: map[string]string{}}, n)

	pif, err := c.PIFGetRecord(ctx, "OpaqueRef:pif-1")
	require.NoError(t, err)
	assert.Equal(t, PIFRecord{UUID: "pf1", Device: "eth0", Network: "OpaqueRef:net-1", Host: "OpaqueRef:host-1",
		MAC: "00:16:3e:00:00:01", MTU: 1500, VLAN: -1, Physical: true, CurrentlyAttached: true, Management: true,
		IPConfigurationMode: "Static", IP: "192.0.2.10", Netmask: "255.255.255.0", IPv6ConfigurationMode: "None",
		IPv6: []string{"fd00::10/64"}, PrimaryAddressType: "IPv4", OtherConfig: map[string]string{}}, pif)

	vbd, err := c.VBDGetRecord(ctx, "OpaqueRef:vbd-1")
	require.NoError(t, err)
	assert.Equal(t, VBDRecord{UUID: "b1", VM: "OpaqueRef:vm-1", VDI: "OpaqueRef:vdi-1", Device: "xvda", Userdevice: "0",
		Bootable: true, Mode: VBDModeRW, Type: VBDTypeDisk, CurrentlyAttached: true,
		OtherConfig: map[string]string{"owner": ""}, AllowedOperations: []string{"unplug"}, CurrentOperations: map[string]string{}}, vbd)
}

// TestGoldenGenericCall checks the escape hatch keeps empty strings as "".
func TestGoldenGenericCall(t *testing.T) {
	c := goldenServer(t)
	v, err := c.Call(context.Background(), "VM.get_record", "OpaqueRef:vm-1")
	require.NoError(t, err)
	m, ok := v.(map[string]any)
	require.True(t, ok)
	assert.Equal(t, "", m["name_description"])
	assert.Equal(t, "", m["PV_bootloader"], "<nil/> decodes as the empty string")
	assert.Equal(t, "4294967296", m["memory_static_max"], "ints stay exact strings")
	assert.Equal(t, "19700101T00:00:00Z", m["snapshot_time"])
	assert.Equal(t, []any{"wan", "", "prod"}, m["tags"])
	assert.False(t, strings.Contains(c.URL(), "session"))
}
