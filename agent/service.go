package agent

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Service is the net/rpc receiver of one control connection. Its exported
// methods are the agent's RPC surface (see protocol.go for the method
// names and docs/agent.md for what each does).
type Service struct {
	a *Agent
	t *contract.CallTracker
	// liveness is what the controller's last heartbeat announced (nanoseconds).
	liveness atomic.Int64
}

// serve runs one method: ctx from the call's metadata, the agent busy
// while it runs, the error in the reply envelope.
func serve[Req, Resp any](s *Service, args Args[Req], reply *Reply[Resp], fn func(context.Context, Req) (Resp, error)) error {
	ctx, done := s.t.Begin(args.Call)
	s.a.inflight.Add(1)
	defer func() {
		done()
		s.a.touch()
		s.a.inflight.Add(-1)
	}()
	resp, err := fn(ctx, args.Req)
	reply.Resp = resp
	reply.Err = contract.ToWire(err)
	return nil
}

func withStorage[Req, Resp any](s *Service, args Args[Req], reply *Reply[Resp], fn func(context.Context, contract.Storage, Req) (Resp, error)) error {
	return serve(s, args, reply, func(ctx context.Context, req Req) (Resp, error) {
		var zero Resp
		inst, err := s.a.storage.get(ctx, s.a)
		if err != nil {
			return zero, err
		}
		resp, err := fn(ctx, inst.Storage(), req)
		return resp, s.a.storage.failed(inst, err)
	})
}

func withNetwork[Req, Resp any](s *Service, args Args[Req], reply *Reply[Resp], fn func(context.Context, contract.Network, Req) (Resp, error)) error {
	return serve(s, args, reply, func(ctx context.Context, req Req) (Resp, error) {
		var zero Resp
		inst, err := s.a.network.get(ctx, s.a)
		if err != nil {
			return zero, err
		}
		resp, err := fn(ctx, inst.Network(), req)
		return resp, s.a.network.failed(inst, err)
	})
}

// Hello checks that the controller talks to the right agent and describes it.
func (s *Service) Hello(args Args[HelloRequest], reply *Reply[HelloResponse]) error {
	return serve(s, args, reply, func(_ context.Context, req HelloRequest) (HelloResponse, error) { return s.a.hello(req) })
}

// Heartbeat keeps the agent alive and sets this connection's liveness
// timeout (HeartbeatRequest.Liveness).
func (s *Service) Heartbeat(args Args[HeartbeatRequest], reply *Reply[Empty]) error {
	return serve(s, args, reply, func(_ context.Context, req HeartbeatRequest) (Empty, error) {
		if req.Liveness < 0 {
			return Empty{}, fmt.Errorf("negative liveness %s: %w", req.Liveness, contract.ErrInvalidArgument)
		}
		s.liveness.Store(int64(req.Liveness))
		return Empty{}, nil
	})
}

// Cancel cancels the ctx of a call in flight on this connection.
func (s *Service) Cancel(args Args[contract.CancelArgs], reply *Reply[Empty]) error {
	s.t.Cancel(args.Req.ID)
	return nil
}

// Stop cleans up the gateway and the backends, replies, and then stops the agent.
func (s *Service) Stop(args Args[Empty], reply *Reply[Empty]) error {
	err := serve(s, args, reply, func(context.Context, Empty) (Empty, error) {
		s.a.log.Info("stop requested by the controller")
		s.a.cleanup()
		return Empty{}, nil
	})
	// Give net/rpc time to write the reply before the connections close.
	time.AfterFunc(200*time.Millisecond, s.a.shutdown)
	return err
}

// LaunchStorage starts the storage backend (idempotent).
func (s *Service) LaunchStorage(args Args[LaunchRequest], reply *Reply[LaunchResponse]) error {
	return serve(s, args, reply, func(ctx context.Context, req LaunchRequest) (LaunchResponse, error) {
		return s.a.storage.launch(ctx, s.a, req)
	})
}

// LaunchNetwork starts the network backend (idempotent).
func (s *Service) LaunchNetwork(args Args[LaunchRequest], reply *Reply[LaunchResponse]) error {
	return serve(s, args, reply, func(ctx context.Context, req LaunchRequest) (LaunchResponse, error) {
		return s.a.network.launch(ctx, s.a, req)
	})
}

