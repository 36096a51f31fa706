// Package sdk is what a backend's main calls. A storage backend is
//
//	func main() {
//		logger := sdk.Logger("mybackend")
//		sdk.ServeStorage(mybackend.New(logger))
//	}
//
// Serve* hand the process over to go-plugin: stdout carries the handshake
// line and must never be written to; logs go to stderr as hclog JSON, and
// the host relays them into its own log under the binary's name. Run by
// hand (without the host), the binary prints a short notice and exits 1.
package sdk

import (
	"context"
	"os"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// Logger returns the logger a backend should use: JSON on stderr at Trace
// level (the host filters), named after the backend.
func Logger(name string) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{
		Name:       name,
		Level:      hclog.Trace,
		Output:     os.Stderr,
		JSONFormat: true,
	})
}

// ServeStorage serves a storage backend until the host goes away. It does
// not return when something fails: go-plugin exits the process.
func ServeStorage(impl contract.Storage) {
	plugin.Serve(StorageServeConfig(context.Background(), impl))
	afterServe()
}

// ServeNetwork serves a network backend until the host goes away.
func ServeNetwork(impl contract.Network) {
	plugin.Serve(NetworkServeConfig(context.Background(), impl))
	afterServe()
}

// afterServe gives go-plugin's reply to the host's Control.Quit time to
// reach the host before main returns; otherwise the host sees EOF, logs
// that the backend "failed to exit gracefully" and kills it.
func afterServe() { time.Sleep(100 * time.Millisecond) }

// StorageServeConfig is the go-plugin ServeConfig ServeStorage uses; ctx
// is the parent of every call's ctx. Exposed for tests that serve in
// process (ServeConfig.Test).
func StorageServeConfig(ctx context.Context, impl contract.Storage) *plugin.ServeConfig {
	return &plugin.ServeConfig{
		HandshakeConfig:  contract.Handshake,
		VersionedPlugins: contract.StoragePluginSets(ctx, impl),
		Logger:           Logger("go-plugin"),
	}
}

// NetworkServeConfig is the go-plugin ServeConfig ServeNetwork uses.
func NetworkServeConfig(ctx context.Context, impl contract.Network) *plugin.ServeConfig {
	return &plugin.ServeConfig{
		HandshakeConfig:  contract.Handshake,
		VersionedPlugins: contract.NetworkPluginSets(ctx, impl),
		Logger:           Logger("go-plugin"),
	}
}
