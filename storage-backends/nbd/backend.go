// Package nbdstore is the storage strategy "nbd" (binary
// wanmotion-storage-nbd): it seeds a destination replica VDI from CBT
// snapshots of the source VDI over NBD. The source reads snapshot Sk from
// xapi's read-only NBD export (VDI.get_nbd_info, TLS with the returned
// certificate pinned) or from a dom0-attached device, and writes into the
// replica through a writable NBD server of ours at the destination, with
// many requests in flight over several connections (through the WAN
// gateway). See docs/storage-nbd.md.
package nbdstore

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// Version is the backend's own version.
const Version = "0.1.0"

// Name is the backend name (wanmotion-storage-<Name>).
const Name = "nbd"

// Backend implements contract.Storage.
type Backend struct {
	log hclog.Logger

	prepMu sync.Mutex // serialises prepares, so one key is prepared once

	mu       sync.Mutex
	cfg      Config
	stateDir string
	handles  map[string]*handle
}

var _ contract.Storage = (*Backend)(nil)

// New returns an unconfigured backend.
func New(log hclog.Logger) *Backend {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	cfg := Config{}
	_ = cfg.setDefaults()
	return &Backend{log: log, cfg: cfg, handles: map[string]*handle{}}
}

type handle struct {
	id, migration string
	role          contract.Role
	request       any // the prepare request without credentials
	log           hclog.Logger

	mu      sync.Mutex
	st      stateV1
	state   contract.HandleState
	round   int
	cancel  context.CancelFunc // of the running round
	running bool
	started time.Time
	lastErr string
	x       *xapi.Client

	toCopy, copied, onWire, repaired atomic.Int64

	recv *receiver // destination
}

