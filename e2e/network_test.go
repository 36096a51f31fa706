package e2e

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
)

// l2tunnelBin builds wanmotion-network-l2tunnel into the plugin dir once.
var l2tunnelBin struct {
	once sync.Once
	path string
	err  error
}

func buildL2tunnel(t testing.TB) string {
	t.Helper()
	l2tunnelBin.once.Do(func() {
		l2tunnelBin.path = filepath.Join(bins.plugins, "wanmotion-network-l2tunnel")
		cmd := exec.Command(filepath.Join(runtime.GOROOT(), "bin", "go"), "build", "-buildvcs=false", "-o", l2tunnelBin.path,
			"./network-backends/l2tunnel/cmd/wanmotion-network-l2tunnel")
		cmd.Dir = ".."
		if out, err := cmd.CombinedOutput(); err != nil {
			l2tunnelBin.err = fmt.Errorf("go build wanmotion-network-l2tunnel: %w: %s", err, out)
		}
	})
	require.NoError(t, l2tunnelBin.err)
	return l2tunnelBin.path
}

// netLab is two site namespaces joined by a veth underlay, each with the
// bridge of the VM's network, a client namespace on site A's bridge and
// the "VM" namespace (a veth with the VM's MAC and addresses).
type netLab struct {
	t          testing.TB
	prefix     string
	siteA      string
	siteB      string
	vm         string
	client     string
	bridge     string
	underlayA  string
	underlayB  string
	namespaces []string
}

const e2eNSPrefix = "wme2e-"

func newNetLab(t testing.TB, bridge string) *netLab {
	t.Helper()
	r := make([]byte, 3)
	_, _ = rand.Read(r)
	p := e2eNSPrefix + hex.EncodeToString(r) + "-"
	l := &netLab{t: t, prefix: p, siteA: p + "a", siteB: p + "b", vm: p + "vm", client: p + "cl", bridge: bridge,
		underlayA: "10.251.0.1", underlayB: "10.251.0.2"}
	t.Cleanup(l.destroy)
	for _, ns := range []string{l.siteA, l.siteB, l.vm, l.client} {
		run(t, "ip", "netns", "add", ns)
		l.namespaces = append(l.namespaces, ns)
	}
	ipBatchE2E(t, "",
		fmt.Sprintf("link add ul netns %s type veth peer name ul netns %s", l.siteA, l.siteB))
	for _, s := range []struct{ ns, addr string }{{l.siteA, l.underlayA}, {l.siteB, l.underlayB}} {
		ipBatchE2E(t, s.ns,
			"link set lo up",
			"addr add "+s.addr+"/30 dev ul",
			"link set ul up",
			"link add "+bridge+" type bridge",
			"link set "+bridge+" up")
	}
	return l
}

// plug connects ns's eth0 (mac, addresses) to site's bridge via port.
func (l *netLab) plug(ns, site, port, mac string, addrs ...string) {
	l.t.Helper()
	ipBatchE2E(l.t, "", fmt.Sprintf("link add %s netns %s type veth peer name eth0 netns %s address %s", port, site, ns, mac))
	cmds := []string{"link set lo up"}
	for _, a := range addrs {
		extra := ""
		if strings.Contains(a, ":") {
			extra = " nodad"
		}
		cmds = append(cmds, "addr add "+a+" dev eth0"+extra)
	}
	ipBatchE2E(l.t, ns, append(cmds, "link set eth0 up")...)
	ipBatchE2E(l.t, site, "link set "+port+" master "+l.bridge, "link set "+port+" up")
}

func (l *netLab) destroy() {
	for _, ns := range l.namespaces {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	assert.NoError(l.t, err, "%s", out)
	assert.NotContains(l.t, string(out), l.prefix, "namespaces left behind")
	links, err := netlink.LinkList()
	if assert.NoError(l.t, err) {
		for _, lk := range links {
			assert.False(l.t, lk.Type() == "vxlan" && strings.HasPrefix(lk.Attrs().Name, "wm"), "vxlan %s in the test's own namespace", lk.Attrs().Name)
		}
	}
}

func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	require.NoError(t, err, "%s %s: %s", name, strings.Join(args, " "), out)
	return string(out)
}

