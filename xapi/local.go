package xapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strings"
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
	c.socket = socketPath
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

// socketScheme prefixes the address of a unix socket ("unix:///var/lib/xcp/xapi").
const socketScheme = "unix://"

// SocketURL is the address form of a local socket that NewFromURL opens:
// "unix://" followed by the absolute path.
func SocketURL(socketPath string) string { return socketScheme + socketPath }

// SocketPath returns the socket an address names: "unix://<absolute path>",
// or XenAPI.py's "http://_var_lib_xcp_xapi/" (LocalSocket). ok is false for
// any other address (an http or https URL).
func SocketPath(addr string) (path string, ok bool, err error) {
	if strings.TrimRight(addr, "/") == strings.TrimRight(localURL, "/") {
		return LocalSocket, true, nil
	}
	p, found := strings.CutPrefix(addr, socketScheme)
	if !found {
		return "", false, nil
	}
	if p == "" || !filepath.IsAbs(p) || filepath.Clean(p) != p {
		return "", true, fmt.Errorf("xapi: socket address %q: want unix:// and an absolute path", addr)
	}
	return p, true, nil
}

// Socket is the unix socket of a client built by NewLocal ("" otherwise).
func (c *Client) Socket() string { return c.socket }

// NewFromURL builds a client for cfg.URL: an http(s) URL (New) or a local
// socket address (SocketPath; NewLocal, which ignores cfg.TLS).
func NewFromURL(cfg Config) (*Client, error) {
	path, isSocket, err := SocketPath(cfg.URL)
	if err != nil {
		return nil, err
	}
	if isSocket {
		return NewLocal(path, cfg)
	}
	return New(cfg)
}
