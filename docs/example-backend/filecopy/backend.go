package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Version is the backend's own version.
const Version = "0.1.0"

// Config is the backend config (msgpack, from wanmotion:config).
type Config struct {
	// SourceDir holds the snapshot images on the source site.
	SourceDir string `msgpack:"source_dir"`
	// RateLimit caps each round's payload rate in bytes/s (0: none).
	RateLimit int64 `msgpack:"rate_limit"`
}

// Options are per-disk options (PrepareSenderRequest.Options).
type Options struct {
	RateLimit int64 `msgpack:"rate_limit"`
}

// stateV1 is what the engine checkpoints for us (contract.State.Data).
type stateV1 struct {
	Role        string `msgpack:"role"`
	VirtualSize int64  `msgpack:"virtual_size"`
	// destination
	ReplicaUUID string `msgpack:"replica_uuid,omitempty"`
	ReplicaPath string `msgpack:"replica_path,omitempty"`
	Listen      string `msgpack:"listen,omitempty"`
	Token       string `msgpack:"token,omitempty"`
	Finalized   bool   `msgpack:"finalized,omitempty"`
	// source
	PeerAddress string `msgpack:"peer_address,omitempty"`
	PeerToken   string `msgpack:"peer_token,omitempty"`
	Round       int    `msgpack:"round"`
	Snapshot    string `msgpack:"snapshot,omitempty"`
	RateLimit   int64  `msgpack:"rate_limit,omitempty"`
}

const stateVersion = 1

// Backend implements contract.Storage.
type Backend struct {
	log hclog.Logger

	mu       sync.Mutex
	cfg      Config
	stateDir string
	handles  map[string]*handle
}

var _ contract.Storage = (*Backend)(nil)

// New returns an unconfigured backend.
func New(log hclog.Logger) *Backend {
	return &Backend{log: log, handles: map[string]*handle{}}
}

type handle struct {
	id, migration string
	role          contract.Role
	request       any // the prepare request without credentials, for "prepare twice"

	mu      sync.Mutex
	st      stateV1
	state   contract.HandleState
	round   int
	cancel  context.CancelFunc // of the running round
	started time.Time
	lastErr string

	toCopy, copied, onWire atomic.Int64

	// destination
	ln     net.Listener
	file   *os.File
	conns  sync.WaitGroup
	active map[net.Conn]struct{}
}

// Info implements contract.Storage.
func (b *Backend) Info(context.Context) (contract.Info, error) {
	return contract.Info{
		Kind:        contract.KindStorage,
		Name:        "filecopy",
		Version:     Version,
		Description: "example backend: copies snapshot image files over TCP",
		APIVersions: []string{contract.APIVersion10},
		Capabilities: contract.CapSource | contract.CapDestination | contract.CapIncremental |
			contract.CapSparse | contract.CapResume,
	}, nil
}

