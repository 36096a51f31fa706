package xapi

import "time"

// Record structs carry `xapi:"wire_name"` tags. They are filled by this
// package's converter from the decoded XML-RPC struct: xapi ints (sent as
// decimal strings) become int64 exactly, dates are parsed tolerantly, enums
// fall back to Unrecognized, absent members stay zero and unknown members are
// ignored. Only the fields wanmotion uses are listed.

// PoolRecord is a subset of the pool class.
type PoolRecord struct {
	UUID                 string            `xapi:"uuid"`
	NameLabel            string            `xapi:"name_label"`
	NameDescription      string            `xapi:"name_description"`
	Master               HostRef           `xapi:"master"`
	DefaultSR            SRRef             `xapi:"default_SR"`
	OtherConfig          map[string]string `xapi:"other_config"`
	MigrationCompression bool              `xapi:"migration_compression"`
	Tags                 []string          `xapi:"tags"`
}

// HostRecord is a subset of the host class.
type HostRecord struct {
	UUID              string            `xapi:"uuid"`
	NameLabel         string            `xapi:"name_label"`
	NameDescription   string            `xapi:"name_description"`
	Hostname          string            `xapi:"hostname"`
	Address           string            `xapi:"address"`
	Enabled           bool              `xapi:"enabled"`
	APIVersionMajor   int64             `xapi:"API_version_major"`
	APIVersionMinor   int64             `xapi:"API_version_minor"`
	APIVersionVendor  string            `xapi:"API_version_vendor"`
	SoftwareVersion   map[string]string `xapi:"software_version"`
	CPUInfo           map[string]string `xapi:"cpu_info"`
	OtherConfig       map[string]string `xapi:"other_config"`
	PIFs              []PIFRef          `xapi:"PIFs"`
	PBDs              []PBDRef          `xapi:"PBDs"`
	ResidentVMs       []VMRef           `xapi:"resident_VMs"`
	ControlDomain     VMRef             `xapi:"control_domain"`
	MemoryOverhead    int64             `xapi:"memory_overhead"`
	AllowedOperations []string          `xapi:"allowed_operations"`
	CurrentOperations map[string]string `xapi:"current_operations"`
	SuspendImageSR    SRRef             `xapi:"suspend_image_sr"`
	CrashDumpSR       SRRef             `xapi:"crash_dump_sr"`
}

// VMRecord is a subset of the VM class.
type VMRecord struct {
	UUID              string            `xapi:"uuid"`
	NameLabel         string            `xapi:"name_label"`
	NameDescription   string            `xapi:"name_description"`
	PowerState        VMPowerState      `xapi:"power_state"`
	IsATemplate       bool              `xapi:"is_a_template"`
	IsASnapshot       bool              `xapi:"is_a_snapshot"`
	IsControlDomain   bool              `xapi:"is_control_domain"`
	SnapshotOf        VMRef             `xapi:"snapshot_of"`
	Snapshots         []VMRef           `xapi:"snapshots"`
	SnapshotTime      time.Time         `xapi:"snapshot_time"`
	ResidentOn        HostRef           `xapi:"resident_on"`
	Affinity          HostRef           `xapi:"affinity"`
	MemoryStaticMax   int64             `xapi:"memory_static_max"`
	MemoryStaticMin   int64             `xapi:"memory_static_min"`
	MemoryDynamicMax  int64             `xapi:"memory_dynamic_max"`
	MemoryDynamicMin  int64             `xapi:"memory_dynamic_min"`
	MemoryTarget      int64             `xapi:"memory_target"`
	VCPUsMax          int64             `xapi:"VCPUs_max"`
	VCPUsAtStartup    int64             `xapi:"VCPUs_at_startup"`
	Domid             int64             `xapi:"domid"`
	VBDs              []VBDRef          `xapi:"VBDs"`
	VIFs              []VIFRef          `xapi:"VIFs"`
	GuestMetrics      VMGuestMetricsRef `xapi:"guest_metrics"` // null without a guest agent
	Metrics           VMMetricsRef      `xapi:"metrics"`       // the domain's live figures (VM_metrics)
	OtherConfig       map[string]string `xapi:"other_config"`
	Platform          map[string]string `xapi:"platform"`
	BlockedOperations map[string]string `xapi:"blocked_operations"`
	AllowedOperations []string          `xapi:"allowed_operations"`
	CurrentOperations map[string]string `xapi:"current_operations"`
	HVMBootPolicy     string            `xapi:"HVM_boot_policy"`
	PVBootloader      string            `xapi:"PV_bootloader"`
	Tags              []string          `xapi:"tags"`
}

