// Package xapiadapt binds the engine's xapi-facing interfaces to the xapi
// client: Pool implements engine.SourcePool, engine.DestPool and
// engine.VDIFinder over one pool's *xapi.Client; Tasks implements
// engine.Tasks and engine.TaskFinder.
//
// xapi errors are mapped onto the engine's sentinels: HANDLE_INVALID and
// UUID_INVALID wrap engine.ErrNotFound, VDI_CBT_ENABLED wraps
// engine.ErrCBTEnabled; the original *xapi.APIError stays in the chain.
//
// The simulator-only measurements (SimPauseMeter, SimIntegrity) live in
// simmeter.go; they read keys and call methods that only xapisim has, and
// report "not measured" / an error on a real xapi.
package xapiadapt
