package l2tunnel

import (
	"testing"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Decoders of outside input: the config and options (from the pool and
// the CLI), the checkpointed state and the registration line (from the
// network, through the WAN gateway). They must never panic.

func FuzzParseConfig(f *testing.F) {
	for _, js := range []string{`{}`, `{"mode":"ovs","port":4789}`, `{"bridges":{"n":"xenbr0"},"underlay_addresses":{"h":"192.0.2.1"}}`, `{"vni_base":16777215}`} {
		b, err := contract.ConfigFromJSON([]byte(js))
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{0xc1})
	f.Fuzz(func(t *testing.T, b []byte) {
		c, _, err := ParseConfig(b)
		if err == nil && (c.Port < 1 || c.Port > 65535 || c.VNIBase < 1 || c.VNIBase+c.VNICount-1 > maxVNI) {
			t.Fatalf("accepted an invalid config: %+v", c)
		}
		_, _ = ParseOptions(b)
	})
}

func FuzzDecodeState(f *testing.F) {
	s, err := encodeState(state{ID: "x", Role: contract.RoleSource, Tunnels: []tunnel{{Device: "0", Name: "wm1234567sv0", VNI: 5}}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(s.Data)
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = decodeState(contract.State{Version: stateVersion, Data: b})
	})
}

func FuzzParseRegistration(f *testing.F) {
	f.Add([]byte(`{"token":"t","migration_id":"m","vm_uuid":"v","underlay":"192.0.2.1"}` + "\n"))
	f.Add([]byte(`{"token":1}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseRegistration(b)
		if err == nil && (r.Token == "" || r.MigrationID == "" || r.VMUUID == "") {
			t.Fatalf("accepted an incomplete registration: %+v", r)
		}
	})
}

// The markers read back from hosts: an interface alias anyone in dom0 can
// set, and ovs-vsctl's JSON.
func FuzzParseAlias(f *testing.F) {
	f.Add(Marker{MigrationID: "wm-0a1b2c3d4e5f", Role: contract.RoleSource, VMUUID: "vm", Kept: true}.Alias())
	f.Add("wanmotion-l2tunnel active migration=%zz role=")
	f.Add("uplink")
	f.Fuzz(func(t *testing.T, a string) {
		m, ok := ParseAlias(a)
		if !ok {
			return
		}
		// What the backend writes back for it reads the same.
		if again, ok := ParseAlias(m.Alias()); ok && len(m.Alias()) < maxAlias-20 && again != m {
			t.Fatalf("alias %q: %+v, rewritten %q: %+v", a, m, m.Alias(), again)
		}
	})
}

func FuzzParseOVSList(f *testing.F) {
	f.Add([]byte(`{"data":[["wm1234567dv0",["map",[["wanmotion","l2tunnel"],["wanmotion-state","kept"]]],["map",[["key","42"],["remote_ip","192.0.2.1"]]]]],"headings":["name","external_ids","options"]}`))
	f.Add([]byte(`{"data":[],"headings":["name","external_ids","options"]}`))
	f.Add([]byte(`{"data":[[1,2,3]],"headings":["name","external_ids","options"]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _ = parseOVSList(b)
	})
}
