// Package l2tunnel is the network strategy "l2tunnel" (binary
// wanmotion-network-l2tunnel): it stretches each of a VM's L2 segments to
// the destination site with a VXLAN tunnel between the two sites'
// bridges, so the VM keeps its MAC and IP addresses, and announces the VM
// at the destination after the move (RARP, gratuitous ARP, unsolicited
// neighbour advertisements). Kernel VXLAN (netlink, Linux bridges), Open
// vSwitch VXLAN ports (ovs-vsctl), or a userspace TAP tunnel over one TCP
// stream through the WAN gateway. With keep_after_migration the kernel or
// OVS tunnels of a migration that succeeded outlive it (marked kept), until
// an admin removes them (RunCLI: "remove"). See docs/network-l2tunnel.md.
package l2tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Name is the backend name (wanmotion-network-<Name>).
const Name = "l2tunnel"

// Version is the backend's own version.
const Version = "0.1.0"

const stateVersion = 1

// Backend implements contract.Network.
type Backend struct {
	log hclog.Logger

	prepMu sync.Mutex // serialises Prepare and Recover

	mu      sync.Mutex
	cfg     Config
	dp      dataplane
	handles map[string]*handle
}

var _ contract.Network = (*Backend)(nil)

// New returns a backend with the default config (kernel mode, current
// network namespace); Configure replaces it.
func New(log hclog.Logger) *Backend {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	cfg := Config{}
	_ = cfg.setDefaults()
	return &Backend{log: log, cfg: cfg, handles: map[string]*handle{}}
}

// state is the handle state the engine checkpoints (State.Data, msgpack).
type state struct {
	ID          string        `msgpack:"id"`
	MigrationID string        `msgpack:"migration_id"`
	VMUUID      string        `msgpack:"vm_uuid"`
	Role        contract.Role `msgpack:"role"`
	Mode        string        `msgpack:"mode"`
	Local       string        `msgpack:"local"`
	Remote      string        `msgpack:"remote"`
	Port        int           `msgpack:"port"`
	MTU         int           `msgpack:"mtu"`
	Tunnels     []tunnel      `msgpack:"tunnels"`
	Token       string        `msgpack:"token"` // destination: the source's registration token
	Registered  bool          `msgpack:"registered"`
	Activated   bool          `msgpack:"activated"`
	Released    bool          `msgpack:"released"`
	Announced   []string      `msgpack:"announced"`
	// Keep: leave the tunnels in place at Cleanup if the migration
	// succeeded (config keep_after_migration or the option).
	Keep bool `msgpack:"keep"`
}

// peerParams are Endpoint.Params of the destination's endpoint.
type peerParams struct {
	Underlay string         `msgpack:"underlay"`
	Port     int            `msgpack:"port"`
	VNIs     map[string]int `msgpack:"vnis"`
}

type handle struct {
	mu      sync.Mutex
	st      state
	request []byte // fingerprint of the prepare request
	lastErr string
	reg     *registrar
	link    *tapLink          // tap mode
	peer    contract.Endpoint // tap mode, source: where to (re)dial
}

// Info implements contract.Network.
func (b *Backend) Info(context.Context) (contract.Info, error) {
	return contract.Info{
		Kind:        contract.KindNetwork,
		Name:        Name,
		Version:     Version,
		Description: "stretches the VM's L2 segments to the destination over VXLAN (kernel or Open vSwitch)",
		APIVersions: []string{contract.APIVersion10},
		Capabilities: contract.CapL2Stretch | contract.CapKeepAddress | contract.CapHookActivation |
			contract.CapResume | contract.CapUserspaceTunnel,
	}, nil
}

// Configure implements contract.Network.
func (b *Backend) Configure(_ context.Context, req contract.ConfigureRequest) (contract.ConfigureResponse, error) {
	if err := contract.CheckAPIVersion(req.APIVersion, []string{contract.APIVersion10}); err != nil {
		return contract.ConfigureResponse{}, err
	}
	cfg, warnings, err := ParseConfig(req.Config)
	if err != nil {
		return contract.ConfigureResponse{}, err
	}
	dp, err := newPlane(cfg)
	if err != nil {
		return contract.ConfigureResponse{}, err
	}
	b.mu.Lock()
	old := b.dp
	b.cfg, b.dp = cfg, dp
	b.mu.Unlock()
	if old != nil {
		old.close()
	}
	b.log.Debug("configured", "mode", cfg.Mode, "port", cfg.Port, "vni_base", cfg.VNIBase, "netns", cfg.Netns)
	return contract.ConfigureResponse{Warnings: warnings}, nil
}

func newPlane(cfg Config) (dataplane, error) {
	switch cfg.Mode {
	case ModeOVS:
		return newOVSPlane(cfg)
	case ModeTAP:
		return newTAPPlane(cfg)
	}
	return newKernelPlane(cfg.Netns)
}

