package l2tunnel

import (
	"fmt"
	"net"
	"sort"
	"strings"

	"github.com/vmihailenco/msgpack/v5"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Modes of the data plane.
const (
	// ModeKernel creates Linux kernel VXLAN interfaces (netlink) and
	// enslaves them to Linux bridges.
	ModeKernel = "kernel"
	// ModeOVS adds VXLAN ports to Open vSwitch bridges with ovs-vsctl
	// (XenServer / XCP-ng hosts use OVS). Not verified against ovs-vswitchd.
	ModeOVS = "ovs"
)

// Defaults.
const (
	DefaultPort               = 4789
	DefaultVNIBase            = 0x400000
	DefaultVNICount           = 0x400000
	DefaultAnnounceCount      = 3
	DefaultAnnounceIntervalMS = 50
	// VXLANOverheadV4 is what VXLAN over IPv4 adds to a frame's IP MTU
	// (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
	VXLANOverheadV4 = 50
	// VXLANOverheadV6 is the same over an IPv6 underlay (outer IPv6 40).
	VXLANOverheadV6 = 70
	maxVNI          = 1<<24 - 1
)

// Config is the backend's section of the pool's wanmotion:config (JSON,
// carried as msgpack by key). Every key is optional; see
// docs/network-l2tunnel.md.
type Config struct {
	// Mode is "kernel" (default), "ovs" or "tap" (userspace tunnel over
	// the WAN gateway).
	Mode string `msgpack:"mode"`
	// UnderlayAddresses maps a host UUID to that host's tunnel endpoint
	// (VTEP) address; looked up with XAPI.HostUUID of the request.
	UnderlayAddresses map[string]string `msgpack:"underlay_addresses"`
	// UnderlayAddress is this site's VTEP address when the map has no
	// entry for the host.
	UnderlayAddress string `msgpack:"underlay_address"`
	// UnderlayInterface: take the VTEP address from this interface's first
	// global address when neither of the above is set.
	UnderlayInterface string `msgpack:"underlay_interface"`
	// PeerUnderlayAddress is the other site's VTEP address, used when the
	// peer does not tell it (destination before the source registered,
	// source without a peer endpoint).
	PeerUnderlayAddress string `msgpack:"peer_underlay_address"`
	// VNIBase and VNICount give the range VNIs are derived in.
	VNIBase  int `msgpack:"vni_base"`
	VNICount int `msgpack:"vni_count"`
	// Port is the VXLAN UDP destination port (default 4789).
	Port int `msgpack:"port"`
	// MTU of the tunnel interfaces; 0 means the underlay MTU minus the
	// VXLAN overhead (kernel mode).
	MTU int `msgpack:"mtu"`
	// Bridges maps a network UUID to its bridge on this site, for VIFs
	// whose request carries no bridge.
	Bridges map[string]string `msgpack:"bridges"`
	// Netns, if set, is the network namespace (a name under /run/netns
	// or a path) the kernel data plane works in. Used by tests.
	Netns string `msgpack:"netns"`
	// AnnounceCount and AnnounceIntervalMS: how often Activate sends each
	// announcement and how far apart.
	AnnounceCount      int `msgpack:"announce_count"`
	AnnounceIntervalMS int `msgpack:"announce_interval_ms"`
	// OVSVsctl is the ovs-vsctl binary (default "ovs-vsctl" on PATH) and
	// OVSDB an optional --db= argument (e.g. unix:/run/openvswitch/db.sock).
	OVSVsctl string `msgpack:"ovs_vsctl"`
	OVSDB    string `msgpack:"ovs_db"`
	// OVSNoWait passes --no-wait to ovs-vsctl (do not wait for
	// ovs-vswitchd to apply the change); for tests against a bare ovsdb.
	OVSNoWait bool `msgpack:"ovs_no_wait"`
	// KeepAfterMigration leaves the tunnels in place (both sites) when a
	// migration succeeded, so the VM stays reachable on the stretched
	// segment; they are removed later with "wanmotion-network-l2tunnel
	// remove". Kernel and OVS mode only (a tap needs a process).
	KeepAfterMigration bool `msgpack:"keep_after_migration"`
}

var configKeys = []string{"mode", "underlay_addresses", "underlay_address", "underlay_interface",
	"peer_underlay_address", "vni_base", "vni_count", "port", "mtu", "bridges", "netns",
	"announce_count", "announce_interval_ms", "ovs_vsctl", "ovs_db", "ovs_no_wait", "keep_after_migration"}

// ParseConfig decodes and validates a Configure payload (msgpack, empty
// for defaults). It returns warnings for keys it does not know.
func ParseConfig(b []byte) (Config, []string, error) {
	var c Config
	if err := contract.DecodeOpaque(b, &c); err != nil {
		return c, nil, fmt.Errorf("l2tunnel config: %w", err)
	}
	var warnings []string
	if len(b) > 0 {
		var raw map[string]any
		if err := msgpack.Unmarshal(b, &raw); err == nil {
			var unknown []string
			for k := range raw {
				if !contains(configKeys, k) {
					unknown = append(unknown, k)
				}
			}
			sort.Strings(unknown)
			for _, k := range unknown {
				warnings = append(warnings, fmt.Sprintf("l2tunnel: unknown config key %q ignored", k))
			}
		}
	}
	if err := c.setDefaults(); err != nil {
		return c, nil, err
	}
	return c, warnings, nil
}

func contains(list []string, s string) bool {
	for _, e := range list {
		if e == s {
			return true
		}
	}
	return false
}

func (c *Config) setDefaults() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("l2tunnel config: "+format+": %w", append(a, contract.ErrInvalidArgument)...)
	}
	switch c.Mode {
	case "":
		c.Mode = ModeKernel
	case ModeKernel, ModeOVS, ModeTAP:
	default:
		return bad("mode %q: want %q, %q or %q", c.Mode, ModeKernel, ModeOVS, ModeTAP)
	}
	if c.Port == 0 {
		c.Port = DefaultPort
	}
	if c.Port < 1 || c.Port > 65535 {
		return bad("port %d out of range 1-65535", c.Port)
	}
	if c.VNIBase == 0 {
		c.VNIBase = DefaultVNIBase
	}
	if c.VNICount == 0 {
		c.VNICount = DefaultVNICount
		if c.VNIBase+c.VNICount-1 > maxVNI {
			c.VNICount = maxVNI - c.VNIBase + 1
		}
	}
	if c.VNIBase < 1 || c.VNIBase > maxVNI {
		return bad("vni_base %d out of range 1-%d", c.VNIBase, maxVNI)
	}
	if c.VNICount < 1 || c.VNIBase+c.VNICount-1 > maxVNI {
		return bad("vni_count %d: range %d.. must end at or below %d", c.VNICount, c.VNIBase, maxVNI)
	}
	if c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535) {
		return bad("mtu %d out of range 576-65535 (0 means underlay MTU minus the VXLAN overhead)", c.MTU)
	}
	for h, a := range c.UnderlayAddresses {
		if net.ParseIP(a) == nil {
			return bad("underlay_addresses[%q] = %q is not an IP address", h, a)
		}
	}
	for k, a := range map[string]string{"underlay_address": c.UnderlayAddress, "peer_underlay_address": c.PeerUnderlayAddress} {
		if a != "" && net.ParseIP(a) == nil {
			return bad("%s %q is not an IP address", k, a)
		}
	}
	for n, br := range c.Bridges {
		if err := checkIfName(br); err != nil {
			return bad("bridges[%q]: %v", n, err)
		}
	}
	if c.UnderlayInterface != "" {
		if err := checkIfName(c.UnderlayInterface); err != nil {
			return bad("underlay_interface: %v", err)
		}
	}
	if c.AnnounceCount == 0 {
		c.AnnounceCount = DefaultAnnounceCount
	}
	if c.AnnounceCount < 1 || c.AnnounceCount > 100 {
		return bad("announce_count %d out of range 1-100", c.AnnounceCount)
	}
	if c.AnnounceIntervalMS == 0 {
		c.AnnounceIntervalMS = DefaultAnnounceIntervalMS
	}
	if c.AnnounceIntervalMS < 1 || c.AnnounceIntervalMS > 10000 {
		return bad("announce_interval_ms %d out of range 1-10000", c.AnnounceIntervalMS)
	}
	if c.OVSVsctl == "" {
		c.OVSVsctl = "ovs-vsctl"
	}
	if c.KeepAfterMigration && c.Mode == ModeTAP {
		return bad("%s", errKeepTAP)
	}
	return nil
}