// Configure implements contract.Storage.
func (b *Backend) Configure(_ context.Context, req contract.ConfigureRequest) (contract.ConfigureResponse, error) {
	if err := contract.CheckAPIVersion(req.APIVersion, []string{contract.APIVersion10}); err != nil {
		return contract.ConfigureResponse{}, err
	}
	var cfg Config
	if err := contract.DecodeOpaque(req.Config, &cfg); err != nil {
		return contract.ConfigureResponse{}, fmt.Errorf("config: %w", err)
	}
	if cfg.RateLimit < 0 {
		return contract.ConfigureResponse{}, fmt.Errorf("config: negative rate_limit: %w", contract.ErrInvalidArgument)
	}
	b.mu.Lock()
	b.cfg, b.stateDir = cfg, req.StateDir
	b.mu.Unlock()
	b.log.Debug("configured", "source_dir", cfg.SourceDir, "state_dir", req.StateDir)
	return contract.ConfigureResponse{}, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func handleID(role contract.Role, migration, vdi string) string {
	return string(role)[:3] + "-" + migration + "-" + vdi
}

// claim registers h unless a handle with its id exists: an identical
// request returns the existing handle, a different one ErrAlreadyExists.
func (b *Backend) claim(h *handle) (*handle, bool, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if old, ok := b.handles[h.id]; ok {
		if reflect.DeepEqual(old.request, h.request) {
			return old, true, nil
		}
		return nil, false, fmt.Errorf("handle %s prepared with a different request: %w", h.id, contract.ErrAlreadyExists)
	}
	b.handles[h.id] = h
	return h, false, nil
}

func (b *Backend) get(id string) (*handle, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h, ok := b.handles[id]
	if !ok {
		return nil, fmt.Errorf("handle %q: %w", id, contract.ErrNotFound)
	}
	return h, nil
}

func (h *handle) handle() (contract.Handle, error) {
	h.mu.Lock()
	st := h.st
	h.mu.Unlock()
	data, err := contract.EncodeOpaque(st)
	if err != nil {
		return contract.Handle{}, err
	}
	return contract.Handle{ID: h.id, MigrationID: h.migration, Role: h.role,
		State: contract.State{Version: stateVersion, Data: data}}, nil
}

// PrepareReceiver implements contract.Storage.
func (b *Backend) PrepareReceiver(ctx context.Context, req contract.PrepareReceiverRequest) (contract.PrepareReceiverResponse, error) {
	if err := ctx.Err(); err != nil {
		return contract.PrepareReceiverResponse{}, err
	}
	if req.MigrationID == "" || req.Disk.VDIUUID == "" || req.Disk.VirtualSize <= 0 {
		return contract.PrepareReceiverResponse{}, fmt.Errorf("need MigrationID, Disk.VDIUUID and a positive Disk.VirtualSize: %w", contract.ErrInvalidArgument)
	}
	b.mu.Lock()
	stateDir := b.stateDir
	b.mu.Unlock()
	if stateDir == "" {
		return contract.PrepareReceiverResponse{}, fmt.Errorf("no state directory configured: %w", contract.ErrFailedPrecondition)
	}
	key := req
	key.XAPI = contract.XAPIAccess{}
	replica := req.ReplicaVDIUUID
	if replica == "" {
		replica = randomHex(16)
	}
	h := &handle{id: handleID(contract.RoleDestination, req.MigrationID, req.Disk.VDIUUID), migration: req.MigrationID,
		role: contract.RoleDestination, request: key, state: contract.StatePrepared, round: -1,
		st: stateV1{Role: string(contract.RoleDestination), VirtualSize: req.Disk.VirtualSize, ReplicaUUID: replica,
			ReplicaPath: filepath.Join(stateDir, "replica-"+replica+".img"), Listen: req.Listen, Token: randomHex(16), Round: -1}}
	// Open before publishing the handle, so nobody sees it half made.
	b.mu.Lock()
	_, exists := b.handles[h.id]
	b.mu.Unlock()
	if !exists {
		if err := b.openReceiver(h, true); err != nil {
			return contract.PrepareReceiverResponse{}, err
		}
	}
	got, existing, err := b.claim(h)
	if got != h && h.file != nil { // lost a race with an identical prepare
		h.stopReceiving()
		if req.ReplicaVDIUUID == "" {
			_ = os.Remove(h.st.ReplicaPath)
		}
	}
	if err != nil {
		return contract.PrepareReceiverResponse{}, err
	}
	if !existing {
		b.log.Info("receiver prepared", "handle", h.id, "replica", replica, "listen", h.st.Listen)
	}
	hd, err := got.handle()
	if err != nil {
		return contract.PrepareReceiverResponse{}, err
	}
	got.mu.Lock()
	defer got.mu.Unlock()
	return contract.PrepareReceiverResponse{Handle: hd, Endpoint: got.endpoint(), ReplicaVDIUUID: got.st.ReplicaUUID, Existing: existing}, nil
}

func (h *handle) endpoint() contract.Endpoint {
	return contract.Endpoint{Network: "tcp", Address: h.st.Listen, Token: contract.Secret(h.st.Token)}
}

func (b *Backend) forget(id string) {
	b.mu.Lock()
	delete(b.handles, id)
	b.mu.Unlock()
}

// openReceiver opens (creating if asked) the replica file and listens.
func (b *Backend) openReceiver(h *handle, create bool) error {
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(h.st.ReplicaPath, flags, 0o600)
	if errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("replica %s: %w", h.st.ReplicaPath, contract.ErrNotFound)
	}
	if err != nil {
		return fmt.Errorf("replica: %w", err)
	}
	if err := f.Truncate(h.st.VirtualSize); err != nil {
		f.Close()
		return fmt.Errorf("replica size: %w", err)
	}
	addr := h.st.Listen
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil && h.st.Listen != "" && !create {
		ln, err = net.Listen("tcp", "127.0.0.1:0") // the old port is taken: move
	}
	if err != nil {
		f.Close()
		return fmt.Errorf("listen %s: %v: %w", addr, err, contract.ErrUnavailable)
	}
	h.mu.Lock()
	h.file, h.ln, h.active = f, ln, map[net.Conn]struct{}{}
	h.st.Listen = ln.Addr().String()
	h.mu.Unlock()
	go b.accept(h, ln, f)
	return nil
}