func ipBatchE2E(t testing.TB, ns string, cmds ...string) {
	t.Helper()
	args := []string{"-batch", "-"}
	if ns != "" {
		args = append([]string{"-n", ns}, args...)
	}
	c := exec.Command("ip", args...)
	c.Stdin = strings.NewReader(strings.Join(cmds, "\n") + "\n")
	out, err := c.CombinedOutput()
	require.NoError(t, err, "ip %s:\n%s\n%s", strings.Join(args, " "), strings.Join(cmds, "\n"), out)
}

// vxlansIn lists the vxlan interfaces in a namespace.
func vxlansIn(t testing.TB, ns string) []*netlink.Vxlan {
	t.Helper()
	h, err := netns.GetFromName(ns)
	require.NoError(t, err)
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	require.NoError(t, err)
	defer nh.Close()
	links, err := nh.LinkList()
	require.NoError(t, err)
	var out []*netlink.Vxlan
	for _, lk := range links {
		if vx, ok := lk.(*netlink.Vxlan); ok {
			out = append(out, vx)
		}
	}
	return out
}

// inNetns runs fn on a thread inside ns (the thread is discarded after).
func inNetns(t testing.TB, ns string, fn func() error) {
	t.Helper()
	h, err := netns.GetFromName(ns)
	require.NoError(t, err)
	defer h.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(h); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	require.NoError(t, <-errc)
}

// stream is a client → VM UDP stream (a numbered datagram every 10 ms)
// that the VM echoes.
type stream struct {
	mu      sync.Mutex
	sent    map[uint32]time.Time
	recv    map[uint32]time.Time
	echoed  map[uint32]time.Time
	client  *net.UDPConn
	vm      *net.UDPConn
	stop    chan struct{}
	once    sync.Once
	wg      sync.WaitGroup
	nextSeq uint32
}

func startStream(t testing.TB, clientNS, vmNS, vmIP string) *stream {
	s := &stream{sent: map[uint32]time.Time{}, recv: map[uint32]time.Time{}, echoed: map[uint32]time.Time{}, stop: make(chan struct{})}
	inNetns(t, vmNS, func() (err error) {
		s.vm, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 9000})
		return err
	})
	inNetns(t, clientNS, func() (err error) {
		s.client, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.ParseIP(vmIP), Port: 9000})
		return err
	})
	t.Cleanup(s.close)
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		buf := make([]byte, 64)
		for {
			n, from, err := s.vm.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if n >= 4 {
				s.mu.Lock()
				s.recv[binary.BigEndian.Uint32(buf)] = time.Now()
				s.mu.Unlock()
				_, _ = s.vm.WriteToUDP(buf[:n], from)
			}
		}
	}()
	go func() {
		defer s.wg.Done()
		buf := make([]byte, 64)
		for {
			n, err := s.client.Read(buf)
			if errors.Is(err, net.ErrClosed) {
				return
			}
			if err == nil && n >= 4 {
				s.mu.Lock()
				s.echoed[binary.BigEndian.Uint32(buf)] = time.Now()
				s.mu.Unlock()
			}
		}
	}()
	go func() {
		defer s.wg.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
			s.mu.Lock()
			seq := s.nextSeq
			s.nextSeq++
			s.sent[seq] = time.Now()
			s.mu.Unlock()
			var b [8]byte
			binary.BigEndian.PutUint32(b[:], seq)
			_, _ = s.client.Write(b[:])
		}
	}()
	return s
}

func (s *stream) close() {
	s.once.Do(func() { close(s.stop) })
	_ = s.client.Close()
	_ = s.vm.Close()
	s.wg.Wait()
}

// countsAfter: datagrams sent after t0, and how many reached the VM and
// came back.
func (s *stream) countsAfter(t0 time.Time) (sent, recv, echoed int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for seq, at := range s.sent {
		if at.After(t0) {
			sent++
			if _, ok := s.recv[seq]; ok {
				recv++
			}
			if _, ok := s.echoed[seq]; ok {
				echoed++
			}
		}
	}
	return
}

// gap is the longest time without a datagram at the VM between from and
// to, and how many sent in that window never arrived.
func (s *stream) gap(from, to time.Time) (time.Duration, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var times []time.Time
	lost := 0
	for seq, at := range s.sent {
		if at.Before(from) || at.After(to) {
			continue
		}
		if r, ok := s.recv[seq]; ok {
			times = append(times, r)
		} else {
			lost++
		}
	}
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	var longest time.Duration
	for i := 1; i < len(times); i++ {
		longest = max(longest, times[i].Sub(times[i-1]))
	}
	return longest, lost
}

