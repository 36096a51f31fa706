package l2tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// kernelPlane manages Linux kernel VXLAN interfaces with netlink, in the
// backend's network namespace or in a configured one.
type kernelPlane struct {
	ns    netns.NsHandle // -1: the process's namespace
	h     *netlink.Handle
	ownNS bool
}

// nsPath turns a netns config value into a path.
func nsPath(s string) string {
	if strings.Contains(s, "/") {
		return s
	}
	return filepath.Join("/run/netns", s)
}

func newKernelPlane(nsName string) (*kernelPlane, error) {
	k := &kernelPlane{ns: netns.None()}
	var err error
	if nsName != "" {
		k.ns, err = netns.GetFromPath(nsPath(nsName))
		if err != nil {
			return nil, fmt.Errorf("open network namespace %s: %v: %w", nsName, err, contract.ErrFailedPrecondition)
		}
		k.ownNS = true
		k.h, err = netlink.NewHandleAt(k.ns)
	} else {
		k.h, err = netlink.NewHandle()
	}
	if err != nil {
		if k.ownNS {
			_ = k.ns.Close()
		}
		return nil, fmt.Errorf("open netlink: %v: %w", err, contract.ErrFailedPrecondition)
	}
	return k, nil
}

func (k *kernelPlane) close() {
	k.h.Close()
	if k.ownNS {
		_ = k.ns.Close()
	}
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}

func (k *kernelPlane) bridge(name string) (netlink.Link, error) {
	br, err := k.h.LinkByName(name)
	if isNotFound(err) {
		return nil, fmt.Errorf("bridge %s does not exist on this host: %w", name, contract.ErrFailedPrecondition)
	}
	if err != nil {
		return nil, fmt.Errorf("look up bridge %s: %v: %w", name, err, contract.ErrInternal)
	}
	if br.Type() != "bridge" {
		return nil, fmt.Errorf("%s is a %s, not a Linux bridge (use mode \"ovs\" for Open vSwitch): %w", name, br.Type(), contract.ErrFailedPrecondition)
	}
	return br, nil
}

// underlayMTU is the MTU of the interface that holds local.
func (k *kernelPlane) underlayMTU(local net.IP) (int, error) {
	addrs, err := k.h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return 0, fmt.Errorf("list addresses: %v: %w", err, contract.ErrInternal)
	}
	for _, a := range addrs {
		if a.IP.Equal(local) {
			l, err := k.h.LinkByIndex(a.LinkIndex)
			if err != nil {
				return 0, fmt.Errorf("underlay link: %v: %w", err, contract.ErrInternal)
			}
			return l.Attrs().MTU, nil
		}
	}
	return 0, fmt.Errorf("underlay address %s is not configured on this host: %w", local, contract.ErrFailedPrecondition)
}

func (k *kernelPlane) tunnelMTU(p tunnelParams) (int, error) {
	if p.MTU > 0 {
		return p.MTU, nil
	}
	mtu, err := k.underlayMTU(p.Local)
	if err != nil {
		return 0, err
	}
	if p.Local.To4() != nil {
		return mtu - VXLANOverheadV4, nil
	}
	return mtu - VXLANOverheadV6, nil
}

func (k *kernelPlane) ensure(ctx context.Context, t tunnel, p tunnelParams) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %v", contract.ErrCancelled, err)
	}
	br, err := k.bridge(t.Bridge)
	if err != nil {
		return err
	}
	mtu, err := k.tunnelMTU(p)
	if err != nil {
		return err
	}
	link, err := k.h.LinkByName(t.Name)
	switch {
	case isNotFound(err):
		link = nil
	case err != nil:
		return fmt.Errorf("look up %s: %v: %w", t.Name, err, contract.ErrInternal)
	default:
		vx, ok := link.(*netlink.Vxlan)
		if !ok {
			return fmt.Errorf("interface %s exists and is a %s, not our vxlan: %w", t.Name, link.Type(), contract.ErrFailedPrecondition)
		}
		if m, ok := ParseAlias(vx.Alias); ok && m.MigrationID != "" && p.Marker.MigrationID != "" && m.MigrationID != p.Marker.MigrationID {
			return fmt.Errorf("interface %s belongs to migration %s (%s); remove it first if it is stale: %w", t.Name, m.MigrationID, m.state(), contract.ErrFailedPrecondition)
		}
		if vx.VxlanId != t.VNI || vx.Port != p.Port || !vx.SrcAddr.Equal(p.Local) {
			// Ours by name, but made with other parameters: recreate.
			if err := k.h.LinkDel(link); err != nil && !isNotFound(err) {
				return fmt.Errorf("delete stale %s: %v: %w", t.Name, err, contract.ErrInternal)
			}
			link = nil
		}
	}
	if link == nil {
		vx := &netlink.Vxlan{
			LinkAttrs: netlink.LinkAttrs{Name: t.Name, MTU: mtu},
			VxlanId:   t.VNI,
			SrcAddr:   p.Local,
			Port:      p.Port,
			Learning:  true,
		}
		if err := k.h.LinkAdd(vx); err != nil {
			return fmt.Errorf("create vxlan %s (vni %d): %v: %w", t.Name, t.VNI, err, contract.ErrInternal)
		}
		if link, err = k.h.LinkByName(t.Name); err != nil {
			return fmt.Errorf("look up new %s: %v: %w", t.Name, err, contract.ErrInternal)
		}
	}
	if link.Attrs().MTU != mtu {
		if err := k.h.LinkSetMTU(link, mtu); err != nil {
			return fmt.Errorf("set mtu %d on %s: %v: %w", mtu, t.Name, err, contract.ErrInternal)
		}
	}
	if link.Attrs().MasterIndex != br.Attrs().Index {
		if err := k.h.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("attach %s to %s: %v: %w", t.Name, t.Bridge, err, contract.ErrInternal)
		}
	}
	if err := isolate(k.h, link); err != nil {
		return err
	}
	if err := k.setAlias(link, p.Marker); err != nil {
		return err
	}
	if err := k.h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %v: %w", t.Name, err, contract.ErrInternal)
	}
	if p.Remote != nil {
		return k.setRemote(ctx, t, p)
	}
	return nil
}

