package xapi

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// VMGuestMetricsRef is a reference to a VM_guest_metrics object. A VM with
// no guest agent (or whose agent never reported) has a null ref in
// VM.guest_metrics.
type VMGuestMetricsRef string

// IsNull reports whether r is a null reference.
func (r VMGuestMetricsRef) IsNull() bool { return IsNullRef(string(r)) }

// VMGuestMetricsRecord is a subset of the VM_guest_metrics class: what the
// guest agent reports from inside the VM.
type VMGuestMetricsRecord struct {
	UUID             string            `xapi:"uuid"`
	OSVersion        map[string]string `xapi:"os_version"`
	PVDriversVersion map[string]string `xapi:"PV_drivers_version"`
	// Networks holds the guest's addresses keyed "<dev>/ip",
	// "<dev>/ipv4/<n>" and "<dev>/ipv6/<n>", <dev> being the VIF device
	// (see GuestNetworks).
	Networks          map[string]string `xapi:"networks"`
	Other             map[string]string `xapi:"other"`
	LastUpdated       time.Time         `xapi:"last_updated"`
	OtherConfig       map[string]string `xapi:"other_config"`
	Live              bool              `xapi:"live"`
	PVDriversDetected bool              `xapi:"PV_drivers_detected"`
}

// VMGuestMetricsGetRecord returns VM_guest_metrics.get_record.
func (c *Client) VMGuestMetricsGetRecord(ctx context.Context, gm VMGuestMetricsRef) (VMGuestMetricsRecord, error) {
	return call[VMGuestMetricsRecord](ctx, c, "VM_guest_metrics.get_record", gm)
}

// VMGuestMetricsGetNetworks returns VM_guest_metrics.get_networks.
func (c *Client) VMGuestMetricsGetNetworks(ctx context.Context, gm VMGuestMetricsRef) (map[string]string, error) {
	return call[map[string]string](ctx, c, "VM_guest_metrics.get_networks", gm)
}

// GuestAddresses are the addresses a guest agent reported for one VIF,
// each list deduplicated and sorted (netip order).
type GuestAddresses struct {
	IPv4 []string
	IPv6 []string
}

// GuestNetworks parses VM_guest_metrics.networks into addresses per VIF
// device. xapi (ocaml/xapi/xapi_guest_agent.ml, networks) writes keys
// "<dev>/ip" (the first IPv4, for old clients), "<dev>/ipv4/<n>" and
// "<dev>/ipv6/<n>"; <dev> is the VIF device ("0"), taken from the guest's
// attr/vif/<dev> or the number after an interface name (eth0 -> "0").
//
// Parsing is lenient: keys of another form are ignored, values that are not
// an IP address are skipped, a value's family decides its list (an IPv4
// address under an ipv6 key goes to IPv4), IPv4-mapped IPv6 addresses are
// unmapped, zones are dropped, and unspecified, loopback and multicast
// addresses are skipped. Devices with no valid address are absent. A nil
// or empty map gives an empty result.
func GuestNetworks(networks map[string]string) map[string]GuestAddresses {
	type sets struct{ v4, v6 []netip.Addr }
	acc := map[string]*sets{}
	for k, v := range networks {
		dev, ok := guestNetworkDevice(k)
		if !ok {
			continue
		}
		a, ok := parseGuestAddr(v)
		if !ok {
			continue
		}
		s := acc[dev]
		if s == nil {
			s = &sets{}
			acc[dev] = s
		}
		if a.Is4() {
			s.v4 = append(s.v4, a)
		} else {
			s.v6 = append(s.v6, a)
		}
	}
	out := make(map[string]GuestAddresses, len(acc))
	for dev, s := range acc {
		out[dev] = GuestAddresses{IPv4: sortedStrings(s.v4), IPv6: sortedStrings(s.v6)}
	}
	return out
}

// guestNetworkDevice returns <dev> for a key "<dev>/ip", "<dev>/ipv4/<n>"
// or "<dev>/ipv6/<n>" (<n> non-empty).
func guestNetworkDevice(k string) (string, bool) {
	dev, rest, ok := strings.Cut(k, "/")
	if !ok || dev == "" {
		return "", false
	}
	if rest == "ip" {
		return dev, true
	}
	fam, idx, ok := strings.Cut(rest, "/")
	if !ok || (fam != "ipv4" && fam != "ipv6") || idx == "" || strings.Contains(idx, "/") {
		return "", false
	}
	return dev, true
}

func parseGuestAddr(v string) (netip.Addr, bool) {
	a, err := netip.ParseAddr(strings.TrimSpace(v))
	if err != nil {
		return netip.Addr{}, false
	}
	a = a.WithZone("").Unmap()
	if !a.IsValid() || a.IsUnspecified() || a.IsLoopback() || a.IsMulticast() ||
		a == limitedBroadcast {
		return netip.Addr{}, false
	}
	return a, true
}

var limitedBroadcast = netip.AddrFrom4([4]byte{255, 255, 255, 255})

func sortedStrings(as []netip.Addr) []string {
	if len(as) == 0 {
		return nil
	}
	slices.SortFunc(as, netip.Addr.Compare)
	as = slices.Compact(as)
	out := make([]string, len(as))
	for i, a := range as {
		out[i] = a.String()
	}
	return out
}
