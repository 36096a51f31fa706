// Package conformance holds the suites every backend must pass, and
// harnesses that run a backend in-process through the real net/rpc glue.
//
// A backend's test runs each suite at least twice: against its
// implementation through StorageOverRPC / NetworkOverRPC (in-process, over
// go-plugin's TestPluginRPCConn) and through a real subprocess launched by
// package host. See docs/vendor-guide.md and docs/example-backend/.
package conformance

import (
	"testing"

	"github.com/hashicorp/go-plugin"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// StorageOverRPC serves impl in-process and returns the host-side stub,
// so every call crosses the real net/rpc glue (gob, error envelope,
// Cancel). It is closed when the test ends.
func StorageOverRPC(t testing.TB, impl contract.Storage) contract.Storage {
	t.Helper()
	client, _ := plugin.TestPluginRPCConn(t, map[string]plugin.Plugin{
		string(contract.KindStorage): &contract.StoragePlugin{Impl: impl},
	}, nil)
	t.Cleanup(func() { _ = client.Close() })
	raw, err := client.Dispense(string(contract.KindStorage))
	require.NoError(t, err)
	s, ok := raw.(contract.Storage)
	require.True(t, ok, "dispensed %T", raw)
	return s
}

// NetworkOverRPC serves impl in-process and returns the host-side stub.
func NetworkOverRPC(t testing.TB, impl contract.Network) contract.Network {
	t.Helper()
	client, _ := plugin.TestPluginRPCConn(t, map[string]plugin.Plugin{
		string(contract.KindNetwork): &contract.NetworkPlugin{Impl: impl},
	}, nil)
	t.Cleanup(func() { _ = client.Close() })
	raw, err := client.Dispense(string(contract.KindNetwork))
	require.NoError(t, err)
	n, ok := raw.(contract.Network)
	require.True(t, ok, "dispensed %T", raw)
	return n
}
