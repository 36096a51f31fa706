// Command wanmotion-network-l2tunnel is the network strategy "l2tunnel":
// it stretches a migrating VM's L2 segments to the destination site over
// VXLAN and announces the VM there after the move
// (docs/network-l2tunnel.md). It is started by the site agent
// (go-plugin), never by hand.
package main

import (
	"github.com/wanmotion/wanmotion/network-backends/l2tunnel"
	"github.com/wanmotion/wanmotion/plugins/sdk"
)

func main() {
	sdk.ServeNetwork(l2tunnel.New(sdk.Logger(l2tunnel.Name)))
}
