package xapi

import (
	"context"
	"errors"
	"net"
	"net/http"
	"time"
)

// LocalSocket is xapi's local XML-RPC socket in dom0 (xapi_globs.ml
// unix_domain_socket). Host plugins and hooks reach xapi through it.
const LocalSocket = "/var/lib/xcp/xapi"

// localURL is the URL XenAPI.py's xapi_local() uses for the socket.
const localURL = "http://_var_lib_xcp_xapi/"

// NewLocal builds a client that talks HTTP over the unix socket at
// socketPath (LocalSocket on a host) instead of TCP; cfg.URL and cfg.TLS are
// ignored. On a pool supporter xapi forwards calls to the coordinator
// itself, so the client neither follows HOST_IS_SLAVE to another address nor
// fails over (member discovery is off). Use UseSession to borrow a caller's
// session, or Login (on a real host root logs in over the socket as the
// local superuser).
func NewLocal(socketPath string, cfg Config) (*Client, error) {
	if socketPath == "" {
		return nil, errors.New("xapi: empty socket path")
	}
	cfg.URL = localURL
	cfg.TLS = TLSOptions{}
	cfg.DisableMemberDiscovery = true
	c, err := New(cfg)
	if err != nil {
		return nil, err
	}
	c.rpc = newUnixHTTPClient(socketPath, 8)
	c.events = newUnixHTTPClient(socketPath, 2)
	c.data = newUnixHTTPClient(socketPath, 2)
	return c, nil
}

func newUnixHTTPClient(socketPath string, maxIdle int) *http.Client {
	d := &net.Dialer{Timeout: 15 * time.Second}
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConnsPerHost:   maxIdle,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: 5 * time.Second,
	}
	return &http.Client{Transport: tr}
}
