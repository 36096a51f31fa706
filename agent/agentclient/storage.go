package agentclient

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// handleState is what the engine checkpoints for one storage or network
// handle (the State bytes of ReceiverInfo, PrepareSender, SyncResult...):
// the backend's contract Handle, State included.
type handleState struct {
	V       int             `msgpack:"v"`
	Backend string          `msgpack:"backend"`
	Handle  contract.Handle `msgpack:"handle"`
}

// endpointRest is ReceiverInfo.Endpoint: the contract Endpoint minus its
// Address (which the engine forwards through the gateway).
type endpointRest struct {
	Network string `msgpack:"network"`
	Token   string `msgpack:"token"`
	Params  []byte `msgpack:"params"`
}

func encodeHandle(backend string, h contract.Handle) ([]byte, error) {
	return contract.EncodeOpaque(handleState{V: 1, Backend: backend, Handle: h})
}

func decodeHandle(b []byte) (handleState, error) {
	var hs handleState
	if len(b) == 0 {
		return hs, fmt.Errorf("empty handle state: %w", contract.ErrInvalidArgument)
	}
	if err := contract.DecodeOpaque(b, &hs); err != nil {
		return hs, fmt.Errorf("handle state: %w", err)
	}
	if hs.V != 1 || hs.Handle.ID == "" {
		return hs, fmt.Errorf("handle state version %d / empty handle: %w", hs.V, contract.ErrInvalidArgument)
	}
	return hs, nil
}

func encodeEndpoint(ep contract.Endpoint) ([]byte, error) {
	return contract.EncodeOpaque(endpointRest{Network: ep.Network, Token: string(ep.Token), Params: ep.Params})
}

// peerEndpoint rebuilds the contract Endpoint of the receiver as the
// source sees it.
func peerEndpoint(p engine.Peer) (contract.Endpoint, error) {
	var r endpointRest
	if err := contract.DecodeOpaque(p.Endpoint, &r); err != nil {
		return contract.Endpoint{}, fmt.Errorf("receiver endpoint: %w", err)
	}
	return contract.Endpoint{Network: r.Network, Address: p.Address, Token: contract.Secret(r.Token), Params: r.Params}, nil
}

func (c *Client) xapi(ctx context.Context, role contract.Role, id string) (contract.XAPIAccess, error) {
	f := c.cfg.DestXAPI
	if role == contract.RoleSource {
		f = c.cfg.SourceXAPI
	}
	if f == nil {
		return contract.XAPIAccess{}, nil
	}
	x, err := f(ctx, id)
	if err != nil {
		return x, fmt.Errorf("xapi access for the %s: %w", role, err)
	}
	return x, nil
}

func (c *Client) uuidOf(ctx context.Context, site contract.Role, ref string) (string, error) {
	if c.cfg.UUIDOf == nil || ref == "" {
		return "", nil
	}
	u, err := c.cfg.UUIDOf(ctx, site, ref)
	if err != nil {
		return "", fmt.Errorf("uuid of %s: %w", ref, err)
	}
	return u, nil
}

func (m *migration) disk(id string) *diskHandles {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.disks[id]
	if !ok {
		d = &diskHandles{}
		m.disks[id] = d
	}
	return d
}

// handleOf returns a copy of the disk's handle of role.
func (m *migration) handleOf(key engine.DiskKey, role contract.Role) (contract.Handle, string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d, ok := m.disks[key.DiskID]
	var h *contract.Handle
	if ok {
		h = d.recv
		if role == contract.RoleSource {
			h = d.send
		}
	}
	if h == nil {
		return contract.Handle{}, "", fmt.Errorf("no %s handle for disk %s of migration %s (prepare or recover it first): %w",
			role, key.DiskID, key.MigrationID, contract.ErrNotFound)
	}
	return *h, d.backend, nil
}

