// Command wanmotion-network-noop is the example network backend of
// docs/vendor-guide.md: it checks its input, keeps the lifecycle
// (prepare, activate, release, recover, cleanup) and changes nothing on
// the network. Built and tested with the module, not shipped.
package main

import "github.com/wanmotion/wanmotion/plugins/sdk"

func main() {
	sdk.ServeNetwork(New(sdk.Logger("noop")))
}
