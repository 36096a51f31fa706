package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/conformance"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == "wanmotion-network-noop" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func newVM(_ *testing.T, i int) *conformance.VM {
	return &conformance.VM{Prepare: func(role contract.Role, peer contract.Endpoint) contract.NetPrepareRequest {
		return contract.NetPrepareRequest{MigrationID: fmt.Sprintf("mig-%d", i), Role: role, VMUUID: fmt.Sprintf("vm-%d", i),
			Peer: peer, VIFs: []contract.VIFInfo{{Device: "0", MAC: "02:00:00:00:00:01", IPv4: []string{"192.0.2.10"}}}}
	}}
}

func TestConformanceInProcessRPC(t *testing.T) {
	conformance.RunNetworkSuite(t, func(t *testing.T) conformance.NetworkSetup {
		return conformance.NetworkSetup{
			Source:      conformance.NetworkOverRPC(t, New(testutil.Logger(t))),
			Destination: conformance.NetworkOverRPC(t, New(testutil.Logger(t))),
			NewVM:       newVM,
			Restart: func(t *testing.T) (contract.Network, contract.Network) {
				return conformance.NetworkOverRPC(t, New(testutil.Logger(t))), conformance.NetworkOverRPC(t, New(testutil.Logger(t)))
			},
		}
	})
}

func TestConformanceSubprocess(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.Symlink(exe, filepath.Join(dir, "wanmotion-network-noop")))
	h := host.New([]string{dir}, host.Options{Logger: testutil.Logger(t), StartTimeout: 30 * time.Second,
		Env: []string{"GORACE=atexit_sleep_ms=0"}})
	launch := func(t *testing.T) *host.Instance {
		inst, err := h.LaunchNetwork(context.Background(), "noop", nil, t.TempDir())
		require.NoError(t, err)
		t.Cleanup(inst.Close)
		return inst
	}
	conformance.RunNetworkSuite(t, func(t *testing.T) conformance.NetworkSetup {
		src, dst := launch(t), launch(t)
		return conformance.NetworkSetup{
			Source: src.Network(), Destination: dst.Network(), NewVM: newVM,
			Restart: func(t *testing.T) (contract.Network, contract.Network) {
				src.Close()
				dst.Close()
				return launch(t).Network(), launch(t).Network()
			},
		}
	})
}
