// Command wanmotion-storage-nbd is the storage strategy "nbd": it seeds a
// destination replica from CBT snapshots over NBD (docs/storage-nbd.md).
// It is started by the site agent (go-plugin), never by hand.
package main

import (
	"github.com/wanmotion/wanmotion/plugins/sdk"
	nbdstore "github.com/wanmotion/wanmotion/storage-backends/nbd"
)

func main() {
	sdk.ServeStorage(nbdstore.New(sdk.Logger(nbdstore.Name)))
}
