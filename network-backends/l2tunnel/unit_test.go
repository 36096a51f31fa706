package l2tunnel

import (
	"context"
	"encoding/binary"
	"net"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

func TestIfName(t *testing.T) {
	ids := []string{"", "m", "0b7c9a52-2f6e-4a43-a6c5-3b0e4ed1f9c1", strings.Repeat("x", 300)}
	devs := []string{"0", "7", "9999", "10000", "eth0", "a/b", strings.Repeat("9", 40)}
	seen := map[string]string{}
	for _, id := range ids {
		for _, role := range []contract.Role{contract.RoleSource, contract.RoleDestination} {
			for _, d := range devs {
				n := IfName(id, role, d)
				assert.LessOrEqual(t, len(n), 15, n)
				assert.NoError(t, checkIfName(n))
				assert.True(t, strings.HasPrefix(n, IfPrefix(id, role)), n)
				key := id + "|" + string(role) + "|" + d
				if other, dup := seen[n]; dup {
					t.Errorf("%s and %s share the name %s", key, other, n)
				}
				seen[n] = key
				assert.Equal(t, n, IfName(id, role, d), "stable")
			}
		}
	}
	assert.Equal(t, IfPrefix("m", contract.RoleSource)+"v3", IfName("m", contract.RoleSource, "3"))
	assert.NotEqual(t, IfPrefix("m", contract.RoleSource), IfPrefix("m", contract.RoleDestination))
	// A prefix never matches the other role's names (Cleanup's sweep).
	assert.False(t, strings.HasPrefix(IfName("m", contract.RoleDestination, "0"), IfPrefix("m", contract.RoleSource)))
}

func TestDeriveVNI(t *testing.T) {
	for _, tc := range []struct{ base, count int }{{1, 1}, {100, 10}, {DefaultVNIBase, DefaultVNICount}, {maxVNI, 1}} {
		for _, d := range []string{"0", "1", "2"} {
			v := DeriveVNI("mig", d, tc.base, tc.count)
			assert.GreaterOrEqual(t, v, tc.base)
			assert.Less(t, v, tc.base+tc.count)
			assert.Equal(t, v, DeriveVNI("mig", d, tc.base, tc.count), "both sites derive the same")
		}
	}
	assert.NotEqual(t, DeriveVNI("mig", "0", DefaultVNIBase, DefaultVNICount), DeriveVNI("mig", "1", DefaultVNIBase, DefaultVNICount))
	assert.NotEqual(t, DeriveVNI("mig-a", "0", DefaultVNIBase, DefaultVNICount), DeriveVNI("mig-b", "0", DefaultVNIBase, DefaultVNICount))
}

func configBytes(t *testing.T, js string) []byte {
	t.Helper()
	b, err := contract.ConfigFromJSON([]byte(js))
	require.NoError(t, err)
	return b
}

func TestParseConfig(t *testing.T) {
	c, w, err := ParseConfig(nil)
	require.NoError(t, err)
	assert.Empty(t, w)
	assert.Equal(t, ModeKernel, c.Mode)
	assert.Equal(t, DefaultPort, c.Port)
	assert.Equal(t, DefaultVNIBase, c.VNIBase)
	assert.Equal(t, DefaultVNICount, c.VNICount)
	assert.Equal(t, "ovs-vsctl", c.OVSVsctl)

	c, w, err = ParseConfig(configBytes(t, `{"mode":"ovs","port":8472,"vni_base":1000,"vni_count":50,"mtu":1400,
		"underlay_addresses":{"host-1":"192.0.2.1"},"peer_underlay_address":"2001:db8::2",
		"bridges":{"net-uuid":"xenbr0"},"underlay_interface":"eth0","ovs_no_wait":true,"colour":"blue"}`))
	require.NoError(t, err)
	assert.Equal(t, []string{`l2tunnel: unknown config key "colour" ignored`}, w)
	assert.Equal(t, Config{Mode: ModeOVS, Port: 8472, VNIBase: 1000, VNICount: 50, MTU: 1400,
		UnderlayAddresses: map[string]string{"host-1": "192.0.2.1"}, PeerUnderlayAddress: "2001:db8::2",
		Bridges: map[string]string{"net-uuid": "xenbr0"}, UnderlayInterface: "eth0", OVSNoWait: true,
		AnnounceCount: DefaultAnnounceCount, AnnounceIntervalMS: DefaultAnnounceIntervalMS, OVSVsctl: "ovs-vsctl"}, c)

	c, _, err = ParseConfig(configBytes(t, `{"vni_base":16777000}`))
	require.NoError(t, err)
	assert.Equal(t, maxVNI, c.VNIBase+c.VNICount-1, "default count is cut at the top of the VNI space")

	for _, bad := range []string{
		`{"mode":"gre"}`, `{"port":70000}`, `{"port":-1}`, `{"vni_base":16777216}`, `{"vni_base":10,"vni_count":16777215}`,
		`{"vni_count":-3}`, `{"mtu":100}`, `{"underlay_address":"not-an-ip"}`, `{"peer_underlay_address":"1.2.3"}`,
		`{"underlay_addresses":{"h":"x"}}`, `{"bridges":{"n":"a-very-long-bridge-name"}}`, `{"bridges":{"n":"a/b"}}`,
		`{"announce_count":1000}`, `{"announce_interval_ms":-5}`, `{"port":"4789"}`, `{"underlay_interface":"eth 0"}`,
	} {
		_, _, err := ParseConfig(configBytes(t, bad))
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, bad)
	}
	_, _, err = ParseConfig([]byte{0xc1})
	assert.ErrorIs(t, err, contract.ErrInvalidArgument, "garbage msgpack")
}

