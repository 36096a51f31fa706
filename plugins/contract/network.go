package contract

import "context"

// Network is a network strategy: it keeps a VM reachable at its addresses
// during and after the move (ARCHITECTURE §5).
//
// Prepare runs on both sites (one handle per site and VM); Activate runs on
// the destination at switch-over (also from the vm-post-migrate hook);
// Release runs on the source after the VM has left. Handle rules, Status
// concurrency, cancellation and idempotent Cleanup are the same as for
// Storage. Activate and Release are idempotent: repeating them on a handle
// already active or released returns nil.
type Network interface {
	Info(ctx context.Context) (Info, error)
	Configure(ctx context.Context, req ConfigureRequest) (ConfigureResponse, error)

	Prepare(ctx context.Context, req NetPrepareRequest) (NetPrepareResponse, error)
	Activate(ctx context.Context, req ActivateRequest) (ActivateResponse, error)
	Release(ctx context.Context, req ReleaseRequest) (ReleaseResponse, error)
	Status(ctx context.Context, req NetStatusRequest) (NetStatus, error)
	Recover(ctx context.Context, req NetRecoverRequest) (NetRecoverResponse, error)
	Cleanup(ctx context.Context, req NetCleanupRequest) (NetCleanupResponse, error)
}

// VIFInfo describes one VIF of the VM being moved.
type VIFInfo struct {
	Device          string // VIF device number
	MAC             string
	NetworkUUID     string // source network
	DestNetworkUUID string // mapped destination network
	Bridge          string // bridge on this site, if known
	IPv4            []string
	IPv6            []string
}

// NetPrepareRequest prepares one site for a VM's move.
type NetPrepareRequest struct {
	MigrationID string
	Role        Role
	VMUUID      string
	VMName      string
	VIFs        []VIFInfo
	// Peer is the other site's Endpoint through the WAN gateway, when the
	// backend needs a channel (empty on the first site prepared).
	Peer    Endpoint
	Listen  string
	XAPI    XAPIAccess
	Options []byte
}

// NetPrepareResponse returns the handle and this site's endpoint.
type NetPrepareResponse struct {
	Handle   Handle
	Endpoint Endpoint
	Existing bool
}

// ActivateRequest names a destination handle.
type ActivateRequest struct {
	Handle string
	// DomID is the VM's new domain id, when known (from the hook).
	DomID int
}

// ActivateResponse reports what was announced.
type ActivateResponse struct {
	State State
	// Announced lists addresses announced (gratuitous ARP, unsolicited NA,
	// binding update), for the report.
	Announced []string
}

// ReleaseRequest names a source handle.
type ReleaseRequest struct {
	Handle string
}

// ReleaseResponse returns the state to checkpoint.
type ReleaseResponse struct {
	State State
}

// NetStatusRequest names a handle.
type NetStatusRequest struct {
	Handle string
}

// NetStatus is the state of a network handle.
type NetStatus struct {
	Handle    string
	Role      Role
	State     HandleState
	Detail    string // e.g. "vxlan vni 4242 up"
	LastError string
}

// NetRecoverRequest re-binds a handle from its persisted state.
type NetRecoverRequest struct {
	Handle Handle
	XAPI   XAPIAccess
	Peer   Endpoint
}

// NetRecoverResponse returns the re-bound handle.
type NetRecoverResponse struct {
	Handle   Handle
	Status   NetStatus
	Endpoint Endpoint
}

// NetCleanupRequest carries the whole handle so cleanup works after a restart.
type NetCleanupRequest struct {
	Handle Handle
	XAPI   XAPIAccess
}

// NetCleanupResponse is empty.
type NetCleanupResponse struct{}
