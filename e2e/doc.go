// Package e2e holds wanmotion's end-to-end and fault-injection tests. They
// build the real binaries (wanmotion, wanmotion-storage-nbd), run
// `wanmotion sim` and `wanmotion migrate` as child processes, put an
// emulated WAN link (wan/wanemu) between the destination gateway's listen
// and advertised addresses, and inject faults: cancels, link cuts, a killed
// controller, killed site agents. See docs/testing.md.
//
// The package has no code of its own; everything is in its tests.
package e2e