func (b *Backend) accept(h *handle, ln net.Listener, f *os.File) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		h.mu.Lock()
		if h.ln != ln { // stopped meanwhile
			h.mu.Unlock()
			_ = c.Close()
			return
		}
		h.conns.Add(1)
		h.active[c] = struct{}{}
		h.mu.Unlock()
		go func() {
			defer h.conns.Done()
			defer func() {
				h.mu.Lock()
				delete(h.active, c)
				h.mu.Unlock()
				_ = c.Close()
			}()
			if err := receive(c, h, f); err != nil {
				b.log.Warn("receive ended with an error", "handle", h.id, "error", err)
			}
		}()
	}
}

// PrepareSender implements contract.Storage.
func (b *Backend) PrepareSender(ctx context.Context, req contract.PrepareSenderRequest) (contract.PrepareSenderResponse, error) {
	if err := ctx.Err(); err != nil {
		return contract.PrepareSenderResponse{}, err
	}
	if req.MigrationID == "" || req.Disk.VDIUUID == "" || req.Disk.VirtualSize <= 0 || req.Peer.Address == "" {
		return contract.PrepareSenderResponse{}, fmt.Errorf("need MigrationID, Disk.VDIUUID, Disk.VirtualSize and Peer.Address: %w", contract.ErrInvalidArgument)
	}
	var opts Options
	if err := contract.DecodeOpaque(req.Options, &opts); err != nil {
		return contract.PrepareSenderResponse{}, fmt.Errorf("options: %w", err)
	}
	b.mu.Lock()
	rate := b.cfg.RateLimit
	b.mu.Unlock()
	if opts.RateLimit > 0 {
		rate = opts.RateLimit
	}
	key := req
	key.XAPI = contract.XAPIAccess{}
	h := &handle{id: handleID(contract.RoleSource, req.MigrationID, req.Disk.VDIUUID), migration: req.MigrationID,
		role: contract.RoleSource, request: key, state: contract.StatePrepared, round: -1,
		st: stateV1{Role: string(contract.RoleSource), VirtualSize: req.Disk.VirtualSize, PeerAddress: req.Peer.Address,
			PeerToken: string(req.Peer.Token), Round: -1, RateLimit: rate}}
	got, existing, err := b.claim(h)
	if err != nil {
		return contract.PrepareSenderResponse{}, err
	}
	hd, err := got.handle()
	if err != nil {
		return contract.PrepareSenderResponse{}, err
	}
	return contract.PrepareSenderResponse{Handle: hd, Existing: existing}, nil
}

// Status implements contract.Storage.
func (b *Backend) Status(_ context.Context, req contract.StatusRequest) (contract.StorageStatus, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.StorageStatus{}, err
	}
	return h.status(), nil
}

func (h *handle) status() contract.StorageStatus {
	h.mu.Lock()
	defer h.mu.Unlock()
	s := contract.StorageStatus{Handle: h.id, Role: h.role, State: h.state, Round: h.round,
		BytesToCopy: h.toCopy.Load(), BytesCopied: h.copied.Load(), BytesOnWire: h.onWire.Load(), LastError: h.lastErr}
	if el := time.Since(h.started).Seconds(); h.state == contract.StateSyncing && el > 0 {
		s.RateBps = int64(float64(s.BytesCopied) / el)
		if s.RateBps > 0 {
			s.ETA = time.Duration(float64(s.BytesToCopy-s.BytesCopied) / float64(s.RateBps) * float64(time.Second))
		}
	}
	return s
}

