package l2tunnel

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/conformance"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

// conformanceVM is a VM scenario on a lab: one VIF on br0 of each site.
func conformanceVM(l *lab) func(t *testing.T, i int) *conformance.VM {
	return func(t *testing.T, i int) *conformance.VM {
		mig := fmt.Sprintf("conf-%s-%d", l.id, i)
		mac := fmt.Sprintf("02:00:5e:01:00:%02x", i)
		return &conformance.VM{
			Prepare: func(role contract.Role, peer contract.Endpoint) contract.NetPrepareRequest {
				return contract.NetPrepareRequest{MigrationID: mig, Role: role, VMUUID: fmt.Sprintf("vm-%d", i), VMName: "conf",
					VIFs: []contract.VIFInfo{{Device: "0", MAC: mac, NetworkUUID: "net-a", DestNetworkUUID: "net-b", Bridge: "br0",
						IPv4: []string{fmt.Sprintf("192.168.78.%d", 10+i)}}},
					Peer: peer}
			},
			CheckActive: func(t *testing.T) {
				hb := handleIn(t, l.siteB)
				vx := vxlans(t, hb)[IfName(mig, contract.RoleDestination, "0")]
				require.NotNil(t, vx, "destination tunnel")
				assert.Equal(t, DeriveVNI(mig, "0", DefaultVNIBase, DefaultVNICount), vx.VxlanId)
			},
		}
	}
}

func TestConformanceInProcess(t *testing.T) {
	conformance.RunNetworkSuite(t, func(t *testing.T) conformance.NetworkSetup {
		l := newLab(t)
		src, dst := siteBackend(t, l.siteA, l.ulA, nil), siteBackend(t, l.siteB, l.ulB, nil)
		return conformance.NetworkSetup{Source: src, Destination: dst, NewVM: conformanceVM(l),
			Restart: func(t *testing.T) (contract.Network, contract.Network) {
				src.Close()
				dst.Close()
				return siteBackend(t, l.siteA, l.ulA, nil), siteBackend(t, l.siteB, l.ulB, nil)
			}}
	})
}

func TestConformanceInProcessRPC(t *testing.T) {
	conformance.RunNetworkSuite(t, func(t *testing.T) conformance.NetworkSetup {
		l := newLab(t)
		src, dst := siteBackend(t, l.siteA, l.ulA, nil), siteBackend(t, l.siteB, l.ulB, nil)
		return conformance.NetworkSetup{Source: conformance.NetworkOverRPC(t, src), Destination: conformance.NetworkOverRPC(t, dst),
			NewVM: conformanceVM(l)}
	})
}

func TestConformanceSubprocess(t *testing.T) {
	requireLab(t)
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.Symlink(exe, filepath.Join(dir, "wanmotion-network-"+Name)))
	h := host.New([]string{dir}, host.Options{Logger: testutil.Logger(t), StartTimeout: 30 * time.Second,
		Env: []string{"GORACE=atexit_sleep_ms=0"}})
	launch := func(t *testing.T, ns, underlay string) contract.Network {
		cfg, err := contract.ConfigFromJSON([]byte(fmt.Sprintf(`{"netns": %q, "underlay_address": %q, "announce_interval_ms": 10}`, ns, underlay)))
		require.NoError(t, err)
		inst, err := h.LaunchNetwork(context.Background(), Name, cfg, t.TempDir())
		require.NoError(t, err)
		t.Cleanup(inst.Close)
		return inst.Network()
	}
	conformance.RunNetworkSuite(t, func(t *testing.T) conformance.NetworkSetup {
		l := newLab(t)
		return conformance.NetworkSetup{Source: launch(t, l.siteA, l.ulA), Destination: launch(t, l.siteB, l.ulB),
			NewVM: conformanceVM(l),
			Restart: func(t *testing.T) (contract.Network, contract.Network) {
				return launch(t, l.siteA, l.ulA), launch(t, l.siteB, l.ulB)
			}}
	})
}

func TestConformanceTAP(t *testing.T) {
	tap := map[string]any{"mode": ModeTAP}
	conformance.RunNetworkSuite(t, func(t *testing.T) conformance.NetworkSetup {
		l := newLab(t)
		src, dst := siteBackend(t, l.siteA, l.ulA, tap), siteBackend(t, l.siteB, l.ulB, tap)
		vm := conformanceVM(l)
		return conformance.NetworkSetup{Source: conformance.NetworkOverRPC(t, src), Destination: conformance.NetworkOverRPC(t, dst),
			NewVM: func(t *testing.T, i int) *conformance.VM {
				v := vm(t, i)
				v.CheckActive = nil // checks for a vxlan
				return v
			},
			Restart: func(t *testing.T) (contract.Network, contract.Network) {
				src.Close()
				dst.Close()
				return siteBackend(t, l.siteA, l.ulA, tap), siteBackend(t, l.siteB, l.ulB, tap)
			}}
	})
}
