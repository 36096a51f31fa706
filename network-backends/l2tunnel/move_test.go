package l2tunnel

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

const (
	vmMAC     = "02:00:5e:00:00:10"
	vmIP      = "192.168.77.10"
	vmIP2     = "192.168.77.11" // never talked to: only the gratuitous ARP teaches it
	vmIP6     = "fd00:77::11"   // likewise, for the unsolicited NA
	clientIP  = "192.168.77.20"
	clientIP6 = "fd00:77::20"
	udpPort   = 9000
	bigSeq    = 0xffffffff
)

// udpFlow is a client→VM stream of numbered datagrams every 10 ms that
// the VM echoes back.
type udpFlow struct {
	mu       sync.Mutex
	sent     map[uint32]time.Time
	recv     map[uint32]time.Time // at the VM
	echoed   map[uint32]time.Time // back at the client
	client   *net.UDPConn
	vm       *net.UDPConn
	stop     chan struct{}
	wg       sync.WaitGroup
	nextSeq  uint32
	stopOnce sync.Once
}

func startFlow(t *testing.T, clientNS, vmNS string) *udpFlow {
	f := &udpFlow{sent: map[uint32]time.Time{}, recv: map[uint32]time.Time{}, echoed: map[uint32]time.Time{}, stop: make(chan struct{})}
	inNS(t, vmNS, func() (err error) {
		f.vm, err = net.ListenUDP("udp4", &net.UDPAddr{Port: udpPort})
		return err
	})
	inNS(t, clientNS, func() (err error) {
		f.client, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.ParseIP(vmIP), Port: udpPort})
		return err
	})
	t.Cleanup(f.close)
	f.wg.Add(3)
	go func() { // VM: record and echo
		defer f.wg.Done()
		buf := make([]byte, 64)
		for {
			n, from, err := f.vm.ReadFromUDP(buf)
			if err != nil {
				return
			}
			if n >= 4 {
				f.mu.Lock()
				f.recv[binary.BigEndian.Uint32(buf)] = time.Now()
				f.mu.Unlock()
				_, _ = f.vm.WriteToUDP(buf[:n], from)
			}
		}
	}()
	go func() { // client: echoes
		defer f.wg.Done()
		buf := make([]byte, 64)
		for {
			n, err := f.client.Read(buf)
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				continue // e.g. ICMP unreachable while the VM is away
			}
			if n >= 4 {
				f.mu.Lock()
				f.echoed[binary.BigEndian.Uint32(buf)] = time.Now()
				f.mu.Unlock()
			}
		}
	}()
	go func() { // client: sender
		defer f.wg.Done()
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-f.stop:
				return
			case <-tick.C:
			}
			f.mu.Lock()
			seq := f.nextSeq
			f.nextSeq++
			f.sent[seq] = time.Now()
			f.mu.Unlock()
			var b [8]byte
			binary.BigEndian.PutUint32(b[:], seq)
			_, _ = f.client.Write(b[:])
		}
	}()
	return f
}

func (f *udpFlow) stopSending() {
	f.stopOnce.Do(func() { close(f.stop) })
}

func (f *udpFlow) close() {
	f.stopSending()
	_ = f.client.Close()
	_ = f.vm.Close()
	f.wg.Wait()
}

// firstRecvAfter is when the first datagram sent after t0 reached the VM.
func (f *udpFlow) firstRecvAfter(t0 time.Time) time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	var first time.Time
	for seq, at := range f.sent {
		if r, ok := f.recv[seq]; ok && at.After(t0) && (first.IsZero() || r.Before(first)) {
			first = r
		}
	}
	return first
}

// counts returns how many datagrams were received at the VM and echoed
// back among those sent after t0.
func (f *udpFlow) countsAfter(t0 time.Time) (sent, recv, echoed int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for seq, at := range f.sent {
		if at.After(t0) {
			sent++
			if _, ok := f.recv[seq]; ok {
				recv++
			}
			if _, ok := f.echoed[seq]; ok {
				echoed++
			}
		}
	}
	return
}

