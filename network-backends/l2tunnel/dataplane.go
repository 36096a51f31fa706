package l2tunnel

import (
	"context"
	"net"
)

// tunnel is one L2 segment's tunnel on one site (persisted in the handle
// state): every VIF of the VM on the same bridge shares it (two tunnels
// between the same two bridges would make a loop). Its name and VNI are
// those of its lowest VIF device.
type tunnel struct {
	Device string      `msgpack:"device"`
	Name   string      `msgpack:"name"`
	VNI    int         `msgpack:"vni"`
	Bridge string      `msgpack:"bridge"`
	VIFs   []tunnelVIF `msgpack:"vifs"`
}

// tunnelVIF is a VIF announced on its tunnel's bridge by Activate.
type tunnelVIF struct {
	Device string   `msgpack:"device"`
	MAC    string   `msgpack:"mac"`
	IPv4   []string `msgpack:"ipv4"`
	IPv6   []string `msgpack:"ipv6"`
}

// tunnelParams are the per-handle parameters of a tunnel.
type tunnelParams struct {
	Local  net.IP
	Remote net.IP // nil: not known yet
	Port   int
	MTU    int // 0: underlay MTU minus the VXLAN overhead
	// Marker is written on the tunnel (kernel: alias; OVS: external_ids).
	Marker Marker
}

// dataplane creates and removes tunnels. kernelPlane and ovsPlane
// implement it.
type dataplane interface {
	// ensure creates the tunnel if missing (or wrong), attaches it to its
	// bridge, sets it up and, when known, its remote. Idempotent.
	ensure(ctx context.Context, t tunnel, p tunnelParams) error
	// setRemote points the tunnel's flooding (default) destination at remote.
	setRemote(ctx context.Context, t tunnel, p tunnelParams) error
	// remote returns the tunnel's current remote, nil if none or no tunnel.
	remote(ctx context.Context, t tunnel) (net.IP, error)
	// remove deletes the tunnel; a missing tunnel is not an error.
	remove(ctx context.Context, t tunnel) error
	// list returns every tunnel of this backend on the host: names that
	// start with "wm" (kernel: vxlan interfaces only) or carry our marker.
	list(ctx context.Context) ([]FoundTunnel, error)
	// removeName deletes the tunnel called name; a missing one is not an
	// error.
	removeName(ctx context.Context, name string) error
	// mark rewrites the tunnel's marker; false when the tunnel does not
	// exist.
	mark(ctx context.Context, t tunnel, m Marker) (bool, error)
	// describe is a one-line state of the tunnel for Status.
	describe(ctx context.Context, t tunnel) string
	// localAddress returns the first global address of an interface.
	localAddress(ctx context.Context, ifname string) (net.IP, error)
	// send transmits raw Ethernet frames on an interface (the bridge).
	send(ctx context.Context, ifname string, frames [][]byte) error
	close()
}
