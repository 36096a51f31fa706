package contract

import (
	"context"
	"net/rpc"

	"github.com/hashicorp/go-plugin"
)

// StoragePlugin is the go-plugin glue for Storage. Impl is set on the
// backend side and nil on the host side.
type StoragePlugin struct {
	Impl Storage
	// BaseContext is the parent of every server-side call ctx (optional).
	BaseContext context.Context
}

var _ plugin.Plugin = (*StoragePlugin)(nil)

// Server implements plugin.Plugin.
func (p *StoragePlugin) Server(*plugin.MuxBroker) (interface{}, error) {
	return &StorageRPCServer{impl: p.Impl, t: NewCallTracker(p.BaseContext)}, nil
}

// Client implements plugin.Plugin.
func (p *StoragePlugin) Client(_ *plugin.MuxBroker, c *rpc.Client) (interface{}, error) {
	return NewStorageRPCClient(c), nil
}

// NewStorageRPCClient returns the host-side stub over an rpc client.
func NewStorageRPCClient(c *rpc.Client) Storage {
	return &storageRPCClient{rpcClient{c: c, grace: DefaultCancelGrace}}
}

type storageRPCClient struct{ rpcClient }

var _ Storage = (*storageRPCClient)(nil)

// InfoRequest is the (empty) request of Info.
type InfoRequest struct{}

func (s *storageRPCClient) Info(ctx context.Context) (Info, error) {
	return call[InfoRequest, Info](ctx, &s.rpcClient, "Info", InfoRequest{})
}
func (s *storageRPCClient) Configure(ctx context.Context, r ConfigureRequest) (ConfigureResponse, error) {
	return call[ConfigureRequest, ConfigureResponse](ctx, &s.rpcClient, "Configure", r)
}
func (s *storageRPCClient) PrepareReceiver(ctx context.Context, r PrepareReceiverRequest) (PrepareReceiverResponse, error) {
	return call[PrepareReceiverRequest, PrepareReceiverResponse](ctx, &s.rpcClient, "PrepareReceiver", r)
}
func (s *storageRPCClient) PrepareSender(ctx context.Context, r PrepareSenderRequest) (PrepareSenderResponse, error) {
	return call[PrepareSenderRequest, PrepareSenderResponse](ctx, &s.rpcClient, "PrepareSender", r)
}
func (s *storageRPCClient) SyncRound(ctx context.Context, r SyncRoundRequest) (SyncRoundResponse, error) {
	return call[SyncRoundRequest, SyncRoundResponse](ctx, &s.rpcClient, "SyncRound", r)
}
func (s *storageRPCClient) Status(ctx context.Context, r StatusRequest) (StorageStatus, error) {
	return call[StatusRequest, StorageStatus](ctx, &s.rpcClient, "Status", r)
}
func (s *storageRPCClient) Converge(ctx context.Context, r ConvergeRequest) (ConvergeResponse, error) {
	return call[ConvergeRequest, ConvergeResponse](ctx, &s.rpcClient, "Converge", r)
}
func (s *storageRPCClient) Finalize(ctx context.Context, r FinalizeRequest) (FinalizeResponse, error) {
	return call[FinalizeRequest, FinalizeResponse](ctx, &s.rpcClient, "Finalize", r)
}
func (s *storageRPCClient) Recover(ctx context.Context, r RecoverRequest) (RecoverResponse, error) {
	return call[RecoverRequest, RecoverResponse](ctx, &s.rpcClient, "Recover", r)
}
func (s *storageRPCClient) Abort(ctx context.Context, r AbortRequest) (AbortResponse, error) {
	return call[AbortRequest, AbortResponse](ctx, &s.rpcClient, "Abort", r)
}
func (s *storageRPCClient) Cleanup(ctx context.Context, r CleanupRequest) (CleanupResponse, error) {
	return call[CleanupRequest, CleanupResponse](ctx, &s.rpcClient, "Cleanup", r)
}

// StorageRPCServer is the backend-side net/rpc adapter of a Storage. Its
// exported methods are the wire method table.
type StorageRPCServer struct {
	impl Storage
	t    *CallTracker
}

// Cancel cancels the server-side ctx of a call in flight.
func (s *StorageRPCServer) Cancel(a CancelArgs, _ *CancelReply) error {
	s.t.Cancel(a.ID)
	return nil
}

// Info serves Storage.Info.
func (s *StorageRPCServer) Info(a Args[InfoRequest], r *Reply[Info]) error {
	return serve(s.t, a, r, func(ctx context.Context, _ InfoRequest) (Info, error) { return s.impl.Info(ctx) })
}

// Configure serves Storage.Configure.
func (s *StorageRPCServer) Configure(a Args[ConfigureRequest], r *Reply[ConfigureResponse]) error {
	return serve(s.t, a, r, s.impl.Configure)
}

// PrepareReceiver serves Storage.PrepareReceiver.
func (s *StorageRPCServer) PrepareReceiver(a Args[PrepareReceiverRequest], r *Reply[PrepareReceiverResponse]) error {
	return serve(s.t, a, r, s.impl.PrepareReceiver)
}

// PrepareSender serves Storage.PrepareSender.
func (s *StorageRPCServer) PrepareSender(a Args[PrepareSenderRequest], r *Reply[PrepareSenderResponse]) error {
	return serve(s.t, a, r, s.impl.PrepareSender)
}

// SyncRound serves Storage.SyncRound.
func (s *StorageRPCServer) SyncRound(a Args[SyncRoundRequest], r *Reply[SyncRoundResponse]) error {
	return serve(s.t, a, r, s.impl.SyncRound)
}

// Status serves Storage.Status.
func (s *StorageRPCServer) Status(a Args[StatusRequest], r *Reply[StorageStatus]) error {
	return serve(s.t, a, r, s.impl.Status)
}

// Converge serves Storage.Converge.
func (s *StorageRPCServer) Converge(a Args[ConvergeRequest], r *Reply[ConvergeResponse]) error {
	return serve(s.t, a, r, s.impl.Converge)
}

// Finalize serves Storage.Finalize.
func (s *StorageRPCServer) Finalize(a Args[FinalizeRequest], r *Reply[FinalizeResponse]) error {
	return serve(s.t, a, r, s.impl.Finalize)
}

// Recover serves Storage.Recover.
func (s *StorageRPCServer) Recover(a Args[RecoverRequest], r *Reply[RecoverResponse]) error {
	return serve(s.t, a, r, s.impl.Recover)
}

// Abort serves Storage.Abort.
func (s *StorageRPCServer) Abort(a Args[AbortRequest], r *Reply[AbortResponse]) error {
	return serve(s.t, a, r, s.impl.Abort)
}

// Cleanup serves Storage.Cleanup.
func (s *StorageRPCServer) Cleanup(a Args[CleanupRequest], r *Reply[CleanupResponse]) error {
	return serve(s.t, a, r, s.impl.Cleanup)
}
