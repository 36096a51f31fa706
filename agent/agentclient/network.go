package agentclient

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// netState is NetSpec.State: both sites' handles and the destination's
// endpoint (its Address as the destination sees it).
type netState struct {
	V            int               `msgpack:"v"`
	Dest         *contract.Handle  `msgpack:"dest"`
	Source       *contract.Handle  `msgpack:"source"`
	DestEndpoint contract.Endpoint `msgpack:"dest_endpoint"`
}

func decodeNet(b []byte) (netState, error) {
	st := netState{V: 1}
	if err := contract.DecodeOpaque(b, &st); err != nil {
		return st, fmt.Errorf("network state: %w", err)
	}
	return st, nil
}

func (st netState) encode() ([]byte, error) {
	st.V = 1
	return contract.EncodeOpaque(st)
}

// vifs turns the plan's VIFs into the backends' VIFInfo: network UUIDs at
// both sites, and the guest-reported addresses (copied, so a backend in
// this process cannot change the plan).
func (n *Network) vifs(ctx context.Context, spec engine.NetSpec) ([]contract.VIFInfo, error) {
	out := make([]contract.VIFInfo, 0, len(spec.VIFs))
	for _, v := range spec.VIFs {
		src, err := n.c.uuidOf(ctx, contract.RoleSource, v.NetworkRef)
		if err != nil {
			return nil, err
		}
		dst, err := n.c.uuidOf(ctx, contract.RoleDestination, spec.VIFMap[v.Ref])
		if err != nil {
			return nil, err
		}
		out = append(out, contract.VIFInfo{Device: v.Device, MAC: v.MAC, NetworkUUID: src, DestNetworkUUID: dst,
			IPv4: slices.Clone(v.IPv4), IPv6: slices.Clone(v.IPv6)})
	}
	return out, nil
}

// withBridges returns a copy of vifs with Bridge set to the bridge of
// each VIF's network at site (the source network, or the mapped
// destination network), when Config.BridgeOf is set.
func (n *Network) withBridges(ctx context.Context, spec engine.NetSpec, vifs []contract.VIFInfo, site contract.Role) ([]contract.VIFInfo, error) {
	out := append([]contract.VIFInfo(nil), vifs...)
	if n.c.cfg.BridgeOf == nil {
		return out, nil
	}
	for i, v := range spec.VIFs {
		ref := v.NetworkRef
		if site == contract.RoleDestination {
			ref = spec.VIFMap[v.Ref]
		}
		if ref == "" {
			continue
		}
		b, err := n.c.cfg.BridgeOf(ctx, site, ref)
		if err != nil {
			return nil, fmt.Errorf("bridge of network %s at the %s: %w", ref, site, err)
		}
		out[i].Bridge = b
	}
	return out, nil
}

// peerOf makes the destination endpoint reachable from the source through
// the gateway (when it has an address).
func (n *Network) peerOf(ctx context.Context, id string, ep contract.Endpoint) (contract.Endpoint, error) {
	if ep.Address == "" || ep.Network == "unix" {
		return ep, nil
	}
	local, err := n.c.Gateway().Forward(ctx, id, ep.Address)
	if err != nil {
		return ep, fmt.Errorf("forward the network peer: %w", err)
	}
	ep.Address = local
	return ep, nil
}

// Prepare implements engine.NetworkBackend: destination first, then the
// source with the destination's endpoint through the gateway.
func (n *Network) Prepare(ctx context.Context, spec engine.NetSpec) ([]byte, error) {
	c := n.c
	st, err := decodeNet(spec.State)
	if err != nil {
		return nil, err
	}
	vifs, err := n.vifs(ctx, spec)
	if err != nil {
		return nil, err
	}
	req := contract.NetPrepareRequest{MigrationID: spec.MigrationID, VMUUID: spec.VMUUID, VMName: spec.VMName}
	if req.VIFs, err = n.withBridges(ctx, spec, vifs, contract.RoleDestination); err != nil {
		return nil, err
	}
	req.Role = contract.RoleDestination
	if req.XAPI, err = c.xapi(ctx, contract.RoleDestination, spec.MigrationID); err != nil {
		return nil, err
	}
	dresp, err := callRole[contract.NetPrepareRequest, contract.NetPrepareResponse](ctx, c, spec.MigrationID, contract.RoleDestination, agent.MethodNetworkPrepare, req)
	if err != nil {
		return nil, fmt.Errorf("prepare network at the destination: %w", err)
	}
	st.Dest, st.DestEndpoint = &dresp.Handle, dresp.Endpoint
	req.Role = contract.RoleSource
	if req.VIFs, err = n.withBridges(ctx, spec, vifs, contract.RoleSource); err != nil {
		return nil, err
	}
	if req.Peer, err = n.peerOf(ctx, spec.MigrationID, dresp.Endpoint); err != nil {
		return nil, err
	}
	if req.XAPI, err = c.xapi(ctx, contract.RoleSource, spec.MigrationID); err != nil {
		return nil, err
	}
	sresp, err := callRole[contract.NetPrepareRequest, contract.NetPrepareResponse](ctx, c, spec.MigrationID, contract.RoleSource, agent.MethodNetworkPrepare, req)
	if err != nil {
		return nil, fmt.Errorf("prepare network at the source: %w", err)
	}
	st.Source = &sresp.Handle
	return st.encode()
}

