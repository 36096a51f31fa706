package contract

import (
	"context"
	"fmt"
)

func unsupported(method string) error {
	return fmt.Errorf("%s is not implemented by this backend: %w", method, ErrUnsupported)
}

// UnimplementedStorage refuses every Storage method with ErrUnsupported.
// Embed it in a backend that implements only one role, and advertise the
// roles it does implement in Info.Capabilities.
type UnimplementedStorage struct{}

// Info implements Storage.
func (UnimplementedStorage) Info(context.Context) (Info, error) { return Info{}, unsupported("Info") }

// Configure implements Storage.
func (UnimplementedStorage) Configure(context.Context, ConfigureRequest) (ConfigureResponse, error) {
	return ConfigureResponse{}, unsupported("Configure")
}

// PrepareReceiver implements Storage.
func (UnimplementedStorage) PrepareReceiver(context.Context, PrepareReceiverRequest) (PrepareReceiverResponse, error) {
	return PrepareReceiverResponse{}, unsupported("PrepareReceiver")
}

// PrepareSender implements Storage.
func (UnimplementedStorage) PrepareSender(context.Context, PrepareSenderRequest) (PrepareSenderResponse, error) {
	return PrepareSenderResponse{}, unsupported("PrepareSender")
}

// SyncRound implements Storage.
func (UnimplementedStorage) SyncRound(context.Context, SyncRoundRequest) (SyncRoundResponse, error) {
	return SyncRoundResponse{}, unsupported("SyncRound")
}

// Status implements Storage.
func (UnimplementedStorage) Status(context.Context, StatusRequest) (StorageStatus, error) {
	return StorageStatus{}, unsupported("Status")
}

// Converge implements Storage.
func (UnimplementedStorage) Converge(context.Context, ConvergeRequest) (ConvergeResponse, error) {
	return ConvergeResponse{}, unsupported("Converge")
}

// Finalize implements Storage.
func (UnimplementedStorage) Finalize(context.Context, FinalizeRequest) (FinalizeResponse, error) {
	return FinalizeResponse{}, unsupported("Finalize")
}

// Recover implements Storage.
func (UnimplementedStorage) Recover(context.Context, RecoverRequest) (RecoverResponse, error) {
	return RecoverResponse{}, unsupported("Recover")
}

// Abort implements Storage.
func (UnimplementedStorage) Abort(context.Context, AbortRequest) (AbortResponse, error) {
	return AbortResponse{}, unsupported("Abort")
}

// Cleanup implements Storage.
func (UnimplementedStorage) Cleanup(context.Context, CleanupRequest) (CleanupResponse, error) {
	return CleanupResponse{}, unsupported("Cleanup")
}

// UnimplementedNetwork refuses every Network method with ErrUnsupported.
type UnimplementedNetwork struct{}

// Info implements Network.
func (UnimplementedNetwork) Info(context.Context) (Info, error) { return Info{}, unsupported("Info") }

// Configure implements Network.
func (UnimplementedNetwork) Configure(context.Context, ConfigureRequest) (ConfigureResponse, error) {
	return ConfigureResponse{}, unsupported("Configure")
}

// Prepare implements Network.
func (UnimplementedNetwork) Prepare(context.Context, NetPrepareRequest) (NetPrepareResponse, error) {
	return NetPrepareResponse{}, unsupported("Prepare")
}

// Activate implements Network.
func (UnimplementedNetwork) Activate(context.Context, ActivateRequest) (ActivateResponse, error) {
	return ActivateResponse{}, unsupported("Activate")
}

// Release implements Network.
func (UnimplementedNetwork) Release(context.Context, ReleaseRequest) (ReleaseResponse, error) {
	return ReleaseResponse{}, unsupported("Release")
}

// Status implements Network.
func (UnimplementedNetwork) Status(context.Context, NetStatusRequest) (NetStatus, error) {
	return NetStatus{}, unsupported("Status")
}

// Recover implements Network.
func (UnimplementedNetwork) Recover(context.Context, NetRecoverRequest) (NetRecoverResponse, error) {
	return NetRecoverResponse{}, unsupported("Recover")
}

// Cleanup implements Network.
func (UnimplementedNetwork) Cleanup(context.Context, NetCleanupRequest) (NetCleanupResponse, error) {
	return NetCleanupResponse{}, unsupported("Cleanup")
}