// StoragePrepareReceiver is contract.Storage.PrepareReceiver.
func (s *Service) StoragePrepareReceiver(args Args[contract.PrepareReceiverRequest], reply *Reply[contract.PrepareReceiverResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.PrepareReceiverRequest) (contract.PrepareReceiverResponse, error) {
		resp, err := st.PrepareReceiver(ctx, req)
		if err == nil {
			s.a.storage.remember(resp.Handle, &req.XAPI, nil)
		}
		return resp, err
	})
}

// StoragePrepareSender is contract.Storage.PrepareSender.
func (s *Service) StoragePrepareSender(args Args[contract.PrepareSenderRequest], reply *Reply[contract.PrepareSenderResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.PrepareSenderRequest) (contract.PrepareSenderResponse, error) {
		resp, err := st.PrepareSender(ctx, req)
		if err == nil {
			s.a.storage.remember(resp.Handle, &req.XAPI, &req.Peer)
		}
		return resp, err
	})
}

// StorageSyncRound is contract.Storage.SyncRound.
func (s *Service) StorageSyncRound(args Args[contract.SyncRoundRequest], reply *Reply[contract.SyncRoundResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.SyncRoundRequest) (contract.SyncRoundResponse, error) {
		release, err := s.a.roundSlot(ctx, req.Handle)
		if err != nil {
			return contract.SyncRoundResponse{}, err
		}
		defer release()
		resp, err := st.SyncRound(ctx, req)
		if err == nil {
			s.a.storage.setState(req.Handle, resp.State)
		}
		return resp, err
	})
}

// StorageStatus is contract.Storage.Status.
func (s *Service) StorageStatus(args Args[contract.StatusRequest], reply *Reply[contract.StorageStatus]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.StatusRequest) (contract.StorageStatus, error) {
		return st.Status(ctx, req)
	})
}

// StorageConverge is contract.Storage.Converge.
func (s *Service) StorageConverge(args Args[contract.ConvergeRequest], reply *Reply[contract.ConvergeResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.ConvergeRequest) (contract.ConvergeResponse, error) {
		resp, err := st.Converge(ctx, req)
		if err == nil {
			s.a.storage.setState(req.Handle, resp.State)
		}
		return resp, err
	})
}

// StorageFinalize is contract.Storage.Finalize.
func (s *Service) StorageFinalize(args Args[contract.FinalizeRequest], reply *Reply[contract.FinalizeResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.FinalizeRequest) (contract.FinalizeResponse, error) {
		resp, err := st.Finalize(ctx, req)
		if err == nil {
			s.a.storage.setState(req.Handle, resp.State)
		}
		return resp, err
	})
}

// StorageRecover is contract.Storage.Recover.
func (s *Service) StorageRecover(args Args[contract.RecoverRequest], reply *Reply[contract.RecoverResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.RecoverRequest) (contract.RecoverResponse, error) {
		resp, err := st.Recover(ctx, req)
		if err == nil {
			s.a.storage.remember(resp.Handle, &req.XAPI, &req.Peer)
		}
		return resp, err
	})
}

// StorageAbort is contract.Storage.Abort.
func (s *Service) StorageAbort(args Args[contract.AbortRequest], reply *Reply[contract.AbortResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.AbortRequest) (contract.AbortResponse, error) {
		return st.Abort(ctx, req)
	})
}

// StorageCleanup is contract.Storage.Cleanup; the agent forgets the handle.
func (s *Service) StorageCleanup(args Args[contract.CleanupRequest], reply *Reply[contract.CleanupResponse]) error {
	return withStorage(s, args, reply, func(ctx context.Context, st contract.Storage, req contract.CleanupRequest) (contract.CleanupResponse, error) {
		resp, err := st.Cleanup(ctx, req)
		if err == nil {
			s.a.storage.forget(req.Handle.ID)
		}
		return resp, err
	})
}

// NetworkPrepare is contract.Network.Prepare.
func (s *Service) NetworkPrepare(args Args[contract.NetPrepareRequest], reply *Reply[contract.NetPrepareResponse]) error {
	return withNetwork(s, args, reply, func(ctx context.Context, n contract.Network, req contract.NetPrepareRequest) (contract.NetPrepareResponse, error) {
		resp, err := n.Prepare(ctx, req)
		if err == nil {
			s.a.network.remember(resp.Handle, &req.XAPI, &req.Peer)
		}
		return resp, err
	})
}

