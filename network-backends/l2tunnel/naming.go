package l2tunnel

import (
	"fmt"
	"hash/fnv"
	"regexp"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

var deviceRe = regexp.MustCompile(`^[0-9]{1,4}$`)

func hash32(parts ...string) uint32 {
	h := fnv.New32a()
	for i, p := range parts {
		if i > 0 {
			_, _ = h.Write([]byte{0})
		}
		_, _ = h.Write([]byte(p))
	}
	return h.Sum32()
}

// IfPrefix is the prefix of every tunnel interface of a migration on one
// site: "wm", 7 hex digits of a hash of the migration id and "s" (source)
// or "d" (destination). Cleanup after a crash removes interfaces by it.
func IfPrefix(migrationID string, role contract.Role) string {
	r := byte('s')
	if role == contract.RoleDestination {
		r = 'd'
	}
	return fmt.Sprintf("wm%07x%c", hash32(migrationID)&0xfffffff, r)
}

// IfName is the tunnel interface (or OVS port) name of one VIF of a
// migration: IfPrefix + "v" + the VIF device number (up to 4 digits), or
// + "x" + 4 hex digits of a hash of any other device string. It is at most
// 15 characters, the Linux limit.
func IfName(migrationID string, role contract.Role, device string) string {
	if deviceRe.MatchString(device) {
		return IfPrefix(migrationID, role) + "v" + device
	}
	return fmt.Sprintf("%sx%04x", IfPrefix(migrationID, role), hash32(device)&0xffff)
}

// DeriveVNI is the VNI of one VIF of a migration: base + a hash of
// (migration id, device) modulo count. Both sites derive the same value;
// the destination's choice is also sent to the source in its endpoint.
func DeriveVNI(migrationID, device string, base, count int) int {
	if count < 1 {
		count = 1
	}
	return base + int(hash32(migrationID, device)%uint32(count))
}
