package contract

import (
	"fmt"
	"math/bits"
	"sort"
	"strings"

	"github.com/vmihailenco/msgpack/v5"
)

// Kind is the kind of backend: it is also the go-plugin plugin name and the
// middle part of the binary name wanmotion-<kind>-<name>.
type Kind string

// Backend kinds.
const (
	KindStorage Kind = "storage"
	KindNetwork Kind = "network"
)

// Kinds lists every backend kind.
func Kinds() []Kind { return []Kind{KindStorage, KindNetwork} }

// ParseKind checks a kind name.
func ParseKind(s string) (Kind, error) {
	switch Kind(s) {
	case KindStorage, KindNetwork:
		return Kind(s), nil
	}
	return "", fmt.Errorf("backend kind %q: want storage or network: %w", s, ErrInvalidArgument)
}

// Role is the side of a migration a handle works for.
type Role string

// Roles.
const (
	RoleSource      Role = "source"
	RoleDestination Role = "destination"
)

// Capabilities is a set of capability flags. Flags are part of the
// protocol: a bit keeps its meaning forever; new flags take new bits and
// come with an API minor bump.
type Capabilities uint64

// Storage capability flags.
const (
	// CapSource: the backend can act on the source site (PrepareSender, SyncRound).
	CapSource Capabilities = 1 << iota
	// CapDestination: the backend can act on the destination site (PrepareReceiver).
	CapDestination
	// CapIncremental: SyncRound accepts a changed-block bitmap (Full=false).
	CapIncremental
	// CapSparse: a full round copies allocated extents only.
	CapSparse
	// CapResume: Recover re-binds a handle from its persisted State after a
	// restart of the backend, the agent or the controller.
	CapResume
	// CapVerify: SyncRound honours Verify (compare and repair after the round).
	CapVerify
	// CapContinuous: replication runs continuously between rounds (e.g. DRBD);
	// SyncRound waits until the replica has caught up with the snapshot.
	CapContinuous
)

// Network capability flags (bits 32 and up).
const (
	// CapL2Stretch: the VM's L2 segment is stretched to the destination.
	CapL2Stretch Capabilities = 1 << (32 + iota)
	// CapKeepAddress: the VM keeps its IP addresses at the destination.
	CapKeepAddress
	// CapHookActivation: Activate may be driven by the vm-post-migrate hook.
	CapHookActivation
	// CapUserspaceTunnel: works without kernel tunnel support, over the WAN gateway.
	CapUserspaceTunnel
)

var capNames = map[Capabilities]string{
	CapSource:          "source",
	CapDestination:     "destination",
	CapIncremental:     "incremental",
	CapSparse:          "sparse",
	CapResume:          "resume",
	CapVerify:          "verify",
	CapContinuous:      "continuous",
	CapL2Stretch:       "l2_stretch",
	CapKeepAddress:     "keep_address",
	CapHookActivation:  "hook_activation",
	CapUserspaceTunnel: "userspace_tunnel",
}

// Has reports whether every flag of f is set.
func (c Capabilities) Has(f Capabilities) bool { return c&f == f }

// Names lists the set flags by name; unknown bits (from a newer backend)
// are named "bitN".
func (c Capabilities) Names() []string {
	out := []string{}
	for c != 0 {
		b := Capabilities(1) << bits.TrailingZeros64(uint64(c))
		c &^= b
		if n, ok := capNames[b]; ok {
			out = append(out, n)
		} else {
			out = append(out, fmt.Sprintf("bit%d", bits.TrailingZeros64(uint64(b))))
		}
	}
	sort.Strings(out)
	return out
}

// String implements fmt.Stringer.
func (c Capabilities) String() string { return strings.Join(c.Names(), ",") }

// ParseCapability returns the flag with the given name.
func ParseCapability(name string) (Capabilities, error) {
	for f, n := range capNames {
		if n == name {
			return f, nil
		}
	}
	return 0, fmt.Errorf("capability %q: %w", name, ErrInvalidArgument)
}

// Info describes a backend. It is returned by Info, which must be cheap
// and may be called before Configure.
type Info struct {
	Kind         Kind
	Name         string // the <name> of wanmotion-<kind>-<name>
	Version      string // the backend's own version (free form, e.g. semver)
	Description  string // one line
	APIVersions  []string
	Capabilities Capabilities
}

// ConfigureRequest is sent once after launch, before any other call but Info.
type ConfigureRequest struct {
	// APIVersion is the version the host chose (one of Info.APIVersions).
	APIVersion string
	// Config is the msgpack encoding of the backend's own config (from the
	// pool's wanmotion:config and CLI flags); empty means defaults.
	Config []byte
	// StateDir is a directory the backend owns for this host; it survives
	// restarts of the backend and the agent (e.g. applied-block records).
	StateDir string
}

// ConfigureResponse is the reply to Configure.
type ConfigureResponse struct {
	// Warnings are shown to the user (e.g. deprecated config keys).
	Warnings []string
}

// Secret is a string that must not be logged. Its String and GoString
// methods print a placeholder; read it with string(s).
type Secret string

// String implements fmt.Stringer without revealing the value.
func (s Secret) String() string {
	if s == "" {
		return ""
	}
	return "[redacted]"
}

// GoString implements fmt.GoStringer without revealing the value.
func (s Secret) GoString() string { return s.String() }

// Endpoint is an opaque description of where and how to reach a peer.
// Backends fill it on one site; the engine carries it to the other site,
// rewriting Address to the local end of the WAN gateway channel.
type Endpoint struct {
	Network string // "tcp" or "unix"
	Address string // host:port or socket path
	Token   Secret // credential for the channel or the peer, if any
	Params  []byte // backend-private parameters (msgpack), e.g. export name, TLS pin
}

// XAPIAccess lets a backend call xapi on its own site.
type XAPIAccess struct {
	URL      string // e.g. https://pool-master or a unix socket URL in dom0
	Session  Secret // an existing session ref; backends never log it out
	HostUUID string // the host the backend runs on
	// TLSPin is the PEM certificate of the pool master, if pinned.
	TLSPin string
}

// State is backend-private state the engine checkpoints without
// interpreting it, with a version so a newer backend can upgrade it.
type State struct {
	Version int
	Data    []byte // msgpack, owned by the backend
}

// Handle names one unit of work (one disk, or one VM's network) in a backend.
type Handle struct {
	ID          string // unique within the backend; stable across Recover
	MigrationID string
	Role        Role
	State       State
}

// EncodeOpaque encodes a backend config or state with msgpack, using
// struct field names (never positional arrays) so fields can be added.
func EncodeOpaque(v any) ([]byte, error) {
	b, err := msgpack.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode msgpack: %w", err)
	}
	return b, nil
}

// DecodeOpaque decodes msgpack bytes written by EncodeOpaque. Empty input
// leaves v untouched (defaults). Bad input gives ErrInvalidArgument.
func DecodeOpaque(b []byte, v any) error {
	if len(b) == 0 {
		return nil
	}
	if err := msgpack.Unmarshal(b, v); err != nil {
		return fmt.Errorf("decode msgpack: %v: %w", err, ErrInvalidArgument)
	}
	return nil
}
