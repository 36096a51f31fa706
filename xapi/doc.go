// Package xapi is wanmotion's hand-written XenAPI (xapi) XML-RPC client: a
// typed subset of the pool, host, VM, VBD, VDI, SR, VIF, network, PIF, task
// and event classes, plus raw VDI import/export over HTTP.
//
// Usage:
//
//	c, err := xapi.New(xapi.Config{
//		URL:      "https://pool-coordinator",
//		Username: "root", Password: pw,
//		TLS:      xapi.TLSOptions{Thumbprints: []string{"AB:CD:..."}},
//		Logger:   logger,
//	})
//	if err != nil { ... }
//	if err := c.Login(ctx); err != nil { ... }
//	defer c.Close(ctx)
//	vms, err := c.VMGetAllRecords(ctx)
//	task, err := c.AsyncVDISnapshot(ctx, vdi, nil)
//	res, err := c.WaitTask(ctx, task)
//	var snap xapi.VDIRef
//	err = res.Decode(&snap)
//
// Wire handling. Every call builds its request with kolo/xmlrpc's NewRequest,
// sends it with this package's own http.Client under the caller's context,
// rewrites xapi's untyped values with wire.Normalise (kolo silently drops
// record members after an empty <value></value> otherwise), decodes the
// Status/Value/ErrorDescription envelope and converts the value into typed
// records: xapi ints (decimal strings on the wire) become exact int64s, dates
// are parsed tolerantly, unknown enum values become "unrecognized". Ints are
// sent as decimal strings and <params> is always present.
//
// Errors. A Failure becomes *APIError{Method, Code, Params}; test it with
// errors.Is(err, xapi.ErrSessionInvalid), IsCode(err, xapi.CodeVMBadPowerState)
// or AsAPIError. Network failures are *TransportError; malformed responses
// wrap ErrProtocol.
//
// Retries. Each call is retried at most once: after SESSION_INVALID (log in
// again), after HOST_IS_SLAVE (log in to the named coordinator, same scheme
// and port), and after a transport error, once another pool member (learned
// from host.get_all_records after login) accepted a login — the call is
// repeated only when the request surely did not reach xapi (a dial error) or
// it is read-only (get_*, event.from).
//
// Concurrency. A Client is safe for concurrent use and calls do not wait for
// each other; event.from long-polls (EventFrom, WaitTask) use a separate HTTP
// transport and raw VDI transfers a third one.
//
// TLS. Certificates are verified by default (system roots); TLSOptions can
// trust a CA file or pin SHA-256 thumbprints; Insecure must be asked for.
// Plain http:// URLs are accepted (the simulator serves http on loopback).
package xapi