func TestParseOptions(t *testing.T) {
	o, err := ParseOptions(nil)
	require.NoError(t, err)
	assert.Equal(t, Options{}, o)
	b, err := contract.EncodeOpaque(map[string]any{"vnis": map[string]int{"0": 42}, "mtu": 1400})
	require.NoError(t, err)
	o, err = ParseOptions(b)
	require.NoError(t, err)
	assert.Equal(t, Options{VNIs: map[string]int{"0": 42}, MTU: 1400}, o)
	for _, bad := range []map[string]any{{"vnis": map[string]int{"0": 0}}, {"vnis": map[string]int{"0": 1 << 24}}, {"mtu": 10}} {
		b, err := contract.EncodeOpaque(bad)
		require.NoError(t, err)
		_, err = ParseOptions(b)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "%v", bad)
	}
}

func TestOVSArgs(t *testing.T) {
	assert.Equal(t, []string{"--timeout=10"}, OVSGlobalArgs("", false))
	assert.Equal(t, []string{"--timeout=10", "--db=unix:/tmp/db.sock", "--no-wait"}, OVSGlobalArgs("unix:/tmp/db.sock", true))
	assert.Equal(t, []string{"--may-exist", "add-port", "xenbr0", "wm1234567dv0", "--", "set", "interface", "wm1234567dv0",
		"type=vxlan", "options:remote_ip=192.0.2.2", "options:local_ip=192.0.2.1", "options:key=4242", "options:dst_port=4789",
		"external_ids:wanmotion=l2tunnel", "external_ids:wanmotion-state=active", "external_ids:wanmotion-migration=wm-0a1b",
		"external_ids:wanmotion-role=destination", "external_ids:wanmotion-vm=\"vm 1\"",
		"--", "set", "port", "wm1234567dv0", "protected=true"},
		OVSAddPortArgs("xenbr0", "wm1234567dv0", 4242, net.ParseIP("192.0.2.1"), net.ParseIP("192.0.2.2"), 4789,
			Marker{MigrationID: "wm-0a1b", Role: contract.RoleDestination, VMUUID: "vm 1"}))
	assert.Contains(t, OVSAddPortArgs("xenbr0", "p", 1, net.ParseIP("192.0.2.1"), nil, 4789, Marker{}), "options:remote_ip=flow")
	assert.Equal(t, []string{"set", "interface", "p", "external_ids:wanmotion=l2tunnel", "external_ids:wanmotion-state=kept",
		"external_ids:wanmotion-migration=m"}, OVSMarkArgs("p", Marker{MigrationID: "m", Kept: true}))
	assert.Equal(t, []string{"set", "interface", "p", "options:remote_ip=2001:db8::2"}, OVSSetRemoteArgs("p", net.ParseIP("2001:db8::2")))
	assert.Equal(t, []string{"--if-exists", "del-port", "p"}, OVSDelPortArgs("p"))
	assert.Equal(t, []string{"br-exists", "xenbr0"}, OVSBridgeExistsArgs("xenbr0"))
}