// Converge implements contract.Storage: it waits until no round runs.
func (b *Backend) Converge(ctx context.Context, req contract.ConvergeRequest) (contract.ConvergeResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.ConvergeResponse{}, err
	}
	for {
		st := h.status()
		if st.State != contract.StateSyncing {
			hd, err := h.handle()
			return contract.ConvergeResponse{Status: st, State: hd.State}, err
		}
		select {
		case <-ctx.Done():
			return contract.ConvergeResponse{}, ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Finalize implements contract.Storage: it stops receiving and keeps the replica.
func (b *Backend) Finalize(_ context.Context, req contract.FinalizeRequest) (contract.FinalizeResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.FinalizeResponse{}, err
	}
	if h.role != contract.RoleDestination {
		return contract.FinalizeResponse{}, fmt.Errorf("finalize on a %s handle: %w", h.role, contract.ErrInvalidArgument)
	}
	h.stopReceiving()
	h.mu.Lock()
	if h.state == contract.StateAborted {
		h.mu.Unlock()
		return contract.FinalizeResponse{}, fmt.Errorf("handle %s was aborted: %w", h.id, contract.ErrFailedPrecondition)
	}
	h.state = contract.StateFinalized
	h.st.Finalized = true
	uuid := h.st.ReplicaUUID
	h.mu.Unlock()
	hd, err := h.handle()
	return contract.FinalizeResponse{ReplicaVDIUUID: uuid, State: hd.State}, err
}

// stopReceiving closes the listener, waits for connections and syncs the file.
func (h *handle) stopReceiving() {
	h.mu.Lock()
	ln, f := h.ln, h.file
	h.ln, h.file = nil, nil
	for c := range h.active {
		_ = c.Close()
	}
	h.mu.Unlock()
	if ln != nil {
		_ = ln.Close()
	}
	if f != nil {
		h.conns.Wait()
		_ = f.Sync()
		_ = f.Close()
	}
}

// Recover implements contract.Storage.
func (b *Backend) Recover(ctx context.Context, req contract.RecoverRequest) (contract.RecoverResponse, error) {
	if err := ctx.Err(); err != nil {
		return contract.RecoverResponse{}, err
	}
	if h, err := b.get(req.Handle.ID); err == nil {
		hd, err := h.handle()
		h.mu.Lock()
		ep := h.endpoint()
		h.mu.Unlock()
		return contract.RecoverResponse{Handle: hd, Status: h.status(), Endpoint: ep}, err
	}
	if req.Handle.State.Version != stateVersion {
		return contract.RecoverResponse{}, fmt.Errorf("state version %d: %w", req.Handle.State.Version, contract.ErrInvalidArgument)
	}
	var st stateV1
	if err := contract.DecodeOpaque(req.Handle.State.Data, &st); err != nil {
		return contract.RecoverResponse{}, fmt.Errorf("recover %s: %w", req.Handle.ID, err)
	}
	if st.Role != string(req.Handle.Role) || req.Handle.ID == "" {
		return contract.RecoverResponse{}, fmt.Errorf("recover %s: state is for role %q: %w", req.Handle.ID, st.Role, contract.ErrInvalidArgument)
	}
	h := &handle{id: req.Handle.ID, migration: req.Handle.MigrationID, role: req.Handle.Role, st: st,
		state: contract.StateIdle, round: st.Round, request: "recovered"}
	if st.Finalized {
		h.state = contract.StateFinalized
	}
	if h.role == contract.RoleSource && req.Peer.Address != "" {
		h.st.PeerAddress, h.st.PeerToken = req.Peer.Address, string(req.Peer.Token)
	}
	if h.role == contract.RoleDestination && !st.Finalized {
		if err := b.openReceiver(h, false); err != nil {
			return contract.RecoverResponse{}, fmt.Errorf("recover %s: %w", h.id, err)
		}
	}
	got, _, err := b.claim(h)
	if err != nil {
		return contract.RecoverResponse{}, err
	}
	b.log.Info("handle recovered", "handle", h.id, "role", h.role, "round", st.Round)
	hd, err := got.handle()
	got.mu.Lock()
	ep := got.endpoint()
	got.mu.Unlock()
	return contract.RecoverResponse{Handle: hd, Status: got.status(), Endpoint: ep}, err
}

// Abort implements contract.Storage.
func (b *Backend) Abort(_ context.Context, req contract.AbortRequest) (contract.AbortResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.AbortResponse{}, err
	}
	h.mu.Lock()
	h.state = contract.StateAborted
	if h.cancel != nil {
		h.cancel()
	}
	h.mu.Unlock()
	if h.role == contract.RoleDestination {
		h.stopReceiving()
	}
	return contract.AbortResponse{}, nil
}

// Cleanup implements contract.Storage. It works from the request's state
// when the handle is unknown (after a restart).
func (b *Backend) Cleanup(ctx context.Context, req contract.CleanupRequest) (contract.CleanupResponse, error) {
	st := stateV1{}
	if h, err := b.get(req.Handle.ID); err == nil {
		_, _ = b.Abort(ctx, contract.AbortRequest{Handle: h.id})
		h.mu.Lock()
		st = h.st
		h.mu.Unlock()
		b.forget(h.id)
	} else if req.Handle.State.Version == stateVersion {
		_ = contract.DecodeOpaque(req.Handle.State.Data, &st)
	}
	if req.DeleteReplica && st.Role == string(contract.RoleDestination) && st.ReplicaPath != "" {
		b.mu.Lock()
		dir := b.stateDir
		b.mu.Unlock()
		// Only ever delete our own files.
		if filepath.Dir(st.ReplicaPath) == filepath.Clean(dir) {
			if err := os.Remove(st.ReplicaPath); err != nil && !errors.Is(err, os.ErrNotExist) {
				return contract.CleanupResponse{}, fmt.Errorf("delete replica: %w", err)
			}
		}
	}
	return contract.CleanupResponse{}, nil
}
