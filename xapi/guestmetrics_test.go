package xapi

import (
	"context"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestGoldenVMGuestMetricsRecord(t *testing.T) {
	c := goldenServer(t)
	ctx := context.Background()
	got, err := c.VMGuestMetricsGetRecord(ctx, "OpaqueRef:vgm-1")
	require.NoError(t, err)
	assert.Equal(t, VMGuestMetricsRecord{
		UUID:             "5e1f7c2a-9d3b-4c1e-8f6a-2b7d9e0c4a11",
		OSVersion:        map[string]string{"name": "Debian GNU/Linux 12 (bookworm)", "distro": "debian", "major": "12"},
		PVDriversVersion: map[string]string{"major": "8", "minor": "3", "micro": "0", "build": "1"},
		Networks: map[string]string{"0/ip": "10.0.0.5", "0/ipv4/0": "10.0.0.5", "0/ipv4/1": "10.0.0.6",
			"0/ipv6/0": "fe80::5054:ff:fe12:3456", "0/ipv6/1": "2001:db8::5", "1/ip": "192.0.2.77", "1/ipv4/0": "192.0.2.77"},
		Other:             map[string]string{"feature-shutdown": "1", "has-vendor-device": "0"},
		LastUpdated:       date("2025-03-19T04:16:24Z"),
		OtherConfig:       map[string]string{},
		Live:              true,
		PVDriversDetected: true,
	}, got)
	assert.Equal(t, map[string]GuestAddresses{
		"0": {IPv4: []string{"10.0.0.5", "10.0.0.6"}, IPv6: []string{"2001:db8::5", "fe80::5054:ff:fe12:3456"}},
		"1": {IPv4: []string{"192.0.2.77"}},
	}, GuestNetworks(got.Networks))

	nets, err := c.VMGuestMetricsGetNetworks(ctx, "OpaqueRef:vgm-1")
	require.NoError(t, err)
	assert.Equal(t, map[string]string{"0/ip": "10.0.0.5", "0/ipv4/0": "10.0.0.5", "0/ipv6/0": "2001:db8::5"}, nets)
}

func TestVMGuestMetricsRefNull(t *testing.T) {
	assert.True(t, VMGuestMetricsRef(NullRef).IsNull())
	assert.True(t, VMGuestMetricsRef("").IsNull())
	assert.False(t, VMGuestMetricsRef("OpaqueRef:vgm-1").IsNull())
}

func TestGuestNetworks(t *testing.T) {
	tests := []struct {
		name string
		in   map[string]string
		want map[string]GuestAddresses
	}{
		{name: "nil", in: nil, want: map[string]GuestAddresses{}},
		{name: "empty", in: map[string]string{}, want: map[string]GuestAddresses{}},
		{
			name: "old agent ip only",
			in:   map[string]string{"0/ip": "10.0.0.5"},
			want: map[string]GuestAddresses{"0": {IPv4: []string{"10.0.0.5"}}},
		},
		{
			name: "new protocol both forms deduplicated",
			in: map[string]string{"0/ip": "10.0.0.5", "0/ipv4/0": "10.0.0.5", "0/ipv4/1": "10.0.0.4",
				"0/ipv6/0": "2001:db8::5", "0/ipv6/1": "2001:DB8:0::5", "0/ipv6/2": "fe80::1"},
			want: map[string]GuestAddresses{"0": {IPv4: []string{"10.0.0.4", "10.0.0.5"}, IPv6: []string{"2001:db8::5", "fe80::1"}}},
		},
		{
			name: "several devices",
			in:   map[string]string{"0/ipv4/0": "10.0.0.5", "2/ipv6/0": "2001:db8::2", "10/ip": "10.0.10.1"},
			want: map[string]GuestAddresses{
				"0":  {IPv4: []string{"10.0.0.5"}},
				"2":  {IPv6: []string{"2001:db8::2"}},
				"10": {IPv4: []string{"10.0.10.1"}},
			},
		},
		{
			name: "sorted numerically not as text",
			in:   map[string]string{"0/ipv4/0": "10.0.0.10", "0/ipv4/1": "10.0.0.9", "0/ipv4/2": "9.0.0.1"},
			want: map[string]GuestAddresses{"0": {IPv4: []string{"9.0.0.1", "10.0.0.9", "10.0.0.10"}}},
		},
		{
			name: "family decided by the value; mapped unmapped; zone dropped; spaces trimmed",
			in: map[string]string{"0/ipv6/0": "10.0.0.7", "0/ipv4/0": "2001:db8::7", "0/ipv6/1": "::ffff:10.0.0.8",
				"0/ipv6/2": "fe80::7%eth0", "0/ip": " 10.0.0.9 "},
			want: map[string]GuestAddresses{"0": {IPv4: []string{"10.0.0.7", "10.0.0.8", "10.0.0.9"},
				IPv6: []string{"2001:db8::7", "fe80::7"}}},
		},
		{
			name: "garbage skipped",
			in: map[string]string{"0/ip": "", "0/ipv4/0": "not-an-ip", "0/ipv4/1": "10.0.0.256", "0/ipv4/2": "10.0.0.5/24",
				"0/ipv6/0": "::", "0/ipv6/1": "::1", "0/ipv4/3": "127.0.0.1", "0/ipv4/4": "0.0.0.0",
				"0/ipv4/5": "224.0.0.1", "0/ipv6/2": "ff02::1", "0/ipv4/6": "255.255.255.255", "1/ip": "garbage"},
			want: map[string]GuestAddresses{},
		},
		{
			name: "keys of other forms ignored",
			in: map[string]string{"ip": "10.0.0.1", "/ip": "10.0.0.2", "0/ipv4": "10.0.0.3", "0/ipv4/": "10.0.0.4",
				"0/ipv5/0": "10.0.0.5", "0/ipv6/0/addr": "2001:db8::6", "0/ip/0": "10.0.0.7", "0/mac": "10.0.0.8",
				"0/ipv4/0": "10.0.0.9"},
			want: map[string]GuestAddresses{"0": {IPv4: []string{"10.0.0.9"}}},
		},
		{
			name: "interface-name devices kept as reported",
			in:   map[string]string{"p0s3/ip": "10.0.0.3"},
			want: map[string]GuestAddresses{"p0s3": {IPv4: []string{"10.0.0.3"}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, GuestNetworks(tt.in))
		})
	}
}

// FuzzGuestNetworks feeds GuestNetworks one key/value pair next to a
// fixed valid entry: it never panics, every address it returns is a valid,
// canonical address of the right family, and the lists are sorted without
// duplicates.
func FuzzGuestNetworks(f *testing.F) {
	for _, s := range [][2]string{
		{"0/ip", "10.0.0.5"}, {"0/ipv4/0", "10.0.0.5"}, {"0/ipv6/0", "fe80::1"}, {"0/ipv6/1", "2001:db8::5"},
		{"1/ipv6/0", "::ffff:1.2.3.4"}, {"0/ipv6/0", "fe80::1%eth0"}, {"0/ip", "garbage"}, {"/ip", "10.0.0.1"},
		{"0/ipv4/0/x", "10.0.0.1"}, {"", ""}, {"0/ipv4/0", "1.2.3.4.5"}, {"0//ipv4", "::"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, k, v string) {
		got := GuestNetworks(map[string]string{k: v, "9/ipv4/0": "192.0.2.9"})
		if k != "9/ipv4/0" {
			require.Contains(t, got, "9")
			require.Contains(t, got["9"].IPv4, "192.0.2.9")
		}
		for dev, a := range got {
			require.NotEmpty(t, dev)
			require.NotContains(t, dev, "/")
			require.NotEmpty(t, append(slices.Clone(a.IPv4), a.IPv6...), "device %q has no address", dev)
			check := func(list []string, want4 bool) {
				var prev netip.Addr
				for i, s := range list {
					ip, err := netip.ParseAddr(s)
					require.NoError(t, err)
					require.Equal(t, s, ip.String(), "canonical form")
					require.Equal(t, want4, ip.Is4(), "family of %s", s)
					require.Empty(t, ip.Zone())
					require.False(t, strings.ContainsAny(s, " \t"))
					if i > 0 {
						require.Equal(t, -1, prev.Compare(ip), "sorted and unique")
					}
					prev = ip
				}
			}
			check(a.IPv4, true)
			check(a.IPv6, false)
		}
	})
}
