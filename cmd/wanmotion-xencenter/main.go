// Command wanmotion-xencenter is the XenCenter menu item of wanmotion for
// Windows, where XenCenter runs (the full wanmotion binary is Linux-only).
// XenCenter runs it as
//
//	wanmotion-xencenter.exe xencenter <url> <session> VM <uuid>
//
// (packaging/xencenter/WanMotion/WanMotion.xcplugin.xml); it does what
// `wanmotion xencenter` does. Build: GOOS=windows go build ./cmd/wanmotion-xencenter
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"

	"github.com/wanmotion/wanmotion/xencenter"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := xencenter.Command(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintf(os.Stderr, "wanmotion xencenter: %v\n", err)
		fmt.Fprintln(os.Stderr, "Press Enter to close.")
		_, _ = fmt.Fscanln(os.Stdin)
		if errors.Is(err, xencenter.ErrUsage) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}