// VBDRecord is a subset of the VBD class.
type VBDRecord struct {
	UUID              string            `xapi:"uuid"`
	VM                VMRef             `xapi:"VM"`
	VDI               VDIRef            `xapi:"VDI"`
	Device            string            `xapi:"device"`
	Userdevice        string            `xapi:"userdevice"`
	Bootable          bool              `xapi:"bootable"`
	Mode              VBDMode           `xapi:"mode"`
	Type              VBDType           `xapi:"type"`
	Unpluggable       bool              `xapi:"unpluggable"`
	CurrentlyAttached bool              `xapi:"currently_attached"`
	Empty             bool              `xapi:"empty"`
	OtherConfig       map[string]string `xapi:"other_config"`
	AllowedOperations []string          `xapi:"allowed_operations"`
	CurrentOperations map[string]string `xapi:"current_operations"`
}

// VDIRecord is a subset of the VDI class.
type VDIRecord struct {
	UUID                string            `xapi:"uuid"`
	NameLabel           string            `xapi:"name_label"`
	NameDescription     string            `xapi:"name_description"`
	SR                  SRRef             `xapi:"SR"`
	VBDs                []VBDRef          `xapi:"VBDs"`
	VirtualSize         int64             `xapi:"virtual_size"`
	PhysicalUtilisation int64             `xapi:"physical_utilisation"`
	Type                VDIType           `xapi:"type"`
	Sharable            bool              `xapi:"sharable"`
	ReadOnly            bool              `xapi:"read_only"`
	OtherConfig         map[string]string `xapi:"other_config"`
	SMConfig            map[string]string `xapi:"sm_config"`
	XenstoreData        map[string]string `xapi:"xenstore_data"`
	Location            string            `xapi:"location"`
	Managed             bool              `xapi:"managed"`
	Missing             bool              `xapi:"missing"`
	IsASnapshot         bool              `xapi:"is_a_snapshot"`
	SnapshotOf          VDIRef            `xapi:"snapshot_of"`
	Snapshots           []VDIRef          `xapi:"snapshots"`
	SnapshotTime        time.Time         `xapi:"snapshot_time"`
	Tags                []string          `xapi:"tags"`
	CBTEnabled          bool              `xapi:"cbt_enabled"`
	OnBoot              OnBoot            `xapi:"on_boot"`
	AllowCaching        bool              `xapi:"allow_caching"`
	AllowedOperations   []string          `xapi:"allowed_operations"`
	CurrentOperations   map[string]string `xapi:"current_operations"`
}

// SRRecord is a subset of the SR class.
type SRRecord struct {
	UUID                string            `xapi:"uuid"`
	NameLabel           string            `xapi:"name_label"`
	NameDescription     string            `xapi:"name_description"`
	Type                string            `xapi:"type"`
	ContentType         string            `xapi:"content_type"`
	Shared              bool              `xapi:"shared"`
	PhysicalSize        int64             `xapi:"physical_size"`
	PhysicalUtilisation int64             `xapi:"physical_utilisation"`
	VirtualAllocation   int64             `xapi:"virtual_allocation"`
	VDIs                []VDIRef          `xapi:"VDIs"`
	PBDs                []PBDRef          `xapi:"PBDs"`
	OtherConfig         map[string]string `xapi:"other_config"`
	SMConfig            map[string]string `xapi:"sm_config"`
	AllowedOperations   []string          `xapi:"allowed_operations"`
	CurrentOperations   map[string]string `xapi:"current_operations"`
}

