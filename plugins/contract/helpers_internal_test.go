package contract

import (
	"io"
	"net/rpc"
)

func rpcShutdown() error         { return rpc.ErrShutdown }
func ioEOF() error               { return io.ErrUnexpectedEOF }
func serverError(s string) error { return rpc.ServerError(s) }