// plane returns the config and the data plane, opening the default one
// on first use.
func (b *Backend) plane() (Config, dataplane, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dp == nil {
		dp, err := newPlane(b.cfg)
		if err != nil {
			return b.cfg, nil, err
		}
		b.dp = dp
	}
	return b.cfg, b.dp, nil
}

// Close stops the registration listeners and closes the data plane. It
// removes no tunnel (Cleanup does).
func (b *Backend) Close() {
	b.mu.Lock()
	hs := b.handles
	b.handles = map[string]*handle{}
	dp := b.dp
	b.dp = nil
	b.mu.Unlock()
	var links []*tapLink
	for _, h := range hs {
		h.mu.Lock()
		reg, link := h.reg, h.link
		h.reg, h.link = nil, nil
		h.mu.Unlock()
		if reg != nil {
			reg.close()
		}
		if link != nil {
			link.close()
			links = append(links, link)
		}
	}
	if dp != nil {
		dp.close() // closes the taps, which ends the links' readers
	}
	for _, l := range links {
		l.wait()
	}
}

func cancelled(ctx context.Context, what string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w: %v", what, contract.ErrCancelled, err)
	}
	return nil
}

func invalid(format string, a ...any) error {
	return fmt.Errorf(format+": %w", append(a, contract.ErrInvalidArgument)...)
}

// HandleID is the handle id of a (migration, VM, role).
func HandleID(migrationID, vmUUID string, role contract.Role) string {
	return "l2tunnel/" + string(role) + "/" + migrationID + "/" + vmUUID
}

func validatePrepare(req contract.NetPrepareRequest) error {
	if req.MigrationID == "" {
		return invalid("prepare: migration id required")
	}
	if req.Role != contract.RoleSource && req.Role != contract.RoleDestination {
		return invalid("prepare: role %q: want source or destination", req.Role)
	}
	if req.VMUUID == "" {
		return invalid("prepare: vm uuid required")
	}
	seen := map[string]bool{}
	for _, v := range req.VIFs {
		if v.Device == "" {
			return invalid("prepare: vif without a device number")
		}
		if seen[v.Device] {
			return invalid("prepare: vif device %s listed twice", v.Device)
		}
		seen[v.Device] = true
		if mac, err := net.ParseMAC(v.MAC); err != nil || len(mac) != 6 {
			return invalid("prepare: vif %s: mac %q is not an Ethernet address", v.Device, v.MAC)
		}
		if v.Bridge != "" {
			if err := checkIfName(v.Bridge); err != nil {
				return invalid("prepare: vif %s: bridge: %v", v.Device, err)
			}
		}
		for _, a := range v.IPv4 {
			if ip := net.ParseIP(a); ip == nil || ip.To4() == nil {
				return invalid("prepare: vif %s: %q is not an IPv4 address", v.Device, a)
			}
		}
		for _, a := range v.IPv6 {
			if ip := net.ParseIP(a); ip == nil || ip.To4() != nil {
				return invalid("prepare: vif %s: %q is not an IPv6 address", v.Device, a)
			}
		}
	}
	return nil
}

// fingerprint identifies a prepare request for the "prepare twice" rule
// (credentials, peer address and listen address aside).
func fingerprint(req contract.NetPrepareRequest) ([]byte, error) {
	return contract.EncodeOpaque(struct {
		MigrationID, VMUUID, VMName string
		Role                        contract.Role
		VIFs                        []contract.VIFInfo
		Options                     []byte
	}{req.MigrationID, req.VMUUID, req.VMName, req.Role, req.VIFs, req.Options})
}

// localUnderlay resolves this host's VTEP address from the config.
func localUnderlay(ctx context.Context, cfg Config, dp dataplane, hostUUID string) (net.IP, error) {
	if a, ok := cfg.UnderlayAddresses[hostUUID]; ok && hostUUID != "" {
		return net.ParseIP(a), nil
	}
	if cfg.UnderlayAddress != "" {
		return net.ParseIP(cfg.UnderlayAddress), nil
	}
	if cfg.UnderlayInterface != "" {
		return dp.localAddress(ctx, cfg.UnderlayInterface)
	}
	return nil, fmt.Errorf("no underlay address for host %q: set underlay_addresses, underlay_address or underlay_interface in the l2tunnel config: %w", hostUUID, contract.ErrFailedPrecondition)
}

func (b *Backend) get(id string) (*handle, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h, ok := b.handles[id]
	if !ok {
		return nil, fmt.Errorf("network handle %q: %w", id, contract.ErrNotFound)
	}
	return h, nil
}

func encodeState(st state) (contract.State, error) {
	d, err := contract.EncodeOpaque(st)
	if err != nil {
		return contract.State{}, fmt.Errorf("encode state: %v: %w", err, contract.ErrInternal)
	}
	return contract.State{Version: stateVersion, Data: d}, nil
}

func decodeState(s contract.State) (state, error) {
	var st state
	if s.Version > stateVersion {
		return st, invalid("state version %d is newer than this backend's %d", s.Version, stateVersion)
	}
	if err := contract.DecodeOpaque(s.Data, &st); err != nil {
		return st, fmt.Errorf("handle state: %w", err)
	}
	return st, nil
}