func (m *migration) setHandle(key engine.DiskKey, role contract.Role, backend string, h contract.Handle) {
	d := m.disk(key.DiskID)
	m.mu.Lock()
	defer m.mu.Unlock()
	if backend != "" {
		d.backend = backend
	}
	hc := h
	if role == contract.RoleSource {
		d.send = &hc
	} else {
		d.recv = &hc
	}
}

// setState replaces the State of a handle (an empty State keeps the old one).
func (m *migration) setState(key engine.DiskKey, role contract.Role, st contract.State) (contract.Handle, string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	d := m.disks[key.DiskID]
	if d == nil {
		return contract.Handle{}, ""
	}
	h := d.recv
	if role == contract.RoleSource {
		h = d.send
	}
	if h == nil { // cleaned up meanwhile
		return contract.Handle{}, d.backend
	}
	if st.Data != nil || st.Version != 0 {
		h.State = st
	}
	return *h, d.backend
}

func diskInfo(ctx context.Context, c *Client, d engine.Disk) (contract.DiskInfo, error) {
	sr, err := c.uuidOf(ctx, contract.RoleSource, d.SRRef)
	if err != nil {
		return contract.DiskInfo{}, err
	}
	return contract.DiskInfo{VDIUUID: d.VDIUUID, VDIRef: d.VDIRef, VirtualSize: d.VirtualSize, SRUUID: sr, Device: d.Device, Name: d.NameLabel}, nil
}

// PrepareReceiver implements engine.StorageBackend (destination agent).
func (s *Storage) PrepareReceiver(ctx context.Context, spec engine.ReceiverSpec) (engine.ReceiverInfo, error) {
	c := s.c
	m, err := c.lookup(spec.Key.MigrationID, false)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	disk, err := diskInfo(ctx, c, spec.Disk)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	destSR, err := c.uuidOf(ctx, contract.RoleDestination, spec.DestSR)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	x, err := c.xapi(ctx, contract.RoleDestination, spec.Key.MigrationID)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	req := contract.PrepareReceiverRequest{MigrationID: spec.Key.MigrationID, Disk: disk, DestSRUUID: destSR,
		ReplicaVDIUUID: spec.ReplicaUUID, XAPI: x}
	resp, err := callRole[contract.PrepareReceiverRequest, contract.PrepareReceiverResponse](ctx, c, m.id, contract.RoleDestination, agent.MethodStoragePrepareReceiver, req)
	if err != nil {
		return engine.ReceiverInfo{}, fmt.Errorf("prepare receiver of disk %s: %w", spec.Key.DiskID, err)
	}
	m.setHandle(spec.Key, contract.RoleDestination, spec.Backend, resp.Handle)
	return receiverInfo(spec.Backend, resp.Handle, resp.Endpoint)
}

func receiverInfo(backend string, h contract.Handle, ep contract.Endpoint) (engine.ReceiverInfo, error) {
	st, err := encodeHandle(backend, h)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	epb, err := encodeEndpoint(ep)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	return engine.ReceiverInfo{Address: ep.Address, Endpoint: epb, State: st}, nil
}

// PrepareSender implements engine.StorageBackend (source agent).
func (s *Storage) PrepareSender(ctx context.Context, spec engine.SenderSpec) ([]byte, error) {
	c := s.c
	m, err := c.lookup(spec.Key.MigrationID, false)
	if err != nil {
		return nil, err
	}
	disk, err := diskInfo(ctx, c, spec.Disk)
	if err != nil {
		return nil, err
	}
	peer, err := peerEndpoint(spec.Peer)
	if err != nil {
		return nil, err
	}
	x, err := c.xapi(ctx, contract.RoleSource, spec.Key.MigrationID)
	if err != nil {
		return nil, err
	}
	req := contract.PrepareSenderRequest{MigrationID: spec.Key.MigrationID, Disk: disk, Peer: peer, XAPI: x}
	resp, err := callRole[contract.PrepareSenderRequest, contract.PrepareSenderResponse](ctx, c, m.id, contract.RoleSource, agent.MethodStoragePrepareSender, req)
	if err != nil {
		return nil, fmt.Errorf("prepare sender of disk %s: %w", spec.Key.DiskID, err)
	}
	m.setHandle(spec.Key, contract.RoleSource, spec.Backend, resp.Handle)
	return encodeHandle(spec.Backend, resp.Handle)
}

