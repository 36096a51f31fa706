package agentclient

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Start implements engine.Gateway: the destination agent listens on
// spec.Listen, the source agent dials spec.Advertise (or the listen
// address when Advertise is empty). Idempotent; a dead source session is
// re-dialled.
func (g *Gateway) Start(ctx context.Context, spec engine.GatewaySpec) error {
	c := g.c
	lresp, err := callRole[agent.GatewayListenRequest, agent.GatewayListenResponse](ctx, c, spec.MigrationID, contract.RoleDestination, agent.MethodGatewayListen,
		agent.GatewayListenRequest{Addr: spec.Listen})
	if err != nil {
		return fmt.Errorf("gateway listen at the destination: %w", err)
	}
	dial := spec.Advertise
	if dial == "" {
		host, _, err := net.SplitHostPort(lresp.Addr)
		if err != nil {
			return fmt.Errorf("gateway listen address %q: %w", lresp.Addr, err)
		}
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
			return fmt.Errorf("the destination gateway listens on %s (all addresses): set the advertised address (gateway_advertise) the source should dial: %w",
				lresp.Addr, contract.ErrInvalidArgument)
		}
		dial = lresp.Addr
	}
	_, err = callRole[agent.GatewayDialRequest, agent.GatewayDialResponse](ctx, c, spec.MigrationID, contract.RoleSource, agent.MethodGatewayDial,
		agent.GatewayDialRequest{Addr: dial, Streams: spec.Streams, Compression: spec.Compression, BandwidthBytesPerSec: spec.BandwidthBytesPerSec})
	if err != nil {
		return fmt.Errorf("gateway dial from the source to %s: %w", dial, err)
	}
	if spec.BandwidthBytesPerSec > 0 {
		// The cap applies to what each side sends: cap the way back too.
		if _, err := callRole[agent.SetRateLimitRequest, agent.Empty](ctx, c, spec.MigrationID, contract.RoleDestination, agent.MethodGatewaySetRateLimit,
			agent.SetRateLimitRequest{BytesPerSec: spec.BandwidthBytesPerSec}); err != nil {
			return fmt.Errorf("gateway rate limit at the destination: %w", err)
		}
	}
	return nil
}

// Forward implements engine.Gateway: the destination agent is told to
// allow target, and the source agent returns its local end for it.
func (g *Gateway) Forward(ctx context.Context, migrationID, target string) (string, error) {
	c := g.c
	if _, err := callRole[agent.GatewayAllowRequest, agent.Empty](ctx, c, migrationID, contract.RoleDestination, agent.MethodGatewayAllow,
		agent.GatewayAllowRequest{Targets: []string{target}}); err != nil {
		return "", fmt.Errorf("gateway allow %s: %w", target, err)
	}
	resp, err := callRole[agent.GatewayForwardRequest, agent.GatewayForwardResponse](ctx, c, migrationID, contract.RoleSource, agent.MethodGatewayForward,
		agent.GatewayForwardRequest{Target: target})
	if err != nil {
		return "", fmt.Errorf("gateway forward to %s: %w", target, err)
	}
	return resp.Addr, nil
}

// Stats implements engine.Gateway: what both agents wrote (payload handed
// to the gateway and bytes on the wire, both directions).
func (g *Gateway) Stats(ctx context.Context, migrationID string) (engine.GatewayStats, error) {
	st, err := g.Detail(ctx, migrationID)
	if err != nil {
		return engine.GatewayStats{}, err
	}
	return engine.GatewayStats{
		BytesOffered: st[contract.RoleSource].BytesOffered + st[contract.RoleDestination].BytesOffered,
		BytesOnWire:  st[contract.RoleSource].BytesOnWire + st[contract.RoleDestination].BytesOnWire,
	}, nil
}

// Detail returns each agent's gateway counters.
func (g *Gateway) Detail(ctx context.Context, migrationID string) (map[contract.Role]agent.GatewayStatsResponse, error) {
	out := map[contract.Role]agent.GatewayStatsResponse{}
	for _, role := range roles {
		st, err := callRole[agent.Empty, agent.GatewayStatsResponse](ctx, g.c, migrationID, role, agent.MethodGatewayStats, agent.Empty{})
		if err != nil {
			return nil, fmt.Errorf("gateway stats: %w", err)
		}
		out[role] = st
	}
	return out, nil
}

// SetRateLimit changes the bandwidth cap of both ends while they run
// (bytes/s, 0 = unlimited).
func (g *Gateway) SetRateLimit(ctx context.Context, migrationID string, bytesPerSec int64) error {
	var errs []error
	for _, role := range roles {
		if _, err := callRole[agent.SetRateLimitRequest, agent.Empty](ctx, g.c, migrationID, role, agent.MethodGatewaySetRateLimit,
			agent.SetRateLimitRequest{BytesPerSec: bytesPerSec}); err != nil {
			errs = append(errs, fmt.Errorf("set rate limit at the %s: %w", role, err))
		}
	}
	return errors.Join(errs...)
}

// Stop implements engine.Gateway (both ends; idempotent; a migration whose
// agents are gone counts as stopped).
func (g *Gateway) Stop(ctx context.Context, migrationID string) error {
	var errs []error
	for _, role := range []contract.Role{contract.RoleSource, contract.RoleDestination} {
		_, err := callRole[agent.Empty, agent.Empty](ctx, g.c, migrationID, role, agent.MethodGatewayStop, agent.Empty{})
		if err != nil && !errors.Is(err, ErrNotStarted) {
			errs = append(errs, fmt.Errorf("gateway stop at the %s: %w", role, err))
		}
	}
	return errors.Join(errs...)
}