func (h *handle) contractHandle() (contract.Handle, error) {
	s, err := encodeState(h.st)
	if err != nil {
		return contract.Handle{}, err
	}
	return contract.Handle{ID: h.st.ID, MigrationID: h.st.MigrationID, Role: h.st.Role, State: s}, nil
}

func (st *state) params() tunnelParams {
	p := tunnelParams{Local: net.ParseIP(st.Local), Port: st.Port, MTU: st.MTU,
		Marker: Marker{MigrationID: st.MigrationID, Role: st.Role, VMUUID: st.VMUUID}}
	if st.Remote != "" {
		p.Remote = net.ParseIP(st.Remote)
	}
	return p
}

// Prepare implements contract.Network.
func (b *Backend) Prepare(ctx context.Context, req contract.NetPrepareRequest) (contract.NetPrepareResponse, error) {
	if err := cancelled(ctx, "prepare"); err != nil {
		return contract.NetPrepareResponse{}, err
	}
	if err := validatePrepare(req); err != nil {
		return contract.NetPrepareResponse{}, err
	}
	opts, err := ParseOptions(req.Options)
	if err != nil {
		return contract.NetPrepareResponse{}, err
	}
	var pp peerParams
	if req.Role == contract.RoleSource {
		if err := contract.DecodeOpaque(req.Peer.Params, &pp); err != nil {
			return contract.NetPrepareResponse{}, fmt.Errorf("prepare: peer endpoint params: %w", err)
		}
	}
	fp, err := fingerprint(req)
	if err != nil {
		return contract.NetPrepareResponse{}, err
	}
	b.prepMu.Lock()
	defer b.prepMu.Unlock()
	cfg, dp, err := b.plane()
	if err != nil {
		return contract.NetPrepareResponse{}, err
	}
	id := HandleID(req.MigrationID, req.VMUUID, req.Role)
	b.mu.Lock()
	h, exists := b.handles[id]
	b.mu.Unlock()
	if exists {
		h.mu.Lock()
		defer h.mu.Unlock()
		if !bytes.Equal(h.request, fp) {
			return contract.NetPrepareResponse{}, fmt.Errorf("prepare %s: a different request for this migration, vm and role exists: %w", id, contract.ErrAlreadyExists)
		}
		if req.Role == contract.RoleSource && !h.st.Registered && req.Peer.Address != "" {
			if err := b.registerSource(ctx, dp, h, req.Peer); err != nil {
				return contract.NetPrepareResponse{}, err
			}
		}
		ch, err := h.contractHandle()
		if err != nil {
			return contract.NetPrepareResponse{}, err
		}
		return contract.NetPrepareResponse{Handle: ch, Endpoint: h.endpoint(), Existing: true}, nil
	}

	st := state{ID: id, MigrationID: req.MigrationID, VMUUID: req.VMUUID, Role: req.Role, Mode: cfg.Mode,
		Port: cfg.Port, MTU: cfg.MTU, Keep: cfg.KeepAfterMigration}
	if opts.KeepAfterMigration != nil {
		st.Keep = *opts.KeepAfterMigration
	}
	tap := cfg.Mode == ModeTAP
	if tap && st.Keep {
		return contract.NetPrepareResponse{}, invalid("prepare: option %s", errKeepTAP)
	}
	var local net.IP
	if !tap {
		if local, err = localUnderlay(ctx, cfg, dp, req.XAPI.HostUUID); err != nil {
			return contract.NetPrepareResponse{}, err
		}
		st.Local = local.String()
	}
	if opts.MTU != 0 {
		st.MTU = opts.MTU
	}
	if pp.Port < 0 || pp.Port > 65535 {
		return contract.NetPrepareResponse{}, invalid("prepare: peer endpoint port %d out of range", pp.Port)
	}
	if req.Role == contract.RoleSource {
		if pp.Port != 0 {
			st.Port = pp.Port
		}
		st.Remote = pp.Underlay
	}
	if st.Remote == "" && !tap {
		st.Remote = cfg.PeerUnderlayAddress
	}
	switch {
	case tap:
		st.Remote = ""
		if req.Role == contract.RoleSource && req.Peer.Address == "" {
			return contract.NetPrepareResponse{}, invalid("prepare source: tap mode needs the destination's endpoint")
		}
	case st.Remote != "":
		ip := net.ParseIP(st.Remote)
		if ip == nil {
			return contract.NetPrepareResponse{}, invalid("prepare: peer underlay address %q is not an IP address", st.Remote)
		}
		if (ip.To4() == nil) != (local.To4() == nil) {
			return contract.NetPrepareResponse{}, invalid("prepare: underlay addresses %s (local) and %s (peer) are not of the same family", local, ip)
		}
	case req.Role == contract.RoleSource:
		return contract.NetPrepareResponse{}, invalid("prepare source: the destination's endpoint carries no underlay address and peer_underlay_address is not configured")
	}
	for _, v := range req.VIFs {
		t, err := tunnelFor(cfg, opts, pp, req, v)
		if err != nil {
			return contract.NetPrepareResponse{}, err
		}
		st.Tunnels = addTunnel(st.Tunnels, t)
	}
	h = &handle{st: st, request: fp}
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := b.ensureTunnels(ctx, dp, h); err != nil {
		return contract.NetPrepareResponse{}, err
	}
	b.startLink(dp, h)
	b.warnKept(ctx, dp, h.st)
	if req.Role == contract.RoleDestination {
		h.st.Token = randomHex(16)
		if err := b.startRegistrar(h, req.Listen); err != nil {
			b.stopLink(h)
			b.removeTunnels(dp, h.st)
			return contract.NetPrepareResponse{}, err
		}
	}
	b.mu.Lock()
	b.handles[id] = h
	b.mu.Unlock()
	if req.Role == contract.RoleSource && req.Peer.Address != "" {
		if err := b.registerSource(ctx, dp, h, req.Peer); err != nil {
			// The handle stays: a repeated Prepare retries the registration.
			return contract.NetPrepareResponse{}, err
		}
	}
	ch, err := h.contractHandle()
	if err != nil {
		return contract.NetPrepareResponse{}, err
	}
	b.log.Info("prepared", "handle", id, "role", string(req.Role), "tunnels", len(st.Tunnels), "local", st.Local, "remote", h.st.Remote)
	return contract.NetPrepareResponse{Handle: ch, Endpoint: h.endpoint()}, nil
}