// SyncRound implements engine.StorageBackend (source handle).
func (s *Storage) SyncRound(ctx context.Context, spec engine.SyncSpec) (engine.SyncResult, error) {
	c := s.c
	m, err := c.lookup(spec.Key.MigrationID, false)
	if err != nil {
		return engine.SyncResult{}, err
	}
	h, backend, err := m.handleOf(spec.Key, contract.RoleSource)
	if err != nil {
		return engine.SyncResult{}, err
	}
	snapUUID, err := c.uuidOf(ctx, contract.RoleSource, spec.Snapshot)
	if err != nil {
		return engine.SyncResult{}, err
	}
	req := contract.SyncRoundRequest{Handle: h.ID, Round: spec.Round, Full: spec.Full, ChangedBlocks: spec.Bitmap,
		BlockSize: int64(spec.BlockSize), Snapshot: contract.SnapshotRef{UUID: snapUUID, Ref: spec.Snapshot, ContentID: spec.SnapshotContentID}}
	// The round runs on the source agent; the destination agent receives.
	// If the destination agent or its backend dies, the source would only
	// notice through its own (long) stall timeouts, or never (a receiver
	// relaunched on a new address): watch them, and cancel the round at
	// once so that the engine's retry re-attaches the receiver.
	rctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopWatch := c.watchReceiver(rctx, m, backend, cancel)
	resp, err := callRole[contract.SyncRoundRequest, contract.SyncRoundResponse](rctx, c, m.id, contract.RoleSource, agent.MethodStorageSyncRound, req)
	stopWatch()
	if cause := context.Cause(rctx); err != nil && ctx.Err() == nil && cause != nil && !errors.Is(cause, context.Canceled) {
		err = cause
	}
	if err != nil {
		return engine.SyncResult{}, fmt.Errorf("round %d of disk %s: %w", spec.Round, spec.Key.DiskID, err)
	}
	nh, backend := m.setState(spec.Key, contract.RoleSource, resp.State)
	st, err := encodeHandle(backend, nh)
	if err != nil {
		return engine.SyncResult{}, err
	}
	return engine.SyncResult{BytesToCopy: resp.Stats.BytesToCopy, BytesCopied: resp.Stats.BytesCopied,
		BytesOnWire: resp.Stats.BytesOnWire, State: st}, nil
}

// SyncStatus implements engine.StorageBackend (source handle's Status).
func (s *Storage) SyncStatus(ctx context.Context, key engine.DiskKey) (engine.SyncStatus, error) {
	m, err := s.c.lookup(key.MigrationID, false)
	if err != nil {
		return engine.SyncStatus{}, err
	}
	h, _, err := m.handleOf(key, contract.RoleSource)
	if err != nil {
		return engine.SyncStatus{}, err
	}
	st, err := callRole[contract.StatusRequest, contract.StorageStatus](ctx, s.c, m.id, contract.RoleSource, agent.MethodStorageStatus, contract.StatusRequest{Handle: h.ID})
	if err != nil {
		return engine.SyncStatus{}, err
	}
	return engine.SyncStatus{Round: st.Round, BytesToCopy: st.BytesToCopy, BytesCopied: st.BytesCopied, BytesOnWire: st.BytesOnWire, Error: st.LastError}, nil
}