// isolate marks a tunnel port isolated on its bridge: the bridge never
// forwards between two isolated ports, so the tunnels of several
// migrations on one bridge (each to the same other site) cannot form a
// loop (split horizon).
func isolate(h *netlink.Handle, link netlink.Link) error {
	if err := h.LinkSetIsolated(link, true); err != nil {
		return fmt.Errorf("isolate %s on its bridge: %v: %w", link.Attrs().Name, err, contract.ErrInternal)
	}
	return nil
}

var zeroMAC = net.HardwareAddr{0, 0, 0, 0, 0, 0}

// defaultEntries are the all-zeros FDB entries of a vxlan device: where
// broadcast and unknown unicast go.
func (k *kernelPlane) defaultEntries(link netlink.Link) ([]netlink.Neigh, error) {
	ns, err := k.h.NeighList(link.Attrs().Index, unix.AF_BRIDGE)
	if err != nil {
		return nil, fmt.Errorf("list fdb of %s: %v: %w", link.Attrs().Name, err, contract.ErrInternal)
	}
	var out []netlink.Neigh
	for _, n := range ns {
		if n.HardwareAddr.String() == zeroMAC.String() && n.IP != nil && n.LinkIndex == link.Attrs().Index {
			out = append(out, n)
		}
	}
	return out, nil
}

func (k *kernelPlane) setRemote(_ context.Context, t tunnel, p tunnelParams) error {
	link, err := k.h.LinkByName(t.Name)
	if err != nil {
		return fmt.Errorf("look up %s: %v: %w", t.Name, err, contract.ErrFailedPrecondition)
	}
	old, err := k.defaultEntries(link)
	if err != nil {
		return err
	}
	for _, n := range old {
		if n.IP.Equal(p.Remote) {
			return nil
		}
	}
	for i := range old {
		if err := k.h.NeighDel(&old[i]); err != nil {
			return fmt.Errorf("remove old remote %s of %s: %v: %w", old[i].IP, t.Name, err, contract.ErrInternal)
		}
	}
	n := &netlink.Neigh{
		LinkIndex:    link.Attrs().Index,
		Family:       unix.AF_BRIDGE,
		State:        netlink.NUD_PERMANENT | netlink.NUD_NOARP,
		Flags:        netlink.NTF_SELF,
		IP:           p.Remote,
		HardwareAddr: zeroMAC,
	}
	if err := k.h.NeighAppend(n); err != nil {
		return fmt.Errorf("set remote %s on %s: %v: %w", p.Remote, t.Name, err, contract.ErrInternal)
	}
	return nil
}

func (k *kernelPlane) remote(_ context.Context, t tunnel) (net.IP, error) {
	link, err := k.h.LinkByName(t.Name)
	if isNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("look up %s: %v: %w", t.Name, err, contract.ErrInternal)
	}
	es, err := k.defaultEntries(link)
	if err != nil || len(es) == 0 {
		return nil, err
	}
	return es[0].IP, nil
}

func (k *kernelPlane) remove(_ context.Context, t tunnel) error {
	link, err := k.h.LinkByName(t.Name)
	if isNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("look up %s: %v: %w", t.Name, err, contract.ErrInternal)
	}
	if _, ok := link.(*netlink.Vxlan); !ok {
		return fmt.Errorf("%s is a %s, not our vxlan; left alone: %w", t.Name, link.Type(), contract.ErrFailedPrecondition)
	}
	if err := k.h.LinkDel(link); err != nil && !isNotFound(err) {
		return fmt.Errorf("delete %s: %v: %w", t.Name, err, contract.ErrInternal)
	}
	return nil
}