// NetworkActivate is contract.Network.Activate.
func (s *Service) NetworkActivate(args Args[contract.ActivateRequest], reply *Reply[contract.ActivateResponse]) error {
	return withNetwork(s, args, reply, func(ctx context.Context, n contract.Network, req contract.ActivateRequest) (contract.ActivateResponse, error) {
		resp, err := n.Activate(ctx, req)
		if err == nil {
			s.a.network.setState(req.Handle, resp.State)
		}
		return resp, err
	})
}

// NetworkRelease is contract.Network.Release.
func (s *Service) NetworkRelease(args Args[contract.ReleaseRequest], reply *Reply[contract.ReleaseResponse]) error {
	return withNetwork(s, args, reply, func(ctx context.Context, n contract.Network, req contract.ReleaseRequest) (contract.ReleaseResponse, error) {
		resp, err := n.Release(ctx, req)
		if err == nil {
			s.a.network.setState(req.Handle, resp.State)
		}
		return resp, err
	})
}

// NetworkStatus is contract.Network.Status.
func (s *Service) NetworkStatus(args Args[contract.NetStatusRequest], reply *Reply[contract.NetStatus]) error {
	return withNetwork(s, args, reply, func(ctx context.Context, n contract.Network, req contract.NetStatusRequest) (contract.NetStatus, error) {
		return n.Status(ctx, req)
	})
}

// NetworkRecover is contract.Network.Recover.
func (s *Service) NetworkRecover(args Args[contract.NetRecoverRequest], reply *Reply[contract.NetRecoverResponse]) error {
	return withNetwork(s, args, reply, func(ctx context.Context, n contract.Network, req contract.NetRecoverRequest) (contract.NetRecoverResponse, error) {
		resp, err := n.Recover(ctx, req)
		if err == nil {
			s.a.network.remember(resp.Handle, &req.XAPI, &req.Peer)
		}
		return resp, err
	})
}

// NetworkCleanup is contract.Network.Cleanup; the agent forgets the handle.
func (s *Service) NetworkCleanup(args Args[contract.NetCleanupRequest], reply *Reply[contract.NetCleanupResponse]) error {
	return withNetwork(s, args, reply, func(ctx context.Context, n contract.Network, req contract.NetCleanupRequest) (contract.NetCleanupResponse, error) {
		resp, err := n.Cleanup(ctx, req)
		if err == nil {
			s.a.network.forget(req.Handle.ID)
		}
		return resp, err
	})
}

// GatewayListen starts the destination gateway (idempotent).
func (s *Service) GatewayListen(args Args[GatewayListenRequest], reply *Reply[GatewayListenResponse]) error {
	return serve(s, args, reply, s.a.gw.listen)
}

// GatewayAllow adds forward targets at the destination.
func (s *Service) GatewayAllow(args Args[GatewayAllowRequest], reply *Reply[Empty]) error {
	return serve(s, args, reply, s.a.gw.allow)
}

// GatewayDial opens the source's gateway session (idempotent while it lives).
func (s *Service) GatewayDial(args Args[GatewayDialRequest], reply *Reply[GatewayDialResponse]) error {
	return serve(s, args, reply, s.a.gw.dial)
}

// GatewayForward returns the source's local end for a destination target.
func (s *Service) GatewayForward(args Args[GatewayForwardRequest], reply *Reply[GatewayForwardResponse]) error {
	return serve(s, args, reply, s.a.gw.forward)
}

// GatewayStats returns the gateway counters.
func (s *Service) GatewayStats(args Args[Empty], reply *Reply[GatewayStatsResponse]) error {
	return serve(s, args, reply, s.a.gw.stats)
}

// SetRateLimit changes the gateway's bandwidth cap.
func (s *Service) SetRateLimit(args Args[SetRateLimitRequest], reply *Reply[Empty]) error {
	return serve(s, args, reply, s.a.gw.setRateLimit)
}

// GatewayStop closes this agent's gateway (sessions, listener, forwards).
func (s *Service) GatewayStop(args Args[Empty], reply *Reply[Empty]) error {
	return serve(s, args, reply, func(context.Context, Empty) (Empty, error) {
		s.a.gw.stop()
		return Empty{}, nil
	})
}