// waitStream waits until n datagrams sent after t0 were echoed (10 s).
func (s *stream) waitEchoed(t testing.TB, what string, t0 time.Time, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, _, e := s.countsAfter(t0)
		if e >= n {
			return
		}
		if time.Now().After(deadline) {
			sent, recv, e := s.countsAfter(t0)
			t.Fatalf("%s: %d of %d datagrams echoed (%d reached the VM) within 10 s", what, e, sent, recv)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// vmNIC is what the simulator says about demo-vm's first VIF.
type vmNIC struct {
	mac, bridge, ipv4, ipv6 string
}

func (e *env) vmNIC() vmNIC {
	e.t.Helper()
	ctx := context.Background()
	c := e.client(siteA)
	var vm string
	require.NoError(e.t, c.CallInto(ctx, &vm, "VM.get_by_uuid", e.vmUUID))
	var vifs []string
	require.NoError(e.t, c.CallInto(ctx, &vifs, "VM.get_VIFs", vm))
	require.NotEmpty(e.t, vifs)
	var vif map[string]any
	require.NoError(e.t, c.CallInto(ctx, &vif, "VIF.get_record", vifs[0]))
	var bridge string
	require.NoError(e.t, c.CallInto(ctx, &bridge, "network.get_bridge", vif["network"]))
	var gm string
	require.NoError(e.t, c.CallInto(ctx, &gm, "VM.get_guest_metrics", vm))
	var nets map[string]string
	require.NoError(e.t, c.CallInto(ctx, &nets, "VM_guest_metrics.get_networks", gm))
	dev := fmt.Sprint(vif["device"])
	n := vmNIC{mac: strings.ToLower(fmt.Sprint(vif["MAC"])), bridge: bridge, ipv4: nets[dev+"/ipv4/0"], ipv6: nets[dev+"/ipv6/0"]}
	require.NotEmpty(e.t, n.ipv4, "guest metrics networks: %v", nets)
	return n
}

// TestNetworkL2Tunnel migrates demo-vm with the real CLI and
// --network l2tunnel: each site's backend works in its own network
// namespace; a UDP stream from a client at site A to the "VM" (a veth
// with the VM's MAC and address, moved from A's bridge to B's when the
// migration reaches the switch) keeps flowing across the tunnel, and
// after the migration (keep_after_migration), until
// `wanmotion-network-l2tunnel remove` takes the tunnels away.
func TestNetworkL2Tunnel(t *testing.T) {
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "ip", "iproute2")
	e := newEnv(t)
	l2bin := buildL2tunnel(t)
	nic := e.vmNIC()
	t.Logf("vm nic: %+v", nic)

	lab := newNetLab(t, nic.bridge)
	prefix := "/24"
	vmAddrs := []string{nic.ipv4 + prefix}
	if nic.ipv6 != "" {
		vmAddrs = append(vmAddrs, nic.ipv6+"/64")
	}
	ip4 := net.ParseIP(nic.ipv4).To4()
	require.NotNil(t, ip4)
	clientIP := net.IPv4(ip4[0], ip4[1], ip4[2], ip4[3]^0x7f).String()
	lab.plug(lab.vm, lab.siteA, "vmport", nic.mac, vmAddrs...)
	lab.plug(lab.client, lab.siteA, "clport", "02:00:5e:00:01:20", clientIP+prefix)

	// each site's backend works in its own namespace, with its own
	// underlay address, and keeps the tunnels after the migration
	e.configureL2tunnel(siteA, map[string]any{"netns": "/run/netns/" + lab.siteA, "underlay_address": lab.underlayA,
		"keep_after_migration": true, "announce_interval_ms": 20})
	e.configureL2tunnel(siteB, map[string]any{"netns": "/run/netns/" + lab.siteB, "underlay_address": lab.underlayB,
		"keep_after_migration": true, "announce_interval_ms": 20})

	s := startStream(t, lab.client, lab.vm, nic.ipv4)
	start := time.Now()
	s.waitEchoed(t, "the stream at site A before the migration", start, 5)

	id := "wm-l2tunnel"
	p := e.migrate(id, "--network", "l2tunnel")
	e.waitFor(id, p, "the switch", func(cp *engine.Checkpoint) bool { return cp.Phase >= engine.PhaseSwitch })
	// the VM now runs at site B: its NIC moves to B's bridge
	moved := time.Now()
	ipBatchE2E(t, lab.siteA, "link del vmport")
	lab.plug(lab.vm, lab.siteB, "vmport", nic.mac, vmAddrs...)
	plugged := time.Now()

	rep, code := p.report(t)
	require.Equal(t, 0, code, "report %+v\nstderr:\n%s", rep, p.stderrText())
	assert.Equal(t, "success", rep.Result)
	ended := time.Now()
	e.settled(siteB)

	// the stretch outlives the migration: one tunnel per site, kept,
	// pointing at the other site, and the stream flows A -> tunnel -> B
	for _, c := range []struct{ ns, remote string }{{lab.siteA, lab.underlayB}, {lab.siteB, lab.underlayA}} {
		tun := vxlansIn(t, c.ns)
		if assert.Len(t, tun, 1, "kept tunnel in %s", c.ns) {
			for _, vx := range tun {
				assert.Equal(t, []string{c.remote}, defaultRemotes(t, c.ns, vx), "remote of %s in %s", vx.Name, c.ns)
				assert.Contains(t, vx.Alias, "wanmotion-l2tunnel kept migration="+id, "marker of %s", vx.Name)
			}
		}
	}
	s.waitEchoed(t, "the stream from A to the VM at B after the migration", ended, 20)
	longest, lost := s.gap(moved.Add(-time.Second), time.Now())
	sent, recv, echoed := s.countsAfter(moved)
	t.Logf("move: unplug+plug took %s; longest gap at the VM %s, %d datagrams lost around the move; since the move %d sent, %d reached the VM, %d echoed",
		plugged.Sub(moved), longest, lost, sent, recv, echoed)
	assert.Empty(t, l2tunnelProcs(l2bin), "no l2tunnel backend process left")

	for _, ns := range []string{lab.siteA, lab.siteB} {
		out, err := exec.Command(l2bin, "remove", "--migration", id, "--netns", "/run/netns/"+ns).CombinedOutput()
		require.NoError(t, err, "remove in %s: %s", ns, out)
		t.Logf("remove in %s: %s", ns, strings.TrimSpace(string(out)))
		assert.Empty(t, vxlansIn(t, ns), "no tunnel left in %s", ns)
	}
	// without the tunnels nothing from site A reaches the VM any more
	removed := time.Now()
	time.Sleep(300 * time.Millisecond)
	sent, recv, _ = s.countsAfter(removed.Add(50 * time.Millisecond))
	assert.Positive(t, sent)
	assert.Zero(t, recv, "datagrams reached the VM at B after the tunnels were removed")
}

// defaultRemotes lists the remotes of a vxlan's default (all-zero MAC)
// forwarding entries: where it sends broadcasts and unknown unicast.
func defaultRemotes(t testing.TB, ns string, vx *netlink.Vxlan) []string {
	t.Helper()
	h, err := netns.GetFromName(ns)
	require.NoError(t, err)
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	require.NoError(t, err)
	defer nh.Close()
	neighs, err := nh.NeighList(vx.Index, unix.AF_BRIDGE)
	require.NoError(t, err)
	var out []string
	for _, n := range neighs {
		if n.HardwareAddr.String() == "00:00:00:00:00:00" && n.IP != nil {
			out = append(out, n.IP.String())
		}
	}
	return out
}

// l2tunnelProcs lists live processes running the l2tunnel binary.
func l2tunnelProcs(bin string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, ent := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", ent.Name(), "cmdline"))
		if err == nil && strings.Split(string(b), "\x00")[0] == bin {
			out = append(out, ent.Name()+" "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}

// configureL2tunnel sets a pool's l2tunnel section of wanmotion:config
// with the real `wanmotion pool configure --config-json`.
func (e *env) configureL2tunnel(site int, section map[string]any) {
	e.t.Helper()
	b, err := json.Marshal(map[string]any{"l2tunnel": section})
	require.NoError(e.t, err)
	f := filepath.Join(e.dir, fmt.Sprintf("l2tunnel-site%d.json", site))
	require.NoError(e.t, os.WriteFile(f, b, 0o600))
	cmd := exec.Command(bins.wanmotion, "pool", "configure", "--url", e.direct[site], "--config-json", f)
	cmd.Env = append(os.Environ(), "WANMOTION_PASSWORD="+simPass)
	out, err := cmd.CombinedOutput()
	require.NoError(e.t, err, "pool configure: %s", out)
}