// list returns the vxlan interfaces whose name starts with "wm" or whose
// alias is one of our markers.
func (k *kernelPlane) list(_ context.Context) ([]FoundTunnel, error) {
	links, err := k.h.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %v: %w", err, contract.ErrInternal)
	}
	names := map[int]string{}
	for _, l := range links {
		names[l.Attrs().Index] = l.Attrs().Name
	}
	var out []FoundTunnel
	for _, l := range links {
		vx, ok := l.(*netlink.Vxlan)
		if !ok {
			continue
		}
		m, marked := ParseAlias(vx.Alias)
		if !marked && !strings.HasPrefix(vx.Name, "wm") {
			continue
		}
		f := FoundTunnel{Name: vx.Name, Marker: m, Marked: marked, VNI: vx.VxlanId, Bridge: names[vx.MasterIndex]}
		if es, err := k.defaultEntries(l); err == nil && len(es) > 0 {
			f.Remote = es[0].IP.String()
		}
		out = append(out, f)
	}
	return out, nil
}

func (k *kernelPlane) removeName(ctx context.Context, name string) error {
	return k.remove(ctx, tunnel{Name: name})
}

func (k *kernelPlane) mark(_ context.Context, t tunnel, m Marker) (bool, error) {
	link, err := k.h.LinkByName(t.Name)
	if isNotFound(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up %s: %v: %w", t.Name, err, contract.ErrInternal)
	}
	if _, ok := link.(*netlink.Vxlan); !ok {
		return false, fmt.Errorf("%s is a %s, not our vxlan: %w", t.Name, link.Type(), contract.ErrFailedPrecondition)
	}
	return true, k.setAlias(link, m)
}

func (k *kernelPlane) setAlias(link netlink.Link, m Marker) error {
	if a := m.Alias(); link.Attrs().Alias != a {
		if err := k.h.LinkSetAlias(link, a); err != nil {
			return fmt.Errorf("set alias of %s: %v: %w", link.Attrs().Name, err, contract.ErrInternal)
		}
	}
	return nil
}

func (k *kernelPlane) describe(ctx context.Context, t tunnel) string {
	link, err := k.h.LinkByName(t.Name)
	if err != nil {
		return fmt.Sprintf("%s: missing", t.Name)
	}
	state := "down"
	if link.Attrs().Flags&net.FlagUp != 0 {
		state = "up"
	}
	remote := "none"
	if r, err := k.remote(ctx, t); err == nil && r != nil {
		remote = r.String()
	}
	return fmt.Sprintf("%s: vxlan vni %d remote %s mtu %d on %s %s", t.Name, t.VNI, remote, link.Attrs().MTU, t.Bridge, state)
}

func (k *kernelPlane) localAddress(_ context.Context, ifname string) (net.IP, error) {
	l, err := k.h.LinkByName(ifname)
	if err != nil {
		return nil, fmt.Errorf("underlay interface %s: %v: %w", ifname, err, contract.ErrFailedPrecondition)
	}
	addrs, err := k.h.AddrList(l, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("addresses of %s: %v: %w", ifname, err, contract.ErrInternal)
	}
	for _, fam := range []bool{true, false} { // IPv4 first
		for _, a := range addrs {
			if (a.IP.To4() != nil) == fam && a.IP.IsGlobalUnicast() {
				return a.IP, nil
			}
		}
	}
	return nil, fmt.Errorf("underlay interface %s has no global address: %w", ifname, contract.ErrFailedPrecondition)
}

func (k *kernelPlane) send(ctx context.Context, ifname string, frames [][]byte) error {
	l, err := k.h.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("announce on %s: %v: %w", ifname, err, contract.ErrFailedPrecondition)
	}
	return sendFrames(ctx, k.ns, l.Attrs().Index, frames)
}

// sendFrames writes raw Ethernet frames on interface ifindex of
// namespace ns (None: the current one). The packet socket is opened in a
// goroutine locked to a thread that entered ns; a socket stays in the
// namespace it was created in.
func sendFrames(ctx context.Context, ns netns.NsHandle, ifindex int, frames [][]byte) error {
	fd, err := packetSocket(ns)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	for _, f := range frames {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%w: %v", contract.ErrCancelled, err)
		}
		sa := &unix.SockaddrLinklayer{Ifindex: ifindex, Halen: 6}
		copy(sa.Addr[:], f[0:6])
		if err := unix.Sendto(fd, f, 0, sa); err != nil {
			return fmt.Errorf("send announcement: %v: %w", err, contract.ErrInternal)
		}
	}
	return nil
}

func packetSocket(ns netns.NsHandle) (int, error) {
	open := func() (int, error) {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return -1, fmt.Errorf("packet socket: %v: %w", err, contract.ErrFailedPrecondition)
		}
		return fd, nil
	}
	if !ns.IsOpen() {
		return open()
	}
	type result struct {
		fd  int
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		// The thread is unlocked only if it got back to its namespace;
		// otherwise it ends with this goroutine.
		orig, err := netns.Get()
		if err != nil {
			ch <- result{-1, fmt.Errorf("current namespace: %v: %w", err, contract.ErrInternal)}
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			ch <- result{-1, fmt.Errorf("enter namespace: %v: %w", err, contract.ErrInternal)}
			return
		}
		fd, err := open()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		ch <- result{fd, err}
	}()
	r := <-ch
	return r.fd, r.err
}
