package contract

import (
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/hashicorp/go-plugin"
)

// ProtocolVersion is the go-plugin (wire) protocol version this build
// speaks: the net/rpc method set and the shapes of the request and response
// structs. Bump it only for incompatible wire changes (a method renamed or
// removed, a field's type changed); additive changes are API minor bumps.
//
// History:
//
//	Version 1: wanmotion 0.1 — net/rpc (gob), services "Storage" and "Network".
const ProtocolVersion = 1

// ServedProtocolVersions are the wire versions the SDK serves, newest first.
// During a wire upgrade it holds N and N-1 so old hosts keep working; see
// docs/plugin-protocol.md.
var ServedProtocolVersions = []int{ProtocolVersion}

// AcceptedProtocolVersions are the wire versions the host accepts.
var AcceptedProtocolVersions = []int{ProtocolVersion}

// Handshake is the go-plugin handshake shared by the host and every
// backend. The cookie only stops a backend from being run by hand by
// mistake; it is not a security feature (checksums are, see package host).
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "WANMOTION_PLUGIN_MAGIC_COOKIE",
	MagicCookieValue: "5f1c0b9e4a7d2e8b3c6f9a0d1e4b7c2a8f5e3d6b9c0a1f4e7d2b5c8a3e6f9d0b",
}

// API versions (major.minor). A backend lists those it implements in
// Info.APIVersions; the host picks the highest one it also supports and
// passes it to Configure. Minor bumps add optional fields, capability
// flags or methods a backend may refuse with ErrUnsupported; major bumps
// change the meaning of existing calls.
const (
	APIVersion10 = "1.0"
	// APIVersion is the newest API version of this build.
	APIVersion = APIVersion10
)

// HostAPIVersions are the API versions this build of the host can drive.
var HostAPIVersions = []string{APIVersion10}

// ParseAPIVersion parses "MAJOR.MINOR" (a leading "v" is accepted).
func ParseAPIVersion(s string) (major, minor int, err error) {
	t := strings.TrimPrefix(s, "v")
	a, b, ok := strings.Cut(t, ".")
	if !ok {
		return 0, 0, fmt.Errorf("api version %q: want MAJOR.MINOR: %w", s, ErrInvalidArgument)
	}
	if major, err = strconv.Atoi(a); err != nil || major < 0 {
		return 0, 0, fmt.Errorf("api version %q: bad major: %w", s, ErrInvalidArgument)
	}
	if minor, err = strconv.Atoi(b); err != nil || minor < 0 {
		return 0, 0, fmt.Errorf("api version %q: bad minor: %w", s, ErrInvalidArgument)
	}
	return major, minor, nil
}

// SelectAPIVersion returns the highest version present in both lists.
// Unparseable entries are ignored. No overlap gives ErrUnsupported naming
// both lists.
func SelectAPIVersion(host, backend []string) (string, error) {
	type v struct {
		s            string
		major, minor int
	}
	have := map[[2]int]bool{}
	for _, s := range host {
		if ma, mi, err := ParseAPIVersion(s); err == nil {
			have[[2]int{ma, mi}] = true
		}
	}
	var common []v
	for _, s := range backend {
		ma, mi, err := ParseAPIVersion(s)
		if err == nil && have[[2]int{ma, mi}] {
			common = append(common, v{s, ma, mi})
		}
	}
	if len(common) == 0 {
		return "", fmt.Errorf("no common api version: host supports %v, backend supports %v: %w", host, backend, ErrUnsupported)
	}
	sort.Slice(common, func(i, j int) bool {
		if common[i].major != common[j].major {
			return common[i].major > common[j].major
		}
		return common[i].minor > common[j].minor
	})
	return fmt.Sprintf("%d.%d", common[0].major, common[0].minor), nil
}

// CheckAPIVersion is what a backend's Configure uses: it returns nil when
// the host's choice is one of the backend's versions, ErrUnsupported otherwise.
func CheckAPIVersion(chosen string, supported []string) error {
	cm, cn, err := ParseAPIVersion(chosen)
	if err != nil {
		return err
	}
	for _, s := range supported {
		if m, n, err := ParseAPIVersion(s); err == nil && m == cm && n == cn {
			return nil
		}
	}
	return fmt.Errorf("api version %s not among %v: %w", chosen, supported, ErrUnsupported)
}