// tunnelFor builds the tunnel of one VIF: name, VNI (peer's choice, then
// options, then derived) and bridge (request, then config by network).
func tunnelFor(cfg Config, opts Options, pp peerParams, req contract.NetPrepareRequest, v contract.VIFInfo) (tunnel, error) {
	t := tunnel{Device: v.Device, Name: IfName(req.MigrationID, req.Role, v.Device),
		VIFs: []tunnelVIF{{Device: v.Device, MAC: v.MAC, IPv4: v.IPv4, IPv6: v.IPv6}}}
	switch {
	case pp.VNIs[v.Device] != 0:
		t.VNI = pp.VNIs[v.Device]
	case opts.VNIs[v.Device] != 0:
		t.VNI = opts.VNIs[v.Device]
	default:
		t.VNI = DeriveVNI(req.MigrationID, v.Device, cfg.VNIBase, cfg.VNICount)
	}
	if t.VNI < 1 || t.VNI > maxVNI {
		return t, invalid("prepare: vif %s: vni %d out of range", v.Device, t.VNI)
	}
	network := v.NetworkUUID
	if req.Role == contract.RoleDestination && v.DestNetworkUUID != "" {
		network = v.DestNetworkUUID
	}
	t.Bridge = v.Bridge
	if t.Bridge == "" {
		t.Bridge = cfg.Bridges[network]
	}
	if t.Bridge == "" {
		return t, fmt.Errorf("prepare: vif %s: no bridge for network %q on this site (set it in the request or in the config's bridges map): %w", v.Device, network, contract.ErrFailedPrecondition)
	}
	return t, nil
}

// addTunnel adds one VIF's tunnel to ts, merging it with the tunnel of
// another VIF on the same bridge (the lower device number names both).
func addTunnel(ts []tunnel, t tunnel) []tunnel {
	for i := range ts {
		if ts[i].Bridge != t.Bridge {
			continue
		}
		if deviceLess(t.Device, ts[i].Device) {
			t.VIFs = append(t.VIFs, ts[i].VIFs...)
			ts[i] = t
		} else {
			ts[i].VIFs = append(ts[i].VIFs, t.VIFs...)
		}
		return ts
	}
	return append(ts, t)
}

// deviceLess orders VIF devices numerically ("2" < "10").
func deviceLess(a, b string) bool {
	if len(a) != len(b) {
		return len(a) < len(b)
	}
	return a < b
}

// ensureTunnels creates every tunnel of h (h.mu held); on failure it
// removes those it made.
func (b *Backend) ensureTunnels(ctx context.Context, dp dataplane, h *handle) error {
	p := h.st.params()
	for i, t := range h.st.Tunnels {
		if err := dp.ensure(ctx, t, p); err != nil {
			for _, done := range h.st.Tunnels[:i] {
				_ = dp.remove(context.Background(), done)
			}
			h.lastErr = err.Error()
			return fmt.Errorf("tunnel for vif %s: %w", t.Device, err)
		}
	}
	return nil
}

func (b *Backend) removeTunnels(dp dataplane, st state) {
	for _, t := range st.Tunnels {
		if err := dp.remove(context.Background(), t); err != nil {
			b.log.Warn("could not remove tunnel", "name", t.Name, "error", err)
		}
	}
}