// errKeepTAP explains why tap mode refuses keep_after_migration.
const errKeepTAP = "keep_after_migration needs kernel or ovs mode: a tap tunnel lives only as long as the backend process that pumps its frames, which ends with the migration"

// checkIfName checks a Linux interface name.
func checkIfName(s string) error {
	if s == "" || len(s) > 15 {
		return fmt.Errorf("interface name %q: want 1-15 characters", s)
	}
	if s == "." || s == ".." || strings.ContainsAny(s, "/ \t\n:") {
		return fmt.Errorf("interface name %q: invalid characters", s)
	}
	return nil
}

// Options are per-migration options (NetPrepareRequest.Options, msgpack).
type Options struct {
	// VNIs sets the VNI of a VIF by device number, instead of deriving it.
	VNIs map[string]int `msgpack:"vnis"`
	// MTU overrides the config's MTU for this VM's tunnels.
	MTU int `msgpack:"mtu"`
	// KeepAfterMigration, when set, overrides the config's
	// keep_after_migration for this migration.
	KeepAfterMigration *bool `msgpack:"keep_after_migration"`
}

// ParseOptions decodes and validates per-request options.
func ParseOptions(b []byte) (Options, error) {
	var o Options
	if err := contract.DecodeOpaque(b, &o); err != nil {
		return o, fmt.Errorf("l2tunnel options: %w", err)
	}
	for d, v := range o.VNIs {
		if v < 1 || v > maxVNI {
			return o, fmt.Errorf("l2tunnel options: vnis[%q] = %d out of range 1-%d: %w", d, v, maxVNI, contract.ErrInvalidArgument)
		}
	}
	if o.MTU != 0 && (o.MTU < 576 || o.MTU > 65535) {
		return o, fmt.Errorf("l2tunnel options: mtu %d out of range 576-65535: %w", o.MTU, contract.ErrInvalidArgument)
	}
	return o, nil
}
