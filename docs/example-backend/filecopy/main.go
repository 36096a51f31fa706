// Command wanmotion-storage-filecopy is the example storage backend of
// docs/vendor-guide.md. It is built and tested with the rest of the module
// but is not shipped as a strategy.
//
// It copies snapshot image files (<source_dir>/<snapshot uuid>.img on the
// source site) into replica files in its state directory on the destination
// site, over one TCP connection per round, skipping zero blocks and copying
// only changed blocks in incremental rounds.
package main

import "github.com/wanmotion/wanmotion/plugins/sdk"

func main() {
	sdk.ServeStorage(New(sdk.Logger("filecopy")))
}