func (h *handle) endpoint() contract.Endpoint {
	if h.st.Role != contract.RoleDestination {
		return contract.Endpoint{}
	}
	pp := peerParams{Underlay: h.st.Local, Port: h.st.Port, VNIs: map[string]int{}}
	for _, t := range h.st.Tunnels {
		for _, v := range t.VIFs {
			pp.VNIs[v.Device] = t.VNI
		}
	}
	params, _ := contract.EncodeOpaque(pp)
	ep := contract.Endpoint{Params: params, Token: contract.Secret(h.st.Token)}
	if h.reg != nil {
		ep.Network, ep.Address = "tcp", h.reg.addr()
	}
	return ep
}

// startRegistrar opens the destination's registration channel (h.mu held).
func (b *Backend) startRegistrar(h *handle, listen string) error {
	if h.reg != nil {
		return nil
	}
	id := h.st.ID
	r, err := startRegistrar(listen, b.log.With("handle", id), func(ctx context.Context, reg registration) (func(net.Conn), error) {
		return b.onRegistration(ctx, id, reg)
	})
	if err != nil {
		return err
	}
	h.reg = r
	return nil
}

// onRegistration applies the source's underlay address to a destination
// handle; in tap mode it takes the connection as the frame stream.
func (b *Backend) onRegistration(ctx context.Context, id string, reg registration) (func(net.Conn), error) {
	h, err := b.get(id)
	if err != nil {
		return nil, err
	}
	_, dp, err := b.plane()
	if err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if !checkToken(h.st.Token, reg.Token) || reg.MigrationID != h.st.MigrationID || reg.VMUUID != h.st.VMUUID {
		return nil, fmt.Errorf("registration does not match handle %s: %w", id, contract.ErrPermissionDenied)
	}
	if h.link != nil {
		if !reg.Stream {
			return nil, invalid("registration: this destination runs in tap mode and needs a stream")
		}
		h.st.Registered = true
		link := h.link
		b.log.Info("source stream attached", "handle", id)
		return link.attach, nil
	}
	ip := net.ParseIP(reg.Underlay)
	if ip == nil || (ip.To4() == nil) != (net.ParseIP(h.st.Local).To4() == nil) {
		return nil, invalid("registration: underlay address %q is not an address of the local underlay's family", reg.Underlay)
	}
	h.st.Remote = ip.String()
	p := h.st.params()
	for _, t := range h.st.Tunnels {
		if err := dp.setRemote(ctx, t, p); err != nil {
			h.lastErr = err.Error()
			return nil, err
		}
	}
	h.st.Registered = true
	b.log.Info("source registered", "handle", id, "remote", h.st.Remote)
	return nil, nil
}

// registerSource sends the source's registration (h.mu held); in tap mode
// it keeps the connection as the stream and keeps re-dialling it.
func (b *Backend) registerSource(ctx context.Context, dp dataplane, h *handle, peer contract.Endpoint) error {
	reg := registration{Token: string(peer.Token), MigrationID: h.st.MigrationID, VMUUID: h.st.VMUUID, Underlay: h.st.Local, Stream: h.link != nil}
	c, err := register(ctx, peer, reg)
	if err != nil {
		h.lastErr = err.Error()
		return fmt.Errorf("register with the destination: %w", err)
	}
	h.st.Registered = true
	if h.link != nil {
		h.peer = peer
		h.link.attach(c)
		h.link.dialLoop(func(ctx context.Context) (net.Conn, error) { return register(ctx, peer, reg) })
	}
	return nil
}

// startLink starts the frame pump of a tap-mode handle (h.mu held).
func (b *Backend) startLink(dp dataplane, h *handle) {
	tp, ok := dp.(*tapPlane)
	if !ok || h.link != nil {
		return
	}
	h.link = newTAPLink(b.log.With("handle", h.st.ID), tp, h.st.Tunnels)
}

// stopLink stops a handle's frame pump (h.mu held); its tap readers end
// when the taps are removed.
func (b *Backend) stopLink(h *handle) {
	if h.link != nil {
		h.link.close()
		h.link = nil
	}
}

// Activate implements contract.Network: at the destination, after the VM
// arrived, make sure the tunnels are up and announce the VM.
func (b *Backend) Activate(ctx context.Context, req contract.ActivateRequest) (contract.ActivateResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.ActivateResponse{}, err
	}
	cfg, dp, err := b.plane()
	if err != nil {
		return contract.ActivateResponse{}, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.st.Role != contract.RoleDestination {
		return contract.ActivateResponse{}, invalid("activate: handle %s is a %s handle", req.Handle, h.st.Role)
	}
	if h.link != nil {
		if err := waitConnected(ctx, h); err != nil {
			return contract.ActivateResponse{}, err
		}
	} else if h.st.Remote == "" && cfg.PeerUnderlayAddress != "" {
		h.st.Remote = cfg.PeerUnderlayAddress
	}
	if h.link == nil && h.st.Remote == "" {
		return contract.ActivateResponse{}, fmt.Errorf("activate %s: the source has not registered its underlay address and peer_underlay_address is not configured: %w", req.Handle, contract.ErrFailedPrecondition)
	}
	if err := b.ensureTunnels(ctx, dp, h); err != nil {
		return contract.ActivateResponse{}, err
	}
	tunnels := append([]tunnel(nil), h.st.Tunnels...)
	// Status must not wait for the announcements.
	h.mu.Unlock()
	announced, err := b.announce(ctx, cfg, dp, tunnels)
	h.mu.Lock()
	if err != nil {
		h.lastErr = err.Error()
		return contract.ActivateResponse{}, err
	}
	h.st.Activated, h.st.Announced = true, announced
	s, err := encodeState(h.st)
	if err != nil {
		return contract.ActivateResponse{}, err
	}
	b.log.Info("activated", "handle", req.Handle, "dom_id", req.DomID, "announced", len(announced))
	return contract.ActivateResponse{State: s, Announced: announced}, nil
}

