package contract

import (
	"context"
	"net/rpc"

	"github.com/hashicorp/go-plugin"
)

// NetworkPlugin is the go-plugin glue for Network. Impl is set on the
// backend side and nil on the host side.
type NetworkPlugin struct {
	Impl        Network
	BaseContext context.Context
}

var _ plugin.Plugin = (*NetworkPlugin)(nil)

// Server implements plugin.Plugin.
func (p *NetworkPlugin) Server(*plugin.MuxBroker) (interface{}, error) {
	return &NetworkRPCServer{impl: p.Impl, t: NewCallTracker(p.BaseContext)}, nil
}

// Client implements plugin.Plugin.
func (p *NetworkPlugin) Client(_ *plugin.MuxBroker, c *rpc.Client) (interface{}, error) {
	return NewNetworkRPCClient(c), nil
}

// NewNetworkRPCClient returns the host-side stub over an rpc client.
func NewNetworkRPCClient(c *rpc.Client) Network {
	return &networkRPCClient{rpcClient{c: c, grace: DefaultCancelGrace}}
}

type networkRPCClient struct{ rpcClient }

var _ Network = (*networkRPCClient)(nil)

func (s *networkRPCClient) Info(ctx context.Context) (Info, error) {
	return call[InfoRequest, Info](ctx, &s.rpcClient, "Info", InfoRequest{})
}
func (s *networkRPCClient) Configure(ctx context.Context, r ConfigureRequest) (ConfigureResponse, error) {
	return call[ConfigureRequest, ConfigureResponse](ctx, &s.rpcClient, "Configure", r)
}
func (s *networkRPCClient) Prepare(ctx context.Context, r NetPrepareRequest) (NetPrepareResponse, error) {
	return call[NetPrepareRequest, NetPrepareResponse](ctx, &s.rpcClient, "Prepare", r)
}
func (s *networkRPCClient) Activate(ctx context.Context, r ActivateRequest) (ActivateResponse, error) {
	return call[ActivateRequest, ActivateResponse](ctx, &s.rpcClient, "Activate", r)
}
func (s *networkRPCClient) Release(ctx context.Context, r ReleaseRequest) (ReleaseResponse, error) {
	return call[ReleaseRequest, ReleaseResponse](ctx, &s.rpcClient, "Release", r)
}
func (s *networkRPCClient) Status(ctx context.Context, r NetStatusRequest) (NetStatus, error) {
	return call[NetStatusRequest, NetStatus](ctx, &s.rpcClient, "Status", r)
}
func (s *networkRPCClient) Recover(ctx context.Context, r NetRecoverRequest) (NetRecoverResponse, error) {
	return call[NetRecoverRequest, NetRecoverResponse](ctx, &s.rpcClient, "Recover", r)
}
func (s *networkRPCClient) Cleanup(ctx context.Context, r NetCleanupRequest) (NetCleanupResponse, error) {
	return call[NetCleanupRequest, NetCleanupResponse](ctx, &s.rpcClient, "Cleanup", r)
}

// NetworkRPCServer is the backend-side net/rpc adapter of a Network.
type NetworkRPCServer struct {
	impl Network
	t    *CallTracker
}

// Cancel cancels the server-side ctx of a call in flight.
func (s *NetworkRPCServer) Cancel(a CancelArgs, _ *CancelReply) error {
	s.t.Cancel(a.ID)
	return nil
}

// Info serves Network.Info.
func (s *NetworkRPCServer) Info(a Args[InfoRequest], r *Reply[Info]) error {
	return serve(s.t, a, r, func(ctx context.Context, _ InfoRequest) (Info, error) { return s.impl.Info(ctx) })
}

// Configure serves Network.Configure.
func (s *NetworkRPCServer) Configure(a Args[ConfigureRequest], r *Reply[ConfigureResponse]) error {
	return serve(s.t, a, r, s.impl.Configure)
}

// Prepare serves Network.Prepare.
func (s *NetworkRPCServer) Prepare(a Args[NetPrepareRequest], r *Reply[NetPrepareResponse]) error {
	return serve(s.t, a, r, s.impl.Prepare)
}

// Activate serves Network.Activate.
func (s *NetworkRPCServer) Activate(a Args[ActivateRequest], r *Reply[ActivateResponse]) error {
	return serve(s.t, a, r, s.impl.Activate)
}

// Release serves Network.Release.
func (s *NetworkRPCServer) Release(a Args[ReleaseRequest], r *Reply[ReleaseResponse]) error {
	return serve(s.t, a, r, s.impl.Release)
}

// Status serves Network.Status.
func (s *NetworkRPCServer) Status(a Args[NetStatusRequest], r *Reply[NetStatus]) error {
	return serve(s.t, a, r, s.impl.Status)
}

// Recover serves Network.Recover.
func (s *NetworkRPCServer) Recover(a Args[NetRecoverRequest], r *Reply[NetRecoverResponse]) error {
	return serve(s.t, a, r, s.impl.Recover)
}

// Cleanup serves Network.Cleanup.
func (s *NetworkRPCServer) Cleanup(a Args[NetCleanupRequest], r *Reply[NetCleanupResponse]) error {
	return serve(s.t, a, r, s.impl.Cleanup)
}
