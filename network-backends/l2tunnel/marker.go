package l2tunnel

import (
	"net/url"
	"strings"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Marker is what the backend writes on every tunnel it creates, so that a
// tunnel found later on a host can be told apart from other migrations'
// tunnels and from kept ones: in kernel mode the interface alias
// (`ip link show` prints it), in OVS mode the interface's external_ids.
type Marker struct {
	MigrationID string
	Role        contract.Role
	VMUUID      string
	// Kept is set by Cleanup when the tunnel outlives its migration
	// (keep_after_migration). Only the remove command, or a Prepare of
	// the same migration, changes a kept tunnel.
	Kept bool
}

// aliasTag starts the alias of every kernel tunnel interface of ours.
const aliasTag = "wanmotion-l2tunnel"

// maxAlias is the longest interface alias Linux keeps (IFALIASZ - 1).
const maxAlias = 255

func (m Marker) state() string {
	if m.Kept {
		return "kept"
	}
	return "active"
}

// Alias is the kernel interface alias of m, e.g.
// "wanmotion-l2tunnel kept migration=wm-0a1b2c3d4e5f role=source vm=…".
// Values are URL-query-escaped (ids of the engine need no escaping). A
// part that does not fit 255 characters is left out.
func (m Marker) Alias() string {
	s := aliasTag + " " + m.state()
	for _, kv := range [][2]string{{"migration", m.MigrationID}, {"role", string(m.Role)}, {"vm", m.VMUUID}} {
		if kv[1] == "" {
			continue
		}
		part := " " + kv[0] + "=" + url.QueryEscape(kv[1])
		if len(s)+len(part) <= maxAlias {
			s += part
		}
	}
	return s
}

// ParseAlias reads a marker from a kernel interface alias; ok is false
// when the alias is not one of ours.
func ParseAlias(alias string) (m Marker, ok bool) {
	f := strings.Fields(alias)
	if len(f) < 2 || f[0] != aliasTag {
		return m, false
	}
	switch f[1] {
	case "kept":
		m.Kept = true
	case "active":
	default:
		return m, false
	}
	for _, kv := range f[2:] {
		k, v, found := strings.Cut(kv, "=")
		if !found {
			continue
		}
		if u, err := url.QueryUnescape(v); err == nil {
			v = u
		}
		switch k {
		case "migration":
			m.MigrationID = v
		case "role":
			m.Role = contract.Role(v)
		case "vm":
			m.VMUUID = v
		}
	}
	return m, true
}

// OVS external_ids keys of the marker (besides wanmotion=l2tunnel).
const (
	ovsKeyMigration = "wanmotion-migration"
	ovsKeyRole      = "wanmotion-role"
	ovsKeyVM        = "wanmotion-vm"
	ovsKeyState     = "wanmotion-state"
)

// ovsIDs are the external_ids settings of m, as ovs-vsctl arguments.
func (m Marker) ovsIDs() []string {
	out := []string{"external_ids:" + ovsKeyState + "=" + m.state()}
	for _, kv := range [][2]string{{ovsKeyMigration, m.MigrationID}, {ovsKeyRole, string(m.Role)}, {ovsKeyVM, m.VMUUID}} {
		if kv[1] != "" {
			out = append(out, "external_ids:"+kv[0]+"="+ovsString(kv[1]))
		}
	}
	return out
}

// markerFromOVS reads a marker from an interface's external_ids.
func markerFromOVS(ids map[string]string) (m Marker, ok bool) {
	st, has := ids[ovsKeyState]
	if !has && ids["wanmotion"] != "l2tunnel" {
		return m, false
	}
	return Marker{MigrationID: ids[ovsKeyMigration], Role: contract.Role(ids[ovsKeyRole]), VMUUID: ids[ovsKeyVM], Kept: st == "kept"}, true
}

// ovsString quotes a value for ovs-vsctl when it is not a plain word.
func ovsString(s string) string {
	plain := s != ""
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.') {
			plain = false
			break
		}
	}
	if plain {
		return s
	}
	return `"` + strings.NewReplacer(`\`, `\\`, `"`, `\"`).Replace(s) + `"`
}

// FoundTunnel is a tunnel of this backend found on a host (List, Remove).
type FoundTunnel struct {
	Name string
	// Marker is the tunnel's marker; Marked is false for a tunnel made
	// by a version that wrote none (known then by its name only).
	Marker Marker
	Marked bool
	Bridge string // kernel mode: the bridge it is attached to
	VNI    int
	Remote string
}

// foreign reports whether a sweep for migration mig must leave t alone:
// a kept tunnel (only the remove command deletes it), or one whose marker
// names another migration (two migration ids whose hashes give the same
// name prefix).
func (t FoundTunnel) foreign(mig string) bool {
	if !t.Marked {
		return false
	}
	return t.Marker.Kept || (t.Marker.MigrationID != "" && t.Marker.MigrationID != mig)
}
