// Package contract is the versioned contract between wanmotion (the host: the
// site agent and the CLI) and its backends (storage and network strategies),
// which run as hashicorp/go-plugin subprocesses over net/rpc.
//
// Both sides import this package: it holds the Storage and Network
// interfaces, one request and one response struct per method, the Info
// record with capability flags, the handshake, the protocol and API
// versions, the wire error envelope and the net/rpc glue (client stubs and
// server adapters). Backends do not use the glue directly: they call
// sdk.ServeStorage or sdk.ServeNetwork. The host launches them through
// package host.
//
// Rules every method follows:
//   - ctx is first. Its deadline travels in the request; cancelling it on
//     the host sends a Cancel RPC that cancels the server-side ctx of that
//     call, and the call returns an error matching ErrCancelled (and
//     context.Canceled or context.DeadlineExceeded).
//   - Errors cross the boundary as a WireError{Code, Message}; on the host
//     errors.Is(err, ErrNotFound) and friends work as they do in-process.
//     A backend that dies turns every pending and later call into an error
//     matching ErrPluginExited.
//   - Bulk data never crosses go-plugin RPC. Backends move disk blocks and
//     packets over the WAN gateway channel named in Endpoint values.
//   - Opaque payloads (backend config, backend-private state the engine
//     checkpoints) are msgpack bytes; see EncodeOpaque and DecodeOpaque.
//
// The method table, error codes and the versioning policy are written down
// in docs/plugin-protocol.md.
package contract