// Finalize implements engine.StorageBackend: Converge then Finalize on the
// destination handle; returns the new receiver state.
func (s *Storage) Finalize(ctx context.Context, key engine.DiskKey) ([]byte, error) {
	c := s.c
	m, err := c.lookup(key.MigrationID, false)
	if err != nil {
		return nil, err
	}
	h, _, err := m.handleOf(key, contract.RoleDestination)
	if err != nil {
		return nil, err
	}
	cv, err := callRole[contract.ConvergeRequest, contract.ConvergeResponse](ctx, c, m.id, contract.RoleDestination, agent.MethodStorageConverge, contract.ConvergeRequest{Handle: h.ID})
	if err != nil {
		return nil, fmt.Errorf("converge disk %s: %w", key.DiskID, err)
	}
	m.setState(key, contract.RoleDestination, cv.State)
	fin, err := callRole[contract.FinalizeRequest, contract.FinalizeResponse](ctx, c, m.id, contract.RoleDestination, agent.MethodStorageFinalize, contract.FinalizeRequest{Handle: h.ID})
	if err != nil {
		return nil, fmt.Errorf("finalize disk %s: %w", key.DiskID, err)
	}
	nh, backend := m.setState(key, contract.RoleDestination, fin.State)
	return encodeHandle(backend, nh)
}

// RecoverReceiver implements engine.StorageBackend.
func (s *Storage) RecoverReceiver(ctx context.Context, key engine.DiskKey, state []byte) (engine.ReceiverInfo, error) {
	c := s.c
	m, err := c.lookup(key.MigrationID, false)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	hs, err := decodeHandle(state)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	x, err := c.xapi(ctx, contract.RoleDestination, key.MigrationID)
	if err != nil {
		return engine.ReceiverInfo{}, err
	}
	resp, err := callRole[contract.RecoverRequest, contract.RecoverResponse](ctx, c, m.id, contract.RoleDestination, agent.MethodStorageRecover,
		contract.RecoverRequest{Handle: hs.Handle, XAPI: x})
	if err != nil {
		return engine.ReceiverInfo{}, fmt.Errorf("recover receiver of disk %s: %w", key.DiskID, err)
	}
	m.setHandle(key, contract.RoleDestination, hs.Backend, resp.Handle)
	return receiverInfo(hs.Backend, resp.Handle, resp.Endpoint)
}

// RecoverSender implements engine.StorageBackend.
func (s *Storage) RecoverSender(ctx context.Context, key engine.DiskKey, state []byte, peer engine.Peer) error {
	c := s.c
	m, err := c.lookup(key.MigrationID, false)
	if err != nil {
		return err
	}
	hs, err := decodeHandle(state)
	if err != nil {
		return err
	}
	ep, err := peerEndpoint(peer)
	if err != nil {
		return err
	}
	x, err := c.xapi(ctx, contract.RoleSource, key.MigrationID)
	if err != nil {
		return err
	}
	resp, err := callRole[contract.RecoverRequest, contract.RecoverResponse](ctx, c, m.id, contract.RoleSource, agent.MethodStorageRecover,
		contract.RecoverRequest{Handle: hs.Handle, XAPI: x, Peer: ep})
	if err != nil {
		return fmt.Errorf("recover sender of disk %s: %w", key.DiskID, err)
	}
	m.setHandle(key, contract.RoleSource, hs.Backend, resp.Handle)
	return nil
}

// Abort implements engine.StorageBackend: Abort on both handles (unknown
// handles are skipped).
func (s *Storage) Abort(ctx context.Context, key engine.DiskKey) error {
	c := s.c
	m, err := c.lookup(key.MigrationID, false)
	if err != nil {
		return err
	}
	var errs []error
	for _, role := range roles {
		h, _, err := m.handleOf(key, role)
		if err != nil {
			continue
		}
		_, err = callRole[contract.AbortRequest, contract.AbortResponse](ctx, c, m.id, role, agent.MethodStorageAbort, contract.AbortRequest{Handle: h.ID})
		if err != nil && !errors.Is(err, contract.ErrNotFound) {
			errs = append(errs, fmt.Errorf("abort %s of disk %s: %w", role, key.DiskID, err))
		}
	}
	return errors.Join(errs...)
}

