package nbdstore

import (
	"fmt"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Config is the backend config: the "nbd" section of the pool's
// wanmotion:config, msgpack-encoded by the host (contract.ConfigFromJSON).
type Config struct {
	// Connections is the number of NBD connections to the peer per disk
	// (default 4).
	Connections int `msgpack:"connections"`
	// InFlight is the number of copy requests in flight per disk, over all
	// connections (default 32).
	InFlight int `msgpack:"in_flight"`
	// ChunkSize is the largest READ/WRITE in bytes, a multiple of 64 KiB
	// (default 1 MiB).
	ChunkSize int64 `msgpack:"chunk_size"`
	// CheckpointBytes: the sender flushes the replica (and the receiver
	// records the applied blocks durably) every CheckpointBytes copied
	// (default 64 MiB). It bounds what a restart sends again.
	CheckpointBytes int64 `msgpack:"checkpoint_bytes"`
	// RateLimit caps each disk's payload rate in bytes/s (0: none; the WAN
	// gateway's cap applies anyway).
	RateLimit int64 `msgpack:"rate_limit"`
	// ReconnectTimeoutSec is how long a round keeps reconnecting to the
	// peer after a cut before it fails with unavailable (default 300).
	ReconnectTimeoutSec int64 `msgpack:"reconnect_timeout_s"`
	// StallTimeoutSec: when no request to the peer completes for this long
	// while some are in flight, the connections are dropped and made again
	// (a silent WAN path; default 60).
	StallTimeoutSec int64 `msgpack:"stall_timeout_s"`
	// SourceAccess selects how the snapshot is read: "auto" (xapi's NBD
	// export from VDI.get_nbd_info, else a dom0 attach), "nbd" or "dom0".
	SourceAccess string `msgpack:"source_access"`
	// SkipSRSpaceCheck turns off the free-space check of the destination
	// SR when the backend creates the replica itself.
	SkipSRSpaceCheck bool `msgpack:"skip_sr_space_check"`
	// AllowInsecureNBD lets the source read xapi's NBD export in clear
	// when the host refuses TLS (network purpose insecure_nbd).
	AllowInsecureNBD bool `msgpack:"allow_insecure_nbd"`
}

func (c *Config) setDefaults() error {
	if c.Connections == 0 {
		c.Connections = 4
	}
	if c.InFlight == 0 {
		c.InFlight = 32
	}
	if c.ChunkSize == 0 {
		c.ChunkSize = 1 << 20
	}
	if c.CheckpointBytes == 0 {
		c.CheckpointBytes = 64 << 20
	}
	if c.ReconnectTimeoutSec == 0 {
		c.ReconnectTimeoutSec = 300
	}
	if c.StallTimeoutSec == 0 {
		c.StallTimeoutSec = 60
	}
	if c.SourceAccess == "" {
		c.SourceAccess = "auto"
	}
	switch {
	case c.Connections < 1 || c.Connections > 64:
		return fmt.Errorf("config: connections %d outside 1..64: %w", c.Connections, contract.ErrInvalidArgument)
	case c.InFlight < 1 || c.InFlight > 1024:
		return fmt.Errorf("config: in_flight %d outside 1..1024: %w", c.InFlight, contract.ErrInvalidArgument)
	case c.ChunkSize < blockSize || c.ChunkSize > 32<<20 || c.ChunkSize%blockSize != 0:
		return fmt.Errorf("config: chunk_size %d must be a multiple of 64 KiB up to 32 MiB: %w", c.ChunkSize, contract.ErrInvalidArgument)
	case c.CheckpointBytes < 0 || c.RateLimit < 0 || c.ReconnectTimeoutSec < 0 || c.StallTimeoutSec < 0:
		return fmt.Errorf("config: negative checkpoint_bytes, rate_limit or reconnect_timeout_s: %w", contract.ErrInvalidArgument)
	}
	switch c.SourceAccess {
	case "auto", "nbd", "dom0":
	default:
		return fmt.Errorf("config: source_access %q: want auto, nbd or dom0: %w", c.SourceAccess, contract.ErrInvalidArgument)
	}
	return nil
}

// Options are per-disk options (PrepareSenderRequest.Options).
type Options struct {
	RateLimit   int64 `msgpack:"rate_limit"`
	Connections int   `msgpack:"connections"`
}

// Protocol names what the receiver speaks, carried in the endpoint.
const Protocol = "wanmotion-nbd/1"

// EndpointParams are the backend-private parameters of the receiver's
// Endpoint (msgpack in Endpoint.Params).
type EndpointParams struct {
	Protocol  string `msgpack:"protocol"`
	Size      int64  `msgpack:"size"`       // replica size in bytes
	BlockSize int64  `msgpack:"block_size"` // journal and hash block size
}

// stateV1 is what the engine checkpoints (contract.State.Data).
type stateV1 struct {
	Role        string `msgpack:"role"`
	VirtualSize int64  `msgpack:"virtual_size"`
	VDIUUID     string `msgpack:"vdi_uuid"`
	// xapi access of this site (the session is a secret: it is kept so a
	// Recover without fresh credentials still works).
	XAPIURL  string `msgpack:"xapi_url,omitempty"`
	XAPIPin  string `msgpack:"xapi_pin,omitempty"`
	Session  string `msgpack:"session,omitempty"`
	HostUUID string `msgpack:"host_uuid,omitempty"`
	// VBD of a dom0 attach we made (replica at the destination, snapshot
	// at the source during a round).
	VBDRef     string `msgpack:"vbd_ref,omitempty"`
	DevicePath string `msgpack:"device_path,omitempty"`
	// destination
	ReplicaUUID string `msgpack:"replica_uuid,omitempty"`
	ReplicaRef  string `msgpack:"replica_ref,omitempty"`
	Created     bool   `msgpack:"created,omitempty"`
	ReplicaSize int64  `msgpack:"replica_size,omitempty"`
	Listen      string `msgpack:"listen,omitempty"`
	Token       string `msgpack:"token,omitempty"`
	Finalized   bool   `msgpack:"finalized,omitempty"`
	// source
	PeerNetwork string `msgpack:"peer_network,omitempty"`
	PeerAddress string `msgpack:"peer_address,omitempty"`
	PeerToken   string `msgpack:"peer_token,omitempty"`
	Round       int    `msgpack:"round"` // last completed round, -1 before round 0
	Snapshot    string `msgpack:"snapshot,omitempty"`
	RateLimit   int64  `msgpack:"rate_limit,omitempty"`
	Connections int    `msgpack:"connections,omitempty"`
}

const stateVersion = 1
