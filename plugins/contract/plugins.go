package contract

import (
	"context"

	"github.com/hashicorp/go-plugin"
)

// StoragePluginSets is what a storage backend serves: the same adapter
// under every wire version in ServedProtocolVersions.
func StoragePluginSets(ctx context.Context, impl Storage) map[int]plugin.PluginSet {
	out := map[int]plugin.PluginSet{}
	for _, v := range ServedProtocolVersions {
		out[v] = plugin.PluginSet{string(KindStorage): &StoragePlugin{Impl: impl, BaseContext: ctx}}
	}
	return out
}

// NetworkPluginSets is what a network backend serves.
func NetworkPluginSets(ctx context.Context, impl Network) map[int]plugin.PluginSet {
	out := map[int]plugin.PluginSet{}
	for _, v := range ServedProtocolVersions {
		out[v] = plugin.PluginSet{string(KindNetwork): &NetworkPlugin{Impl: impl, BaseContext: ctx}}
	}
	return out
}

// HostPluginSets is what the host offers: both kinds under every accepted
// wire version. It dispenses by kind.
func HostPluginSets(accepted []int) map[int]plugin.PluginSet {
	out := map[int]plugin.PluginSet{}
	for _, v := range accepted {
		out[v] = plugin.PluginSet{
			string(KindStorage): &StoragePlugin{},
			string(KindNetwork): &NetworkPlugin{},
		}
	}
	return out
}
