package nbdstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/wan"
)

// PrepareSender implements contract.Storage. It only records the peer;
// connections are made per round.
func (b *Backend) PrepareSender(ctx context.Context, req contract.PrepareSenderRequest) (contract.PrepareSenderResponse, error) {
	var zero contract.PrepareSenderResponse
	if err := ctx.Err(); err != nil {
		return zero, fmt.Errorf("prepare sender: %w: %v", contract.ErrCancelled, err)
	}
	if req.MigrationID == "" || req.Disk.VDIUUID == "" || req.Disk.VirtualSize <= 0 || req.Peer.Address == "" {
		return zero, fmt.Errorf("need MigrationID, Disk.VDIUUID, Disk.VirtualSize and Peer.Address: %w", contract.ErrInvalidArgument)
	}
	var opts Options
	if err := contract.DecodeOpaque(req.Options, &opts); err != nil {
		return zero, fmt.Errorf("options: %w", err)
	}
	var params EndpointParams
	if err := contract.DecodeOpaque(req.Peer.Params, &params); err != nil {
		return zero, fmt.Errorf("peer params: %w", err)
	}
	if params.Protocol != "" && params.Protocol != Protocol {
		return zero, fmt.Errorf("peer speaks %q, want %q: %w", params.Protocol, Protocol, contract.ErrFailedPrecondition)
	}
	if req.XAPI.URL == "" || req.XAPI.Session == "" {
		return zero, fmt.Errorf("need XAPI access to read the snapshots: %w", contract.ErrInvalidArgument)
	}
	if opts.RateLimit < 0 || opts.Connections < 0 || opts.Connections > 64 {
		return zero, fmt.Errorf("options: bad rate_limit or connections: %w", contract.ErrInvalidArgument)
	}
	cfg, _ := b.config()
	if opts.RateLimit == 0 {
		opts.RateLimit = cfg.RateLimit
	}
	if opts.Connections == 0 {
		opts.Connections = cfg.Connections
	}
	key := req
	key.XAPI = contract.XAPIAccess{}
	id := handleID(contract.RoleSource, req.MigrationID, req.Disk.VDIUUID)
	b.prepMu.Lock()
	defer b.prepMu.Unlock()
	if old, err := b.existing(id, key); err != nil {
		return zero, err
	} else if old != nil {
		hd, err := old.handle()
		return contract.PrepareSenderResponse{Handle: hd, Existing: true}, err
	}
	if params.Size > 0 && params.Size < req.Disk.VirtualSize {
		return zero, fmt.Errorf("replica (%d bytes) is smaller than the source disk (%d bytes): %w", params.Size, req.Disk.VirtualSize, contract.ErrFailedPrecondition)
	}
	network := req.Peer.Network
	if network == "" {
		network = "tcp"
	}
	h := &handle{id: id, migration: req.MigrationID, role: contract.RoleSource, request: key,
		state: contract.StatePrepared, round: -1, log: b.log.With("handle", id),
		st: stateV1{Role: string(contract.RoleSource), VirtualSize: req.Disk.VirtualSize, VDIUUID: req.Disk.VDIUUID,
			XAPIURL: req.XAPI.URL, Session: string(req.XAPI.Session), XAPIPin: req.XAPI.TLSPin, HostUUID: req.XAPI.HostUUID,
			PeerNetwork: network, PeerAddress: req.Peer.Address, PeerToken: string(req.Peer.Token), Round: -1,
			RateLimit: opts.RateLimit, Connections: opts.Connections}}
	b.put(h)
	hd, err := h.handle()
	return contract.PrepareSenderResponse{Handle: hd}, err
}

