package sdk_test

import (
	"context"
	"testing"
	"time"

	"github.com/hashicorp/go-plugin"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/sdk"
)

type storage struct{ contract.UnimplementedStorage }

func (storage) Info(context.Context) (contract.Info, error) {
	return contract.Info{Kind: contract.KindStorage, Name: "t", APIVersions: []string{contract.APIVersion}}, nil
}

type network struct{ contract.UnimplementedNetwork }

func (network) Info(context.Context) (contract.Info, error) {
	return contract.Info{Kind: contract.KindNetwork, Name: "t", APIVersions: []string{contract.APIVersion}}, nil
}

// serve runs a ServeConfig in go-plugin's test mode and connects a host
// client to it the way package host does (net/rpc only, our handshake).
func serve(t *testing.T, cfg *plugin.ServeConfig, kind contract.Kind) any {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	reattach := make(chan *plugin.ReattachConfig, 1)
	closed := make(chan struct{})
	cfg.Test = &plugin.ServeTestConfig{Context: ctx, ReattachConfigCh: reattach, CloseCh: closed}
	go plugin.Serve(cfg)
	var rc *plugin.ReattachConfig
	select {
	case rc = <-reattach:
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not start")
	}
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  contract.Handshake,
		Plugins:          contract.HostPluginSets([]int{rc.ProtocolVersion})[rc.ProtocolVersion], // reattach uses Plugins
		Reattach:         rc,
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolNetRPC},
		Logger:           testutil.Logger(t),
	})
	t.Cleanup(func() {
		client.Kill()
		cancel()
		<-closed
	})
	rpc, err := client.Client()
	require.NoError(t, err)
	raw, err := rpc.Dispense(string(kind))
	require.NoError(t, err)
	return raw
}

func TestServeStorageConfig(t *testing.T) {
	cfg := sdk.StorageServeConfig(context.Background(), storage{})
	assert.Equal(t, contract.Handshake, cfg.HandshakeConfig)
	for _, v := range contract.ServedProtocolVersions {
		assert.Contains(t, cfg.VersionedPlugins, v)
	}
	s := serve(t, cfg, contract.KindStorage).(contract.Storage)
	info, err := s.Info(context.Background())
	require.NoError(t, err)
	assert.Equal(t, contract.KindStorage, info.Kind)
	_, err = s.Cleanup(context.Background(), contract.CleanupRequest{})
	assert.ErrorIs(t, err, contract.ErrUnsupported)
}

func TestServeNetworkConfig(t *testing.T) {
	n := serve(t, sdk.NetworkServeConfig(context.Background(), network{}), contract.KindNetwork).(contract.Network)
	info, err := n.Info(context.Background())
	require.NoError(t, err)
	assert.Equal(t, contract.KindNetwork, info.Kind)
}

func TestLoggerIsJSONOnStderr(t *testing.T) {
	l := sdk.Logger("x")
	assert.True(t, l.IsTrace(), "backends log everything; the host filters")
	assert.Equal(t, "x", l.Name())
}