// Cleanup implements engine.StorageBackend: Cleanup (DeleteReplica false)
// on both sides, from the states when given, else from the handles held.
func (s *Storage) Cleanup(ctx context.Context, key engine.DiskKey, receiverState, senderState []byte) error {
	c := s.c
	m, err := c.lookup(key.MigrationID, false)
	if err != nil {
		return err
	}
	var errs []error
	for _, role := range roles {
		state := receiverState
		if role == contract.RoleSource {
			state = senderState
		}
		var h contract.Handle
		if len(state) > 0 {
			hs, err := decodeHandle(state)
			if err != nil {
				errs = append(errs, err)
				continue
			}
			h = hs.Handle
		} else if held, _, err := m.handleOf(key, role); err == nil {
			h = held
		} else {
			continue
		}
		x, err := c.xapi(ctx, role, key.MigrationID)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		_, err = callRole[contract.CleanupRequest, contract.CleanupResponse](ctx, c, m.id, role, agent.MethodStorageCleanup,
			contract.CleanupRequest{Handle: h, XAPI: x})
		if err != nil {
			errs = append(errs, fmt.Errorf("cleanup %s of disk %s: %w", role, key.DiskID, err))
			continue
		}
		m.mu.Lock()
		if d, ok := m.disks[key.DiskID]; ok {
			if role == contract.RoleSource {
				d.send = nil
			} else {
				d.recv = nil
			}
		}
		m.mu.Unlock()
	}
	return errors.Join(errs...)
}

// watchReceiver checks the destination agent every PeerWatch until the
// returned stop is called or ctx ends, by asking it to launch the storage
// backend (idempotent: it answers with the running backend's pid). Two
// transport failures in a row (a dead agent: the connection drops, then a
// redial is refused) call lost with an error wrapping
// agent.ErrAgentUnreachable; a backend that was relaunched (it exited,
// and the receiver it served is gone) calls lost with an error wrapping
// contract.ErrPluginExited.
func (c *Client) watchReceiver(ctx context.Context, m *migration, backend string, lost context.CancelCauseFunc) (stop func()) {
	const role = contract.RoleDestination
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(c.cfg.PeerWatch)
		defer t.Stop()
		failures, pid := 0, 0
		for {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-t.C:
			}
			ac, err := m.conn(role)
			var resp agent.LaunchResponse
			var cfg []byte
			if err == nil {
				m.mu.Lock()
				spec := m.p.Spec
				m.mu.Unlock()
				cfg, err = c.backendConfig(spec, role, backend, c.cfg.StorageConfig)
			}
			if err == nil {
				hctx, hcancel := context.WithTimeout(ctx, max(c.cfg.PeerWatch, c.cfg.DialTimeout))
				resp, err = call[agent.LaunchRequest, agent.LaunchResponse](hctx, ac, agent.MethodLaunchStorage,
					agent.LaunchRequest{Name: backend, Config: cfg})
				hcancel()
			}
			switch {
			case ctx.Err() != nil:
				return
			case err == nil && (!resp.Existing || pid != 0 && resp.PID != pid):
				c.log.Warn("storage backend restarted at the destination during a round; cancelling the round",
					"migration_id", m.id, "backend", backend, "pid", resp.PID)
				lost(fmt.Errorf("the %s agent's storage backend %s was restarted (now pid %d) during the round: %w",
					role, backend, resp.PID, contract.ErrPluginExited))
				return
			case err == nil:
				failures, pid = 0, resp.PID
			case !errors.Is(err, agent.ErrAgentUnreachable):
				failures = 0
			default:
				failures++
				if failures >= 2 {
					c.log.Warn("agent lost during a round; cancelling the round", "migration_id", m.id, "role", string(role), "error", err)
					lost(fmt.Errorf("%s agent lost during the round: %w", role, err))
					return
				}
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		wg.Wait()
	}
}