// SyncRound implements contract.Storage.
func (b *Backend) SyncRound(ctx context.Context, req contract.SyncRoundRequest) (contract.SyncRoundResponse, error) {
	var zero contract.SyncRoundResponse
	h, err := b.get(req.Handle)
	if err != nil {
		return zero, err
	}
	if h.role != contract.RoleSource {
		return zero, fmt.Errorf("SyncRound on a %s handle: %w", h.role, contract.ErrInvalidArgument)
	}
	if req.Round < 0 || (!req.Full && len(req.ChangedBlocks) == 0) {
		return zero, fmt.Errorf("round %d: an incremental round needs ChangedBlocks: %w", req.Round, contract.ErrInvalidArgument)
	}
	if req.BlockSize == 0 {
		req.BlockSize = contract.DefaultBlockSize
	}
	if req.BlockSize < 512 || req.BlockSize%512 != 0 {
		return zero, fmt.Errorf("block size %d: %w", req.BlockSize, contract.ErrInvalidArgument)
	}
	if err := ctx.Err(); err != nil {
		return zero, fmt.Errorf("round %d: %w: %v", req.Round, contract.ErrCancelled, err)
	}
	cfg, _ := b.config()
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	h.mu.Lock()
	switch {
	case h.state == contract.StateAborted:
		h.mu.Unlock()
		return zero, fmt.Errorf("handle %s was aborted: %w", h.id, contract.ErrFailedPrecondition)
	case h.running:
		h.mu.Unlock()
		return zero, fmt.Errorf("handle %s: a round is already running: %w", h.id, contract.ErrFailedPrecondition)
	case !req.Full && h.st.Round < 0:
		h.mu.Unlock()
		return zero, fmt.Errorf("round %d is incremental but no full round was done: %w", req.Round, contract.ErrInvalidArgument)
	}
	h.running, h.cancel, h.state, h.round = true, cancel, contract.StateSyncing, req.Round
	h.started, h.lastErr = time.Now(), ""
	h.toCopy.Store(0)
	h.copied.Store(0)
	h.onWire.Store(0)
	h.repaired.Store(0)
	h.mu.Unlock()

	stats, err := b.runRound(rctx, h, req, cfg)

	h.mu.Lock()
	defer h.mu.Unlock()
	h.running, h.cancel = false, nil
	aborted := h.state == contract.StateAborted
	switch {
	case aborted:
		err = fmt.Errorf("round %d: handle aborted: %w", req.Round, contract.ErrFailedPrecondition)
	case err != nil:
		h.state = contract.StateIdle
		if ctx.Err() != nil {
			err = fmt.Errorf("round %d: %w: %v", req.Round, contract.ErrCancelled, ctx.Err())
		}
	default:
		h.state = contract.StateIdle
		h.st.Round, h.st.Snapshot = req.Round, stats.snapshot
	}
	if err != nil {
		h.lastErr = err.Error()
		h.log.Warn("round failed", "round", req.Round, "error", err)
		return zero, toContractErr("sync round", err)
	}
	st := h.st
	data, eerr := contract.EncodeOpaque(st)
	if eerr != nil {
		return zero, eerr
	}
	rs := contract.RoundStats{Round: req.Round, BytesToCopy: h.toCopy.Load(), BytesCopied: h.copied.Load(),
		BytesOnWire: h.onWire.Load(), Duration: time.Since(h.started), Repaired: h.repaired.Load()}
	h.log.Info("round done", "round", req.Round, "bytes_to_copy", rs.BytesToCopy, "bytes_on_wire", rs.BytesOnWire,
		"duration", rs.Duration, "source", stats.sourceKind, "skipped_bytes", stats.skipped, "reconnects", stats.reconnects)
	return contract.SyncRoundResponse{Stats: rs, State: contract.State{Version: stateVersion, Data: data}}, nil
}

// roundInfo is what runRound reports besides the handle counters.
type roundInfo struct {
	snapshot   string
	sourceKind string
	skipped    int64
	reconnects int64
}

func (b *Backend) runRound(ctx context.Context, h *handle, req contract.SyncRoundRequest, cfg Config) (roundInfo, error) {
	var info roundInfo
	src, snapUUID, err := b.openSource(ctx, h, req.Snapshot, cfg)
	if err != nil {
		return info, err
	}
	defer func() { _ = src.Close() }()
	info.snapshot, info.sourceKind = snapUUID, src.Kind()
	h.mu.Lock()
	st := h.st
	h.mu.Unlock()
	size := src.Size()
	peer := newPeer(peerConfig{network: st.PeerNetwork, addr: st.PeerAddress, token: st.PeerToken, round: req.Round,
		snapshot: snapUUID, conns: st.Connections, inFlight: cfg.InFlight, chunk: cfg.ChunkSize,
		timeout: time.Duration(cfg.ReconnectTimeoutSec) * time.Second, stall: time.Duration(cfg.StallTimeoutSec) * time.Second}, &h.onWire, h.log)
	defer peer.close()
	// Read the journal while the data connections are made.
	var applied *journalRecord
	var jerr error
	jdone := make(chan struct{})
	go func() {
		defer close(jdone)
		applied, jerr = peer.journal(ctx, req.Round, snapUUID)
	}()
	err = peer.checkSize(ctx, size)
	<-jdone
	if err != nil {
		return info, err
	}
	if jerr != nil {
		return info, jerr
	}
	jobs, toCopy, skipped, err := plan(ctx, src, size, req, cfg.ChunkSize, applied)
	if err != nil {
		return info, err
	}
	info.skipped = skipped
	h.toCopy.Store(toCopy)
	h.copied.Store(skipped)
	c := &copier{src: src, peer: peer, copied: &h.copied, limiter: wan.NewRateLimiter(st.RateLimit),
		checkpoint: cfg.CheckpointBytes, log: h.log}
	if err := c.run(ctx, jobs, cfg.InFlight); err != nil {
		return info, c.wrapSourceErr(ctx, b, h, req.Snapshot, err)
	}
	if err := peer.flush(ctx); err != nil {
		return info, err
	}
	if req.Verify {
		n, err := c.verify(ctx, size)
		if err != nil {
			return info, c.wrapSourceErr(ctx, b, h, req.Snapshot, err)
		}
		h.repaired.Store(n)
	}
	info.reconnects = peer.reconnects.Load()
	return info, nil
}

// wrapSourceErr turns a failed read into "snapshot deleted under us" when
// that is what happened.
func (c *copier) wrapSourceErr(ctx context.Context, b *Backend, h *handle, snap contract.SnapshotRef, err error) error {
	if !errors.Is(err, errSourceRead) || ctx.Err() != nil {
		return err
	}
	x, xerr := h.xapiClient(b)
	if xerr != nil {
		return err
	}
	if _, _, serr := snapshotRecord(context.WithoutCancel(ctx), x, snap); serr != nil {
		return fmt.Errorf("%w (%v)", serr, err)
	}
	return fmt.Errorf("%v: %w", err, contract.ErrUnavailable)
}