// waitConnected waits (h.mu held, released while waiting) up to 5 s for
// the source's stream of a tap-mode handle.
func waitConnected(ctx context.Context, h *handle) error {
	deadline := time.Now().Add(5 * time.Second)
	for !h.link.connected() {
		if time.Now().After(deadline) {
			return fmt.Errorf("activate %s: the source's tap stream is not connected: %w", h.st.ID, contract.ErrFailedPrecondition)
		}
		h.mu.Unlock()
		select {
		case <-ctx.Done():
			h.mu.Lock()
			return cancelled(ctx, "activate")
		case <-time.After(20 * time.Millisecond):
		}
		h.mu.Lock()
		if h.link == nil {
			return fmt.Errorf("activate %s: handle cleaned up: %w", h.st.ID, contract.ErrNotFound)
		}
	}
	return nil
}

// announce sends, for every tunnel's VIF, a RARP (MAC only), a gratuitous
// ARP per IPv4 address and an unsolicited NA per IPv6 address on the
// VIF's bridge, AnnounceCount times.
func (b *Backend) announce(ctx context.Context, cfg Config, dp dataplane, ts []tunnel) ([]string, error) {
	type batch struct {
		bridge string
		frames [][]byte
	}
	var batches []batch
	var announced []string
	for _, t := range ts {
		bt := batch{bridge: t.Bridge}
		for _, v := range t.VIFs {
			mac, err := net.ParseMAC(v.MAC)
			if err != nil {
				return nil, invalid("announce: vif %s mac %q", v.Device, v.MAC)
			}
			f, err := RARPFrame(mac)
			if err != nil {
				return nil, invalid("announce: %v", err)
			}
			bt.frames = append(bt.frames, f)
			announced = append(announced, "rarp "+mac.String())
			for _, a := range v.IPv4 {
				f, err := GratuitousARPFrame(mac, net.ParseIP(a))
				if err != nil {
					return nil, invalid("announce: %v", err)
				}
				bt.frames = append(bt.frames, f)
				announced = append(announced, "garp "+a+" "+mac.String())
			}
			for _, a := range v.IPv6 {
				f, err := UnsolicitedNAFrame(mac, net.ParseIP(a))
				if err != nil {
					return nil, invalid("announce: %v", err)
				}
				bt.frames = append(bt.frames, f)
				announced = append(announced, "na "+a+" "+mac.String())
			}
		}
		batches = append(batches, bt)
	}
	for i := 0; i < cfg.AnnounceCount; i++ {
		if i > 0 {
			select {
			case <-ctx.Done():
				return nil, cancelled(ctx, "announce")
			case <-time.After(time.Duration(cfg.AnnounceIntervalMS) * time.Millisecond):
			}
		}
		for _, bt := range batches {
			if err := dp.send(ctx, bt.bridge, bt.frames); err != nil {
				return nil, err
			}
		}
	}
	return announced, nil
}

// Release implements contract.Network: the source keeps its tunnels until
// Cleanup (frames still in flight toward the old site reach the VM through
// them) and only records the release.
func (b *Backend) Release(_ context.Context, req contract.ReleaseRequest) (contract.ReleaseResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.ReleaseResponse{}, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.st.Role != contract.RoleSource {
		return contract.ReleaseResponse{}, invalid("release: handle %s is a %s handle", req.Handle, h.st.Role)
	}
	h.st.Released = true
	s, err := encodeState(h.st)
	if err != nil {
		return contract.ReleaseResponse{}, err
	}
	return contract.ReleaseResponse{State: s}, nil
}

// Status implements contract.Network.
func (b *Backend) Status(ctx context.Context, req contract.NetStatusRequest) (contract.NetStatus, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.NetStatus{}, err
	}
	_, dp, err := b.plane()
	if err != nil {
		return contract.NetStatus{}, err
	}
	h.mu.Lock()
	st, lastErr, link := h.st, h.lastErr, h.link
	h.mu.Unlock()
	s := b.status(ctx, dp, st, lastErr)
	if link != nil {
		s.Detail += "; stream " + map[bool]string{true: "connected", false: "not connected"}[link.connected()]
	}
	return s, nil
}