// gap is the longest time without a datagram arriving at the VM between
// from and to, and how many datagrams sent in that window were lost.
func (f *udpFlow) gap(from, to time.Time) (time.Duration, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var times []time.Time
	lost := 0
	for seq, at := range f.sent {
		if at.Before(from) || at.After(to) {
			continue
		}
		if r, ok := f.recv[seq]; ok {
			times = append(times, r)
		} else {
			lost++
		}
	}
	sort.Slice(times, func(i, j int) bool { return times[i].Before(times[j]) })
	var max time.Duration
	for i := 1; i < len(times); i++ {
		if d := times[i].Sub(times[i-1]); d > max {
			max = d
		}
	}
	return max, lost
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// neighMAC returns the link-layer address a namespace has for ip, if any.
func neighMAC(t *testing.T, h *netlink.Handle, ip string) string {
	t.Helper()
	fam := unix.AF_INET
	if net.ParseIP(ip).To4() == nil {
		fam = unix.AF_INET6
	}
	ns, err := h.NeighList(0, fam)
	require.NoError(t, err)
	for _, n := range ns {
		if n.IP.Equal(net.ParseIP(ip)) && n.HardwareAddr != nil {
			return n.HardwareAddr.String()
		}
	}
	return ""
}

// fdbPort returns the name of the bridge port br0's FDB has mac on.
func fdbPort(t *testing.T, h *netlink.Handle, mac string) string {
	t.Helper()
	br, err := h.LinkByName("br0")
	require.NoError(t, err)
	ns, err := h.NeighList(0, unix.AF_BRIDGE)
	require.NoError(t, err)
	for _, n := range ns {
		if n.MasterIndex == br.Attrs().Index && n.HardwareAddr.String() == mac {
			l, err := h.LinkByIndex(n.LinkIndex)
			require.NoError(t, err)
			return l.Attrs().Name
		}
	}
	return ""
}

// TestMoveAcrossSites is the whole story: a VM on site A's bridge, a
// client on the same bridge, tunnels prepared on both sites, the VM moved
// to site B (same MAC and IP), Activate at B, and the client keeps
// reaching the VM through the tunnel.
func TestMoveAcrossSites(t *testing.T) { testMove(t, ModeKernel) }

// TestMoveAcrossSitesTAP is the same story with the userspace tunnel:
// frames travel over one TCP stream between the backends (here over
// loopback; in production through the WAN gateway), no UDP underlay.
func TestMoveAcrossSitesTAP(t *testing.T) { testMove(t, ModeTAP) }

// tunnelLinks lists the interfaces of a namespace whose names start with prefix.
func tunnelLinks(t *testing.T, h *netlink.Handle, prefix string) map[string]netlink.Link {
	t.Helper()
	links, err := h.LinkList()
	require.NoError(t, err)
	out := map[string]netlink.Link{}
	for _, lk := range links {
		if strings.HasPrefix(lk.Attrs().Name, prefix) {
			out[lk.Attrs().Name] = lk
		}
	}
	return out
}

func testMove(t *testing.T, mode string) {
	l := newLab(t)
	vmNS, clientNS := l.addNS("vm"), l.addNS("cl")
	l.attach(vmNS, l.siteA, "vmp", vmMAC, vmIP+"/24", vmIP2+"/24", vmIP6+"/64")
	l.attach(clientNS, l.siteA, "clp", "02:00:5e:00:00:20", clientIP+"/24", clientIP6+"/64")
	sysctl(t, clientNS, "net.ipv4.conf.eth0.arp_accept", "1")
	// Untracked NAs create entries only on routers (RFC 9131).
	sysctl(t, clientNS, "net.ipv6.conf.eth0.forwarding", "1")
	sysctl(t, clientNS, "net.ipv6.conf.eth0.accept_untracked_na", "1")

	src := siteBackend(t, l.siteA, l.ulA, map[string]any{"mode": mode})
	dst := siteBackend(t, l.siteB, l.ulB, map[string]any{"mode": mode})
	ctx := context.Background()
	mig := "mig-move-" + mode
	req := contract.NetPrepareRequest{MigrationID: mig, VMUUID: "vm-uuid-1", VMName: "vm1",
		VIFs: []contract.VIFInfo{{Device: "0", MAC: vmMAC, NetworkUUID: "net-a", DestNetworkUUID: "net-b", Bridge: "br0",
			IPv4: []string{vmIP, vmIP2}, IPv6: []string{vmIP6}}}}
	dreq := req
	dreq.Role = contract.RoleDestination
	dresp, err := dst.Prepare(ctx, dreq)
	require.NoError(t, err)
	require.Equal(t, "tcp", dresp.Endpoint.Network)
	sreq := req
	sreq.Role, sreq.Peer = contract.RoleSource, dresp.Endpoint
	sresp, err := src.Prepare(ctx, sreq)
	require.NoError(t, err)

	ha, hb := handleIn(t, l.siteA), handleIn(t, l.siteB)
	nameA, nameB := IfName(mig, contract.RoleSource, "0"), IfName(mig, contract.RoleDestination, "0")
	stB, err := dst.Status(ctx, contract.NetStatusRequest{Handle: dresp.Handle.ID})
	require.NoError(t, err)
	stA, err := src.Status(ctx, contract.NetStatusRequest{Handle: sresp.Handle.ID})
	require.NoError(t, err)
	if mode == ModeKernel {
		vxA, vxB := vxlans(t, ha)[nameA], vxlans(t, hb)[nameB]
		require.NotNil(t, vxA, "vxlan at A")
		require.NotNil(t, vxB, "vxlan at B")
		assert.Equal(t, vxA.VxlanId, vxB.VxlanId, "same VNI on both sites")
		assert.Equal(t, DeriveVNI(mig, "0", DefaultVNIBase, DefaultVNICount), vxB.VxlanId)
		assert.Equal(t, 1500-VXLANOverheadV4, vxA.MTU)
		assert.Equal(t, DefaultPort, vxA.Port)
		// The destination learned the source's address through the registration.
		assert.Contains(t, stB.Detail, "remote "+l.ulA)
		assert.Contains(t, stA.Detail, "remote "+l.ulB)
	} else {
		tapA, tapB := tunnelLinks(t, ha, nameA)[nameA], tunnelLinks(t, hb, nameB)[nameB]
		require.NotNil(t, tapA, "tap at A")
		require.NotNil(t, tapB, "tap at B")
		assert.Equal(t, "tuntap", tapA.Type())
		assert.Contains(t, stA.Detail, "stream connected")
		waitFor(t, "the destination's stream", func() bool {
			st, err := dst.Status(ctx, contract.NetStatusRequest{Handle: dresp.Handle.ID})
			return err == nil && strings.Contains(st.Detail, "stream connected")
		})
	}
	t.Logf("status A: %s; B: %s", stA.Detail, stB.Detail)

	flow := startFlow(t, clientNS, vmNS)
	waitFor(t, "the stream to reach the VM at site A", func() bool { _, r, e := flow.countsAfter(time.Time{}); return r > 5 && e > 5 })
	hc := handleIn(t, clientNS)
	assert.Empty(t, neighMAC(t, hc, vmIP2), "the client must not know the second address before the move")

	// Move: the VM's port disappears from A's bridge; a new one with the
	// same MAC and addresses appears on B's bridge; then Activate at B.
	moveStart := time.Now()
	ipCmd(t, "-n", l.siteA, "link", "del", "vmp")
	l.attach(vmNS, l.siteB, "vmq", vmMAC, vmIP+"/24", vmIP2+"/24", vmIP6+"/64")
	moved := time.Now()
	act, err := dst.Activate(ctx, contract.ActivateRequest{Handle: dresp.Handle.ID, DomID: 12})
	require.NoError(t, err)
	activated := time.Now()
	assert.ElementsMatch(t, []string{"rarp " + vmMAC, "garp " + vmIP + " " + vmMAC, "garp " + vmIP2 + " " + vmMAC, "na " + vmIP6 + " " + vmMAC}, act.Announced)
	_, err = src.Release(ctx, contract.ReleaseRequest{Handle: sresp.Handle.ID})
	require.NoError(t, err)

	// The announcements crossed the tunnel: site A's bridge has the VM's
	// MAC behind the vxlan port, and the client learned the addresses it
	// never asked for.
	waitFor(t, "A's bridge to learn the VM's MAC on the tunnel", func() bool { return fdbPort(t, ha, vmMAC) == nameA })
	waitFor(t, "the gratuitous ARP at the client", func() bool { return neighMAC(t, hc, vmIP2) == vmMAC })
	waitFor(t, "the unsolicited NA at the client", func() bool { return neighMAC(t, hc, vmIP6) == vmMAC })

	afterMove := time.Now()
	waitFor(t, "the stream to reach the VM at site B", func() bool { _, r, e := flow.countsAfter(afterMove); return r > 20 && e > 20 })
	// A full-size frame (1500-byte IP packet): the kernel tunnel's MTU is
	// 1450, and a bridge drops what does not fit; the tap stream carries it.
	big := make([]byte, 1500-20-8)
	binary.BigEndian.PutUint32(big, bigSeq)
	_, err = flow.client.Write(big)
	require.NoError(t, err)
	time.Sleep(200 * time.Millisecond)
	flow.mu.Lock()
	_, bigArrived := flow.recv[bigSeq]
	flow.mu.Unlock()
	if mode == ModeKernel {
		assert.False(t, bigArrived, "a 1500-byte packet does not fit the 1450-byte vxlan and is dropped")
	} else {
		assert.True(t, bigArrived, "the tap stream carries full-size frames")
	}
	flow.stopSending()
	time.Sleep(100 * time.Millisecond)
	gap, lost := flow.gap(moveStart.Add(-500*time.Millisecond), time.Now().Add(-150*time.Millisecond))
	sent, recv, echoed := flow.countsAfter(afterMove)
	t.Logf("%s move: port swap took %v, activate %v; longest gap at the VM %v, %d datagrams lost around the move; after the move %d sent, %d received, %d echoed",
		mode, moved.Sub(moveStart).Round(time.Millisecond), activated.Sub(moved).Round(time.Millisecond), gap.Round(time.Millisecond), lost, sent, recv, echoed)
	first := flow.firstRecvAfter(moveStart)
	t.Logf("first datagram at the VM's new place %v after the port swap ended (Activate returned after %v)",
		first.Sub(moved).Round(time.Millisecond), activated.Sub(moved).Round(time.Millisecond))
	assert.Positive(t, recv)
	assert.Positive(t, echoed)

	// Cleanup removes the tunnels on both sites, twice over.
	for i := 0; i < 2; i++ {
		_, err = src.Cleanup(ctx, contract.NetCleanupRequest{Handle: sresp.Handle})
		require.NoError(t, err)
		_, err = dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: dresp.Handle})
		require.NoError(t, err)
	}
	assert.Empty(t, tunnelLinks(t, ha, "wm"))
	assert.Empty(t, tunnelLinks(t, hb, "wm"))
}
