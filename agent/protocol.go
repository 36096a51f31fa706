package agent

import (
	"time"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// ProtocolVersion is the version of the agent RPC surface below. Hello
// fails when the controller and the agent disagree.
const ProtocolVersion = 1

// ServiceName is the net/rpc service the agent registers.
const ServiceName = "Agent"

// Method names of the agent service (ServiceName + "." + method).
const (
	MethodHello                  = "Hello"
	MethodHeartbeat              = "Heartbeat"
	MethodCancel                 = "Cancel"
	MethodStop                   = "Stop"
	MethodLaunchStorage          = "LaunchStorage"
	MethodLaunchNetwork          = "LaunchNetwork"
	MethodStoragePrepareReceiver = "StoragePrepareReceiver"
	MethodStoragePrepareSender   = "StoragePrepareSender"
	MethodStorageSyncRound       = "StorageSyncRound"
	MethodStorageStatus          = "StorageStatus"
	MethodStorageConverge        = "StorageConverge"
	MethodStorageFinalize        = "StorageFinalize"
	MethodStorageRecover         = "StorageRecover"
	MethodStorageAbort           = "StorageAbort"
	MethodStorageCleanup         = "StorageCleanup"
	MethodNetworkPrepare         = "NetworkPrepare"
	MethodNetworkActivate        = "NetworkActivate"
	MethodNetworkRelease         = "NetworkRelease"
	MethodNetworkStatus          = "NetworkStatus"
	MethodNetworkRecover         = "NetworkRecover"
	MethodNetworkCleanup         = "NetworkCleanup"
	MethodGatewayListen          = "GatewayListen"
	MethodGatewayAllow           = "GatewayAllow"
	MethodGatewayDial            = "GatewayDial"
	MethodGatewayForward         = "GatewayForward"
	MethodGatewayStats           = "GatewayStats"
	MethodGatewaySetRateLimit    = "SetRateLimit"
	MethodGatewayStop            = "GatewayStop"
)

// Args is the net/rpc argument of every agent method: call metadata (id
// for Cancel, the controller's deadline) and the request.
type Args[Req any] struct {
	Call contract.CallMeta `msgpack:"call"`
	Req  Req               `msgpack:"req"`
}

// Reply is the net/rpc reply of every agent method. Agent and backend
// errors travel in Err (contract codes, so errors.Is works on the
// controller); the net/rpc error is reserved for transport failures.
type Reply[Resp any] struct {
	Resp Resp                `msgpack:"resp"`
	Err  *contract.WireError `msgpack:"err"`
}

// Empty is the request or response of methods without one.
type Empty struct{}

// HelloRequest opens (or re-opens) a controller's conversation with an
// agent. MigrationID and Role must be the agent's own.
type HelloRequest struct {
	Version     int           `msgpack:"version"`
	MigrationID string        `msgpack:"migration_id"`
	Role        contract.Role `msgpack:"role"`
}

// HelloResponse describes the agent.
type HelloResponse struct {
	Version     int           `msgpack:"version"`
	MigrationID string        `msgpack:"migration_id"`
	Role        contract.Role `msgpack:"role"`
	PID         int           `msgpack:"pid"`
	StartedAt   time.Time     `msgpack:"started_at"`
	// IdleTimeout is how long the agent waits without any call before it
	// stops itself; the controller heartbeats well within it.
	IdleTimeout time.Duration `msgpack:"idle_timeout"`
	// Storage and Network name the running backends ("" if none).
	Storage string `msgpack:"storage"`
	Network string `msgpack:"network"`
	// GatewayAddr is the destination gateway's listen address ("" before GatewayListen).
	GatewayAddr string `msgpack:"gateway_addr"`
}

// HeartbeatRequest keeps the agent alive. Liveness, when positive, asks
// the agent to close this connection (cancelling its calls in flight) if
// nothing arrives on it for that long: the controller heartbeats at a
// fraction of it, so silence means the path is gone (half-open). Older
// controllers send an empty request: no check.
type HeartbeatRequest struct {
	Liveness time.Duration `msgpack:"liveness"`
}

// LaunchRequest starts a backend (idempotent for the same name; a running
// backend is relaunched only if it exited).
type LaunchRequest struct {
	Name   string `msgpack:"name"`
	Config []byte `msgpack:"config"` // msgpack, contract.ConfigFromJSON
}

// LaunchResponse describes the running backend.
type LaunchResponse struct {
	Info       contract.Info `msgpack:"info"`
	APIVersion string        `msgpack:"api_version"`
	PID        int           `msgpack:"pid"`
	Existing   bool          `msgpack:"existing"` // it was already running
	Warnings   []string      `msgpack:"warnings"`
}

// GatewayListenRequest starts the destination gateway listener.
type GatewayListenRequest struct {
	// Addr to listen on; "" uses the agent's --gateway-listen, else 127.0.0.1:0.
	Addr string `msgpack:"addr"`
}

// GatewayListenResponse returns the actual listen address.
type GatewayListenResponse struct {
	Addr string `msgpack:"addr"`
}

// GatewayAllowRequest adds forward targets the destination gateway will
// dial for the source ("host:port", exact match).
type GatewayAllowRequest struct {
	Targets []string `msgpack:"targets"`
}

// GatewayDialRequest opens (or keeps) the source gateway session.
type GatewayDialRequest struct {
	Addr                 string `msgpack:"addr"` // the destination's advertised address
	Streams              int    `msgpack:"streams"`
	Compression          string `msgpack:"compression"` // "zstd" (default), "none", "always"
	BandwidthBytesPerSec int64  `msgpack:"bandwidth_bytes_per_sec"`
}

// GatewayDialResponse names the session.
type GatewayDialResponse struct {
	SessionID string `msgpack:"session_id"`
	Existing  bool   `msgpack:"existing"`
}

// GatewayForwardRequest asks the source agent for a local end tunnelled to
// Target at the destination site.
type GatewayForwardRequest struct {
	Target string `msgpack:"target"`
}

// GatewayForwardResponse is the local end ("host:port").
type GatewayForwardResponse struct {
	Addr string `msgpack:"addr"`
}

// GatewayStatsResponse are cumulative counters of this agent's gateway
// sessions (earlier sessions of the migration included).
type GatewayStatsResponse struct {
	BytesOffered        int64   `msgpack:"bytes_offered"`
	BytesOnWire         int64   `msgpack:"bytes_on_wire"`
	BytesReceivedOnWire int64   `msgpack:"bytes_received_on_wire"`
	PayloadOnWire       int64   `msgpack:"payload_on_wire"`
	RetransmittedBytes  int64   `msgpack:"retransmitted_bytes"`
	Reconnects          int64   `msgpack:"reconnects"`
	Connected           int     `msgpack:"connected"`
	Sessions            int     `msgpack:"sessions"`
	CompressionRatio    float64 `msgpack:"compression_ratio"`
	RateLimit           int64   `msgpack:"rate_limit"`
}

// SetRateLimitRequest changes the gateway's cap while it runs (0 = none).
type SetRateLimitRequest struct {
	BytesPerSec int64 `msgpack:"bytes_per_sec"`
}
