package main

import (
	"context"
	"fmt"
	"net"
	"reflect"
	"sync"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Backend implements contract.Network without touching the network.
type Backend struct {
	log hclog.Logger

	mu      sync.Mutex
	handles map[string]*handle
}

var _ contract.Network = (*Backend)(nil)

type state struct {
	Role  string   `msgpack:"role"`
	VM    string   `msgpack:"vm"`
	Addrs []string `msgpack:"addrs"`
	Phase string   `msgpack:"phase"`
}

type handle struct {
	id, migration string
	role          contract.Role
	request       any
	st            state
}

// New returns a backend.
func New(log hclog.Logger) *Backend { return &Backend{log: log, handles: map[string]*handle{}} }

// Info implements contract.Network.
func (b *Backend) Info(context.Context) (contract.Info, error) {
	return contract.Info{Kind: contract.KindNetwork, Name: "noop", Version: "0.1.0",
		Description: "example backend: keeps the lifecycle, changes nothing",
		APIVersions: []string{contract.APIVersion10}, Capabilities: contract.CapResume}, nil
}

// Configure implements contract.Network.
func (b *Backend) Configure(_ context.Context, req contract.ConfigureRequest) (contract.ConfigureResponse, error) {
	return contract.ConfigureResponse{}, contract.CheckAPIVersion(req.APIVersion, []string{contract.APIVersion10})
}

func (h *handle) public() (contract.Handle, error) {
	data, err := contract.EncodeOpaque(h.st)
	return contract.Handle{ID: h.id, MigrationID: h.migration, Role: h.role, State: contract.State{Version: 1, Data: data}}, err
}

func (h *handle) status() contract.NetStatus {
	return contract.NetStatus{Handle: h.id, Role: h.role, State: contract.HandleState(h.st.Phase),
		Detail: fmt.Sprintf("%d addresses, nothing configured", len(h.st.Addrs))}
}

// Prepare implements contract.Network.
func (b *Backend) Prepare(ctx context.Context, req contract.NetPrepareRequest) (contract.NetPrepareResponse, error) {
	if err := ctx.Err(); err != nil {
		return contract.NetPrepareResponse{}, err
	}
	if req.MigrationID == "" || req.VMUUID == "" || (req.Role != contract.RoleSource && req.Role != contract.RoleDestination) {
		return contract.NetPrepareResponse{}, fmt.Errorf("need MigrationID, VMUUID and a role: %w", contract.ErrInvalidArgument)
	}
	var addrs []string
	for _, v := range req.VIFs {
		if _, err := net.ParseMAC(v.MAC); err != nil {
			return contract.NetPrepareResponse{}, fmt.Errorf("VIF %s: %v: %w", v.Device, err, contract.ErrInvalidArgument)
		}
		addrs = append(addrs, v.IPv4...)
		addrs = append(addrs, v.IPv6...)
	}
	key := req
	key.XAPI, key.Peer = contract.XAPIAccess{}, contract.Endpoint{}
	id := string(req.Role)[:3] + "-" + req.MigrationID + "-" + req.VMUUID
	b.mu.Lock()
	defer b.mu.Unlock()
	h, ok := b.handles[id]
	if ok && !reflect.DeepEqual(h.request, key) {
		return contract.NetPrepareResponse{}, fmt.Errorf("handle %s prepared with a different request: %w", id, contract.ErrAlreadyExists)
	}
	if !ok {
		h = &handle{id: id, migration: req.MigrationID, role: req.Role, request: key,
			st: state{Role: string(req.Role), VM: req.VMUUID, Addrs: addrs, Phase: string(contract.StatePrepared)}}
		b.handles[id] = h
		b.log.Info("prepared", "handle", id, "vifs", len(req.VIFs))
	}
	pub, err := h.public()
	return contract.NetPrepareResponse{Handle: pub, Existing: ok, Endpoint: contract.Endpoint{Network: "tcp"}}, err
}

func (b *Backend) get(id string, role contract.Role) (*handle, error) {
	h, ok := b.handles[id]
	if !ok {
		return nil, fmt.Errorf("handle %q: %w", id, contract.ErrNotFound)
	}
	if role != "" && h.role != role {
		return nil, fmt.Errorf("handle %s is a %s handle: %w", id, h.role, contract.ErrInvalidArgument)
	}
	return h, nil
}

// Activate implements contract.Network.
func (b *Backend) Activate(_ context.Context, req contract.ActivateRequest) (contract.ActivateResponse, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h, err := b.get(req.Handle, contract.RoleDestination)
	if err != nil {
		return contract.ActivateResponse{}, err
	}
	h.st.Phase = string(contract.StateActive)
	pub, err := h.public()
	return contract.ActivateResponse{State: pub.State, Announced: h.st.Addrs}, err
}

// Release implements contract.Network.
func (b *Backend) Release(_ context.Context, req contract.ReleaseRequest) (contract.ReleaseResponse, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h, err := b.get(req.Handle, contract.RoleSource)
	if err != nil {
		return contract.ReleaseResponse{}, err
	}
	h.st.Phase = string(contract.StateReleased)
	pub, err := h.public()
	return contract.ReleaseResponse{State: pub.State}, err
}

// Status implements contract.Network.
func (b *Backend) Status(_ context.Context, req contract.NetStatusRequest) (contract.NetStatus, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	h, err := b.get(req.Handle, "")
	if err != nil {
		return contract.NetStatus{}, err
	}
	return h.status(), nil
}

// Recover implements contract.Network.
func (b *Backend) Recover(ctx context.Context, req contract.NetRecoverRequest) (contract.NetRecoverResponse, error) {
	if err := ctx.Err(); err != nil {
		return contract.NetRecoverResponse{}, err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	h, ok := b.handles[req.Handle.ID]
	if !ok {
		var st state
		if err := contract.DecodeOpaque(req.Handle.State.Data, &st); err != nil {
			return contract.NetRecoverResponse{}, err
		}
		if req.Handle.ID == "" || st.Role != string(req.Handle.Role) {
			return contract.NetRecoverResponse{}, fmt.Errorf("state does not match handle %q: %w", req.Handle.ID, contract.ErrInvalidArgument)
		}
		h = &handle{id: req.Handle.ID, migration: req.Handle.MigrationID, role: req.Handle.Role, request: "recovered", st: st}
		b.handles[h.id] = h
	}
	pub, err := h.public()
	return contract.NetRecoverResponse{Handle: pub, Status: h.status()}, err
}

// Cleanup implements contract.Network.
func (b *Backend) Cleanup(_ context.Context, req contract.NetCleanupRequest) (contract.NetCleanupResponse, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	delete(b.handles, req.Handle.ID)
	return contract.NetCleanupResponse{}, nil
}
