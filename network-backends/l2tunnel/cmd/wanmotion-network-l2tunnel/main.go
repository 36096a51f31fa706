// Command wanmotion-network-l2tunnel is the network strategy "l2tunnel":
// it stretches a migrating VM's L2 segments to the destination site over
// VXLAN and announces the VM there after the move
// (docs/network-l2tunnel.md). Without arguments it serves the site agent
// (go-plugin) and is never started by hand; "list" and "remove" are
// admin commands for tunnels kept after a migration
// (keep_after_migration), run in dom0 on each site.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/wanmotion/wanmotion/network-backends/l2tunnel"
	"github.com/wanmotion/wanmotion/plugins/sdk"
)

func main() {
	if len(os.Args) > 1 {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		code := l2tunnel.RunCLI(ctx, os.Args[1:], os.Stdout, os.Stderr)
		stop()
		os.Exit(code)
	}
	sdk.ServeNetwork(l2tunnel.New(sdk.Logger(l2tunnel.Name)))
}