func (b *Backend) status(ctx context.Context, dp dataplane, st state, lastErr string) contract.NetStatus {
	s := contract.NetStatus{Handle: st.ID, Role: st.Role, State: contract.StatePrepared, LastError: lastErr}
	switch {
	case st.Activated:
		s.State = contract.StateActive
	case st.Released:
		s.State = contract.StateReleased
	}
	parts := make([]string, 0, len(st.Tunnels))
	for _, t := range st.Tunnels {
		parts = append(parts, dp.describe(ctx, t))
	}
	s.Detail = strings.Join(parts, "; ")
	return s
}

// Recover implements contract.Network: re-bind a handle from its state,
// re-creating tunnels that are gone, re-opening the destination's
// registration channel (new address) and re-registering the source.
func (b *Backend) Recover(ctx context.Context, req contract.NetRecoverRequest) (contract.NetRecoverResponse, error) {
	if err := cancelled(ctx, "recover"); err != nil {
		return contract.NetRecoverResponse{}, err
	}
	st, err := decodeState(req.Handle.State)
	if err != nil {
		return contract.NetRecoverResponse{}, err
	}
	if st.ID == "" || st.ID != req.Handle.ID {
		return contract.NetRecoverResponse{}, invalid("recover: state does not belong to handle %q", req.Handle.ID)
	}
	b.prepMu.Lock()
	defer b.prepMu.Unlock()
	_, dp, err := b.plane()
	if err != nil {
		return contract.NetRecoverResponse{}, err
	}
	b.mu.Lock()
	h, ok := b.handles[st.ID]
	b.mu.Unlock()
	if !ok {
		h = &handle{st: st}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if ok {
		// Keep what this process learned since the state was written.
		if h.st.Remote == "" {
			h.st.Remote = st.Remote
		}
		h.st.Activated = h.st.Activated || st.Activated
		h.st.Released = h.st.Released || st.Released
	}
	if h.st.Remote == "" && len(h.st.Tunnels) > 0 {
		if r, err := dp.remote(ctx, h.st.Tunnels[0]); err == nil && r != nil {
			h.st.Remote = r.String()
		}
	}
	if err := b.ensureTunnels(ctx, dp, h); err != nil {
		return contract.NetRecoverResponse{}, err
	}
	b.startLink(dp, h)
	if h.st.Role == contract.RoleDestination {
		if err := b.startRegistrar(h, ""); err != nil {
			return contract.NetRecoverResponse{}, err
		}
	}
	if !ok {
		b.mu.Lock()
		b.handles[st.ID] = h
		b.mu.Unlock()
	}
	if h.st.Role == contract.RoleSource && req.Peer.Address != "" {
		if h.link != nil && h.peer.Address != "" {
			// A running stream dials the old address: start over.
			h.link.close()
			h.link = nil
			b.startLink(dp, h)
		}
		if err := b.registerSource(ctx, dp, h, req.Peer); err != nil {
			return contract.NetRecoverResponse{}, err
		}
	}
	ch, err := h.contractHandle()
	if err != nil {
		return contract.NetRecoverResponse{}, err
	}
	b.log.Info("recovered", "handle", st.ID, "role", string(st.Role), "remote", h.st.Remote)
	return contract.NetRecoverResponse{Handle: ch, Status: b.status(ctx, dp, h.st, h.lastErr), Endpoint: h.endpoint()}, nil
}

// Cleanup implements contract.Network: delete the tunnels the state names
// and any other tunnel of this migration and role (a crash between
// creating a tunnel and returning the state), stop the registration
// channel, forget the handle. Idempotent.
//
// With keep (keep_after_migration) and a migration that succeeded on this
// site (destination: activated; source: released), it leaves the tunnels
// in place, marked kept, and stops only the registration channel. It
// never deletes a kept tunnel, nor one whose marker names another
// migration.
func (b *Backend) Cleanup(ctx context.Context, req contract.NetCleanupRequest) (contract.NetCleanupResponse, error) {
	_, dp, err := b.plane()
	if err != nil {
		return contract.NetCleanupResponse{}, err
	}
	var st state
	if len(req.Handle.State.Data) > 0 {
		if st, err = decodeState(req.Handle.State); err != nil {
			return contract.NetCleanupResponse{}, err
		}
	}
	b.mu.Lock()
	h, ok := b.handles[req.Handle.ID]
	delete(b.handles, req.Handle.ID)
	b.mu.Unlock()
	if ok {
		h.mu.Lock()
		reg := h.reg
		h.reg = nil
		link := h.link
		h.link = nil
		saved := st
		if len(h.st.Tunnels) >= len(st.Tunnels) {
			st = h.st
		}
		st.Activated = st.Activated || saved.Activated
		st.Released = st.Released || saved.Released
		st.Keep = st.Keep || saved.Keep
		h.mu.Unlock()
		if reg != nil {
			reg.close() // outside h.mu: a registration in flight takes it
		}
		if link != nil {
			link.close()
			defer link.wait() // after the taps are removed below
		}
	}
	if keep, why := keepTunnels(st); keep {
		return contract.NetCleanupResponse{}, b.keep(ctx, dp, req.Handle.ID, st)
	} else if st.Keep {
		b.log.Info("tunnels not kept", "handle", req.Handle.ID, "reason", why)
	}
	mig, role := req.Handle.MigrationID, req.Handle.Role
	if mig == "" {
		mig, role = st.MigrationID, st.Role
	}
	found, err := dp.list(ctx)
	if err != nil {
		return contract.NetCleanupResponse{}, fmt.Errorf("cleanup %s: %w", req.Handle.ID, err)
	}
	byName := map[string]FoundTunnel{}
	for _, f := range found {
		byName[f.Name] = f
	}
	var errs []error
	for _, t := range st.Tunnels {
		if f, ok := byName[t.Name]; ok && f.foreign(mig) {
			b.log.Warn("tunnel left alone", "name", t.Name, "marker", f.Marker.Alias())
			continue
		}
		if err := dp.remove(ctx, t); err != nil {
			errs = append(errs, err)
		}
	}
	if mig != "" && (role == contract.RoleSource || role == contract.RoleDestination) {
		prefix := IfPrefix(mig, role)
		var gone []string
		for _, f := range found {
			if !strings.HasPrefix(f.Name, prefix) || f.foreign(mig) || inTunnels(st.Tunnels, f.Name) {
				continue
			}
			if err := dp.removeName(ctx, f.Name); err != nil {
				errs = append(errs, err)
				continue
			}
			gone = append(gone, f.Name)
		}
		if len(gone) > 0 {
			b.log.Info("removed leftover tunnels", "names", strings.Join(gone, ","))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return contract.NetCleanupResponse{}, fmt.Errorf("cleanup %s: %w", req.Handle.ID, err)
	}
	if ok || len(st.Tunnels) > 0 {
		b.log.Info("cleaned up", "handle", req.Handle.ID)
	}
	return contract.NetCleanupResponse{}, nil
}

// keepTunnels decides from a handle's state whether Cleanup keeps its
// tunnels, and if not, why (for the log).
func keepTunnels(st state) (bool, string) {
	switch {
	case !st.Keep:
		return false, "keep_after_migration is off"
	case st.Mode == ModeTAP:
		return false, "tap mode"
	case len(st.Tunnels) == 0:
		return false, "no tunnels in the state"
	case st.Role == contract.RoleDestination && !st.Activated:
		return false, "the destination was not activated (the migration did not complete)"
	case st.Role == contract.RoleSource && !st.Released:
		return false, "the source was not released (the migration did not complete)"
	case st.Role != contract.RoleSource && st.Role != contract.RoleDestination:
		return false, "unknown role"
	}
	return true, ""
}

// keep marks the tunnels of a finished migration kept and leaves them.
func (b *Backend) keep(ctx context.Context, dp dataplane, id string, st state) error {
	m := st.params().Marker
	m.Kept = true
	var kept, missing []string
	for _, t := range st.Tunnels {
		ok, err := dp.mark(ctx, t, m)
		if err != nil {
			return fmt.Errorf("cleanup %s: keep %s: %w", id, t.Name, err)
		}
		if ok {
			kept = append(kept, t.Name)
		} else {
			missing = append(missing, t.Name)
		}
	}
	if len(missing) > 0 {
		b.log.Warn("tunnels to keep are gone", "handle", id, "names", strings.Join(missing, ","))
	}
	b.log.Info("kept tunnels after the migration", "handle", id, "migration_id", st.MigrationID, "role", string(st.Role),
		"names", strings.Join(kept, ","), "remote", st.Remote,
		"remove_with", "wanmotion-network-l2tunnel remove --mode "+st.Mode+" --migration "+st.MigrationID)
	return nil
}

// warnKept logs the kept tunnels of an earlier migration of the same VM
// on this host: when the VM moves again they only duplicate broadcasts
// (or, with the same VNI, block the new tunnel) and should be removed.
func (b *Backend) warnKept(ctx context.Context, dp dataplane, st state) {
	if st.Mode == ModeTAP {
		return
	}
	found, err := dp.list(ctx)
	if err != nil {
		return
	}
	for _, f := range found {
		if f.Marked && f.Marker.Kept && f.Marker.VMUUID == st.VMUUID && f.Marker.MigrationID != st.MigrationID {
			b.log.Warn("this vm has a tunnel kept from an earlier migration on this host; remove it when it is no longer needed",
				"vm_uuid", st.VMUUID, "name", f.Name, "kept_migration_id", f.Marker.MigrationID,
				"remove_with", "wanmotion-network-l2tunnel remove --mode "+st.Mode+" --migration "+f.Marker.MigrationID)
		}
	}
}

func inTunnels(ts []tunnel, name string) bool {
	for _, t := range ts {
		if t.Name == name {
			return true
		}
	}
	return false
}

func randomHex(n int) string {
	p := make([]byte, n)
	_, _ = rand.Read(p)
	return hex.EncodeToString(p)
}