func TestFrames(t *testing.T) {
	mac := net.HardwareAddr{0x02, 0, 0x5e, 0, 0, 0x10}
	f, err := GratuitousARPFrame(mac, net.ParseIP("192.0.2.10"))
	require.NoError(t, err)
	require.Len(t, f, 60)
	assert.Equal(t, []byte(broadcastMAC), f[0:6])
	assert.Equal(t, []byte(mac), f[6:12])
	assert.Equal(t, uint16(etherTypeARP), binary.BigEndian.Uint16(f[12:14]))
	assert.Equal(t, uint16(1), binary.BigEndian.Uint16(f[20:22]), "request")
	assert.Equal(t, []byte(mac), f[22:28], "sender mac")
	assert.Equal(t, []byte{192, 0, 2, 10}, f[28:32], "sender ip")
	assert.Equal(t, []byte{192, 0, 2, 10}, f[38:42], "target ip = sender ip")

	f, err = RARPFrame(mac)
	require.NoError(t, err)
	assert.Equal(t, uint16(etherTypeRARP), binary.BigEndian.Uint16(f[12:14]))
	assert.Equal(t, uint16(3), binary.BigEndian.Uint16(f[20:22]))

	ip6 := net.ParseIP("2001:db8::10")
	f, err = UnsolicitedNAFrame(mac, ip6)
	require.NoError(t, err)
	assert.Equal(t, []byte(allNodesMAC), f[0:6])
	assert.Equal(t, uint16(etherTypeIPv6), binary.BigEndian.Uint16(f[12:14]))
	ipHdr, icmp := f[14:54], f[54:86]
	assert.Equal(t, byte(255), ipHdr[7], "hop limit")
	assert.Equal(t, []byte(ip6.To16()), ipHdr[8:24])
	assert.Equal(t, byte(136), icmp[0])
	assert.Equal(t, uint32(0x20000000), binary.BigEndian.Uint32(icmp[4:8]), "override only")
	assert.Equal(t, []byte(mac), icmp[26:32])
	// Summing the message with its checksum in place gives 0xffff.
	assert.Equal(t, uint16(0), icmpv6Checksum(ip6, allNodesIP, icmp))

	_, err = GratuitousARPFrame(mac, ip6)
	assert.Error(t, err)
	_, err = UnsolicitedNAFrame(mac, net.ParseIP("192.0.2.1"))
	assert.Error(t, err)
	_, err = RARPFrame(net.HardwareAddr{1, 2, 3})
	assert.Error(t, err)
}

func TestPrepareRejectsBadRequests(t *testing.T) {
	b := New(nil)
	defer b.Close()
	good := contract.NetPrepareRequest{MigrationID: "m", Role: contract.RoleDestination, VMUUID: "vm",
		VIFs: []contract.VIFInfo{{Device: "0", MAC: "02:00:00:00:00:01", Bridge: "br0", IPv4: []string{"192.0.2.1"}, IPv6: []string{"2001:db8::1"}}}}
	for name, mut := range map[string]func(r *contract.NetPrepareRequest){
		"no migration":   func(r *contract.NetPrepareRequest) { r.MigrationID = "" },
		"bad role":       func(r *contract.NetPrepareRequest) { r.Role = "middle" },
		"no vm":          func(r *contract.NetPrepareRequest) { r.VMUUID = "" },
		"no device":      func(r *contract.NetPrepareRequest) { r.VIFs[0].Device = "" },
		"bad mac":        func(r *contract.NetPrepareRequest) { r.VIFs[0].MAC = "02:00" },
		"eui64 mac":      func(r *contract.NetPrepareRequest) { r.VIFs[0].MAC = "02:00:00:00:00:00:00:01" },
		"bad ipv4":       func(r *contract.NetPrepareRequest) { r.VIFs[0].IPv4 = []string{"2001:db8::1"} },
		"bad ipv6":       func(r *contract.NetPrepareRequest) { r.VIFs[0].IPv6 = []string{"192.0.2.1"} },
		"bad bridge":     func(r *contract.NetPrepareRequest) { r.VIFs[0].Bridge = "a bridge" },
		"duplicate vif":  func(r *contract.NetPrepareRequest) { r.VIFs = append(r.VIFs, r.VIFs[0]) },
		"bad options":    func(r *contract.NetPrepareRequest) { r.Options = []byte{0xc1} },
		"bad peer param": func(r *contract.NetPrepareRequest) { r.Role, r.Peer.Params = contract.RoleSource, []byte{0xc1} },
	} {
		r := good
		r.VIFs = append([]contract.VIFInfo(nil), good.VIFs...)
		mut(&r)
		_, err := b.Prepare(context.Background(), r)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, name)
	}
	// No underlay configured: a clear precondition error.
	_, err := b.Prepare(context.Background(), good)
	assert.ErrorIs(t, err, contract.ErrFailedPrecondition)
	assert.Contains(t, err.Error(), "underlay")
}

func TestRecoverRejectsBadState(t *testing.T) {
	b := New(nil)
	defer b.Close()
	_, err := b.Recover(context.Background(), contract.NetRecoverRequest{Handle: contract.Handle{ID: "x", State: contract.State{Version: 1, Data: []byte{0xc1}}}})
	assert.ErrorIs(t, err, contract.ErrInvalidArgument)
	_, err = b.Recover(context.Background(), contract.NetRecoverRequest{Handle: contract.Handle{ID: "x", State: contract.State{Version: 99}}})
	assert.ErrorIs(t, err, contract.ErrInvalidArgument)
	s, err := encodeState(state{ID: "other"})
	require.NoError(t, err)
	_, err = b.Recover(context.Background(), contract.NetRecoverRequest{Handle: contract.Handle{ID: "x", State: s}})
	assert.ErrorIs(t, err, contract.ErrInvalidArgument)
}