// Info implements contract.Storage.
func (b *Backend) Info(context.Context) (contract.Info, error) {
	return contract.Info{
		Kind:        contract.KindStorage,
		Name:        Name,
		Version:     Version,
		Description: "seeds the replica from CBT snapshots over NBD (sparse, incremental, resumable)",
		APIVersions: []string{contract.APIVersion10},
		Capabilities: contract.CapSource | contract.CapDestination | contract.CapIncremental |
			contract.CapSparse | contract.CapResume | contract.CapVerify,
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
	if err := cfg.setDefaults(); err != nil {
		return contract.ConfigureResponse{}, err
	}
	if req.StateDir != "" {
		if err := os.MkdirAll(req.StateDir, 0o700); err != nil {
			return contract.ConfigureResponse{}, fmt.Errorf("state dir: %v: %w", err, contract.ErrFailedPrecondition)
		}
	}
	b.mu.Lock()
	b.cfg, b.stateDir = cfg, req.StateDir
	b.mu.Unlock()
	b.log.Debug("configured", "state_dir", req.StateDir, "connections", cfg.Connections, "in_flight", cfg.InFlight)
	return contract.ConfigureResponse{}, nil
}

func (b *Backend) config() (Config, string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cfg, b.stateDir
}

func randomHex(n int) string {
	p := make([]byte, n)
	_, _ = rand.Read(p)
	return hex.EncodeToString(p)
}

func handleID(role contract.Role, migration, vdi string) string {
	return string(role)[:3] + "-" + migration + "-" + vdi
}

// existing returns the handle with id if any: identical request → it,
// different → ErrAlreadyExists.
func (b *Backend) existing(id string, request any) (*handle, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	old, ok := b.handles[id]
	if !ok {
		return nil, nil
	}
	if reflect.DeepEqual(old.request, request) {
		return old, nil
	}
	return nil, fmt.Errorf("handle %s prepared with a different request: %w", id, contract.ErrAlreadyExists)
}

func (b *Backend) put(h *handle) {
	b.mu.Lock()
	b.handles[h.id] = h
	b.mu.Unlock()
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

func (b *Backend) forget(id string) {
	b.mu.Lock()
	delete(b.handles, id)
	b.mu.Unlock()
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

// Status implements contract.Storage. It never waits for a round.
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
	if h.recv != nil {
		round, applied := h.recv.j.status()
		if round >= 0 {
			s.Round = round
		}
		s.BytesCopied = applied
		s.BytesOnWire = h.recv.rxBytes.Load()
	}
	if el := time.Since(h.started).Seconds(); h.state == contract.StateSyncing && el > 0 {
		s.RateBps = int64(float64(s.BytesCopied) / el)
		if s.RateBps > 0 && s.BytesToCopy > s.BytesCopied {
			s.ETA = time.Duration(float64(s.BytesToCopy-s.BytesCopied) / float64(s.RateBps) * float64(time.Second))
		}
	}
	return s
}

// Converge implements contract.Storage: rounds are discrete, so it waits
// until no round runs.
func (b *Backend) Converge(ctx context.Context, req contract.ConvergeRequest) (contract.ConvergeResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.ConvergeResponse{}, err
	}
	for {
		h.mu.Lock()
		running := h.running
		h.mu.Unlock()
		if !running {
			hd, err := h.handle()
			return contract.ConvergeResponse{Status: h.status(), State: hd.State}, err
		}
		select {
		case <-ctx.Done():
			return contract.ConvergeResponse{}, fmt.Errorf("converge: %w: %v", contract.ErrCancelled, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
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
	r := h.recv
	h.mu.Unlock()
	if r != nil {
		r.stop()
	}
	return contract.AbortResponse{}, nil
}

// Cleanup implements contract.Storage. It works from the request's state
// when the handle is unknown (after a restart), and is idempotent.
func (b *Backend) Cleanup(ctx context.Context, req contract.CleanupRequest) (contract.CleanupResponse, error) {
	var st stateV1
	var x *xapi.Client
	owned := false
	if h, err := b.get(req.Handle.ID); err == nil {
		_, _ = b.Abort(ctx, contract.AbortRequest{Handle: h.id})
		h.mu.Lock()
		for h.running { // wait for the aborted round to let go
			h.mu.Unlock()
			time.Sleep(5 * time.Millisecond)
			h.mu.Lock()
		}
		st, x = h.st, h.x
		h.x = nil
		h.mu.Unlock()
		b.forget(h.id)
		owned = true
	} else if req.Handle.State.Version == stateVersion {
		if err := contract.DecodeOpaque(req.Handle.State.Data, &st); err != nil {
			return contract.CleanupResponse{}, nil // nothing we can act on
		}
	} else {
		return contract.CleanupResponse{}, nil
	}
	if !owned || x == nil {
		if req.XAPI.URL != "" {
			st.XAPIURL, st.Session, st.XAPIPin = req.XAPI.URL, string(req.XAPI.Session), req.XAPI.TLSPin
		}
		if st.XAPIURL != "" && st.Session != "" {
			x, _ = openXAPI(st.XAPIURL, st.Session, st.XAPIPin, b.log)
		}
	}
	defer closeXAPI(x)
	if x != nil {
		detachFromDom0(ctx, x, xapi.VBDRef(st.VBDRef))
		if req.DeleteReplica && st.Role == string(contract.RoleDestination) && st.ReplicaRef != "" {
			if err := x.VDIDestroy(ctx, xapi.VDIRef(st.ReplicaRef)); err != nil && !isGone(err) {
				return contract.CleanupResponse{}, xapiErr("destroy replica", err)
			}
		}
	}
	if _, dir := b.config(); dir != "" && req.Handle.ID != "" {
		_ = os.Remove(journalPath(dir, req.Handle.ID))
	}
	return contract.CleanupResponse{}, nil
}

func journalPath(dir, id string) string {
	safe := strings.Map(func(r rune) rune {
		if r == '-' || r == '_' || r == '.' || (r >= '0' && r <= '9') || (r >= 'a' && r <= 'z') || (r >= 'A' && r <= 'Z') {
			return r
		}
		return '_'
	}, id)
	return filepath.Join(dir, "journal-"+safe+".msgpack")
}

// isGone reports an xapi error meaning the object no longer exists.
func isGone(err error) bool {
	return xapi.IsCode(err, "HANDLE_INVALID") || xapi.IsCode(err, "UUID_INVALID")
}

// Recover implements contract.Storage.
func (b *Backend) Recover(ctx context.Context, req contract.RecoverRequest) (contract.RecoverResponse, error) {
	if err := ctx.Err(); err != nil {
		return contract.RecoverResponse{}, fmt.Errorf("recover: %w: %v", contract.ErrCancelled, err)
	}
	if h, err := b.get(req.Handle.ID); err == nil {
		return h.recoverResponse()
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
	if req.XAPI.URL != "" {
		st.XAPIURL, st.Session, st.XAPIPin = req.XAPI.URL, string(req.XAPI.Session), req.XAPI.TLSPin
		if req.XAPI.HostUUID != "" {
			st.HostUUID = req.XAPI.HostUUID
		}
	}
	h := &handle{id: req.Handle.ID, migration: req.Handle.MigrationID, role: req.Handle.Role, st: st,
		state: contract.StateIdle, round: st.Round, request: "recovered", log: b.log.With("handle", req.Handle.ID)}
	if st.Finalized {
		h.state = contract.StateFinalized
	}
	if h.role == contract.RoleSource && req.Peer.Address != "" {
		h.st.PeerNetwork, h.st.PeerAddress, h.st.PeerToken = req.Peer.Network, req.Peer.Address, string(req.Peer.Token)
	}
	b.prepMu.Lock()
	defer b.prepMu.Unlock()
	if got, err := b.get(h.id); err == nil { // recovered meanwhile
		return got.recoverResponse()
	}
	if h.role == contract.RoleDestination && !st.Finalized {
		if err := b.reopenReceiver(ctx, h); err != nil {
			return contract.RecoverResponse{}, fmt.Errorf("recover %s: %w", h.id, err)
		}
	}
	b.put(h)
	b.log.Info("handle recovered", "handle", h.id, "role", h.role, "round", st.Round)
	return h.recoverResponse()
}

func (h *handle) recoverResponse() (contract.RecoverResponse, error) {
	hd, err := h.handle()
	if err != nil {
		return contract.RecoverResponse{}, err
	}
	resp := contract.RecoverResponse{Handle: hd, Status: h.status()}
	h.mu.Lock()
	if h.role == contract.RoleSource {
		resp.Status.Round = h.st.Round
	} else {
		resp.Endpoint = h.endpointLocked()
	}
	h.mu.Unlock()
	return resp, nil
}

// toContractErr maps ctx errors to ErrCancelled, keeping classified ones.
func toContractErr(what string, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, contract.ErrCancelled) {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%s: %w: %v", what, contract.ErrCancelled, err)
	}
	if contract.ToWire(err).Code != contract.CodeInternal {
		return fmt.Errorf("%s: %w", what, err)
	}
	return fmt.Errorf("%s: %v: %w", what, err, contract.ErrInternal)
}