// VIFRecord is a subset of the VIF class.
type VIFRecord struct {
	UUID              string            `xapi:"uuid"`
	Device            string            `xapi:"device"`
	Network           NetworkRef        `xapi:"network"`
	VM                VMRef             `xapi:"VM"`
	MAC               string            `xapi:"MAC"`
	MACAutogenerated  bool              `xapi:"MAC_autogenerated"`
	MTU               int64             `xapi:"MTU"`
	CurrentlyAttached bool              `xapi:"currently_attached"`
	OtherConfig       map[string]string `xapi:"other_config"`
}

// NetworkRecord is a subset of the network class.
type NetworkRecord struct {
	UUID            string            `xapi:"uuid"`
	NameLabel       string            `xapi:"name_label"`
	NameDescription string            `xapi:"name_description"`
	Bridge          string            `xapi:"bridge"`
	MTU             int64             `xapi:"MTU"`
	Managed         bool              `xapi:"managed"`
	PIFs            []PIFRef          `xapi:"PIFs"`
	VIFs            []VIFRef          `xapi:"VIFs"`
	Purpose         []NetworkPurpose  `xapi:"purpose"`
	OtherConfig     map[string]string `xapi:"other_config"`
}

// PIFRecord is a subset of the PIF class.
type PIFRecord struct {
	UUID                  string            `xapi:"uuid"`
	Device                string            `xapi:"device"`
	Network               NetworkRef        `xapi:"network"`
	Host                  HostRef           `xapi:"host"`
	MAC                   string            `xapi:"MAC"`
	MTU                   int64             `xapi:"MTU"`
	VLAN                  int64             `xapi:"VLAN"`
	Physical              bool              `xapi:"physical"`
	CurrentlyAttached     bool              `xapi:"currently_attached"`
	Management            bool              `xapi:"management"`
	IPConfigurationMode   string            `xapi:"ip_configuration_mode"`
	IP                    string            `xapi:"IP"`
	Netmask               string            `xapi:"netmask"`
	Gateway               string            `xapi:"gateway"`
	DNS                   string            `xapi:"DNS"`
	IPv6ConfigurationMode string            `xapi:"ipv6_configuration_mode"`
	IPv6                  []string          `xapi:"IPv6"`
	PrimaryAddressType    string            `xapi:"primary_address_type"`
	OtherConfig           map[string]string `xapi:"other_config"`
}

// TaskRecord is a subset of the task class.
type TaskRecord struct {
	UUID              string            `xapi:"uuid"`
	NameLabel         string            `xapi:"name_label"`
	NameDescription   string            `xapi:"name_description"`
	Status            TaskStatus        `xapi:"status"`
	Progress          float64           `xapi:"progress"`
	Result            string            `xapi:"result"`
	ErrorInfo         []string          `xapi:"error_info"`
	Type              string            `xapi:"type"`
	Created           time.Time         `xapi:"created"`
	Finished          time.Time         `xapi:"finished"`
	ResidentOn        HostRef           `xapi:"resident_on"`
	SubtaskOf         TaskRef           `xapi:"subtask_of"`
	Subtasks          []TaskRef         `xapi:"subtasks"`
	OtherConfig       map[string]string `xapi:"other_config"`
	AllowedOperations []string          `xapi:"allowed_operations"`
	CurrentOperations map[string]string `xapi:"current_operations"`
	Backtrace         string            `xapi:"backtrace"`
}

// CancelRequested reports whether someone called task.cancel on this task
// (xapi records it in current_operations; the status does not change).
func (t *TaskRecord) CancelRequested() bool {
	for _, op := range t.CurrentOperations {
		if op == "cancel" {
			return true
		}
	}
	return false
}

// VDINBDServerInfo is vdi_nbd_server_info (from VDI.get_nbd_info).
type VDINBDServerInfo struct {
	Exportname string `xapi:"exportname"`
	Address    string `xapi:"address"`
	Port       int64  `xapi:"port"`
	Cert       string `xapi:"cert"`
	Subject    string `xapi:"subject"`
}