// Recover implements engine.NetworkBackend: both handles, the source with
// the destination's (possibly new) endpoint.
func (n *Network) Recover(ctx context.Context, spec engine.NetSpec) ([]byte, error) {
	c := n.c
	st, err := decodeNet(spec.State)
	if err != nil {
		return nil, err
	}
	if st.Dest != nil {
		x, err := c.xapi(ctx, contract.RoleDestination, spec.MigrationID)
		if err != nil {
			return nil, err
		}
		resp, err := callRole[contract.NetRecoverRequest, contract.NetRecoverResponse](ctx, c, spec.MigrationID, contract.RoleDestination, agent.MethodNetworkRecover,
			contract.NetRecoverRequest{Handle: *st.Dest, XAPI: x})
		if err != nil {
			return nil, fmt.Errorf("recover network at the destination: %w", err)
		}
		st.Dest = &resp.Handle
		if ep := resp.Endpoint; ep.Network != "" || ep.Address != "" || ep.Token != "" || len(ep.Params) > 0 {
			st.DestEndpoint = resp.Endpoint
		}
	}
	if st.Source != nil {
		x, err := c.xapi(ctx, contract.RoleSource, spec.MigrationID)
		if err != nil {
			return nil, err
		}
		peer, err := n.peerOf(ctx, spec.MigrationID, st.DestEndpoint)
		if err != nil {
			return nil, err
		}
		resp, err := callRole[contract.NetRecoverRequest, contract.NetRecoverResponse](ctx, c, spec.MigrationID, contract.RoleSource, agent.MethodNetworkRecover,
			contract.NetRecoverRequest{Handle: *st.Source, XAPI: x, Peer: peer})
		if err != nil {
			return nil, fmt.Errorf("recover network at the source: %w", err)
		}
		st.Source = &resp.Handle
	}
	return st.encode()
}

// Activate implements engine.NetworkBackend (destination handle).
func (n *Network) Activate(ctx context.Context, spec engine.NetSpec) ([]byte, error) {
	st, err := decodeNet(spec.State)
	if err != nil {
		return nil, err
	}
	if st.Dest == nil {
		return nil, fmt.Errorf("activate: no destination network handle: %w", contract.ErrNotFound)
	}
	resp, err := callRole[contract.ActivateRequest, contract.ActivateResponse](ctx, n.c, spec.MigrationID, contract.RoleDestination, agent.MethodNetworkActivate,
		contract.ActivateRequest{Handle: st.Dest.ID})
	if err != nil {
		return nil, fmt.Errorf("activate network at the destination: %w", err)
	}
	if resp.State.Data != nil || resp.State.Version != 0 {
		st.Dest.State = resp.State
	}
	return st.encode()
}

// Release implements engine.NetworkBackend (source handle).
func (n *Network) Release(ctx context.Context, spec engine.NetSpec) ([]byte, error) {
	st, err := decodeNet(spec.State)
	if err != nil {
		return nil, err
	}
	if st.Source == nil {
		return nil, fmt.Errorf("release: no source network handle: %w", contract.ErrNotFound)
	}
	resp, err := callRole[contract.ReleaseRequest, contract.ReleaseResponse](ctx, n.c, spec.MigrationID, contract.RoleSource, agent.MethodNetworkRelease,
		contract.ReleaseRequest{Handle: st.Source.ID})
	if err != nil {
		return nil, fmt.Errorf("release network at the source: %w", err)
	}
	if resp.State.Data != nil || resp.State.Version != 0 {
		st.Source.State = resp.State
	}
	return st.encode()
}

// Cleanup implements engine.NetworkBackend (both handles, from the state).
func (n *Network) Cleanup(ctx context.Context, spec engine.NetSpec) error {
	st, err := decodeNet(spec.State)
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range []struct {
		role contract.Role
		h    *contract.Handle
	}{{contract.RoleDestination, st.Dest}, {contract.RoleSource, st.Source}} {
		if p.h == nil {
			continue
		}
		x, err := n.c.xapi(ctx, p.role, spec.MigrationID)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if _, err := callRole[contract.NetCleanupRequest, contract.NetCleanupResponse](ctx, n.c, spec.MigrationID, p.role, agent.MethodNetworkCleanup,
			contract.NetCleanupRequest{Handle: *p.h, XAPI: x}); err != nil {
			errs = append(errs, fmt.Errorf("cleanup network at the %s: %w", p.role, err))
		}
	}
	return errors.Join(errs...)
}
