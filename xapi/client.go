package xapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// DefaultOriginator tags wanmotion's sessions (xapi caps sessions per
// originator, destroying the oldest, so it must be stable and distinct).
const DefaultOriginator = "wanmotion"

// Config configures a Client.
type Config struct {
	// URL of the pool coordinator: "https://host[:port]" or, for the
	// simulator on loopback, "http://127.0.0.1:port". A path is ignored.
	URL        string
	Username   string
	Password   string
	Originator string // default DefaultOriginator
	Version    string // the login API version string, default "1.0" (ignored by xapi)
	TLS        TLSOptions
	Logger     hclog.Logger
	// PollInterval is how often WaitTask polls task.get_record when
	// event.from is not usable. Default 1s.
	PollInterval time.Duration
	// DiscoverMembers learns the pool members' addresses after login
	// (host.get_all_records) for fail-over. Default true; set
	// DisableMemberDiscovery to turn it off.
	DisableMemberDiscovery bool
}

// Client is a XenAPI XML-RPC client for one pool. It is safe for concurrent
// use; calls never wait for each other, and event.from long-polls run on their
// own HTTP transport.
type Client struct {
	cfg    Config
	log    hclog.Logger
	rpc    *http.Client // ordinary calls
	events *http.Client // event.from long-polls
	data   *http.Client // raw VDI import/export
	socket string       // the unix socket of a NewLocal client

	loginMu sync.Mutex // serialises logins; never held by ordinary calls

	mu      sync.RWMutex
	base    *url.URL // current coordinator, path "/"
	session SessionRef
	// borrowed marks a session given to UseSession: the client does not
	// log in to replace it.
	borrowed bool
	gen      uint64 // incremented on every login
	members  []string
	peer     *peerCert // the server certificate of the last TLS handshake
}

// New validates cfg and builds a client. It does no I/O; call Login.
func New(cfg Config) (*Client, error) {
	u, err := url.Parse(cfg.URL)
	if err != nil {
		return nil, fmt.Errorf("xapi: bad URL: %w", err)
	}
	if u.Scheme != "https" && u.Scheme != "http" {
		return nil, fmt.Errorf("xapi: URL scheme must be https or http, got %q", u.Scheme)
	}
	if u.Host == "" {
		return nil, errors.New("xapi: URL has no host")
	}
	u = &url.URL{Scheme: u.Scheme, Host: u.Host, Path: "/"}
	if cfg.Originator == "" {
		cfg.Originator = DefaultOriginator
	}
	if cfg.Version == "" {
		cfg.Version = "1.0"
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	tlsCfg, err := cfg.TLS.config()
	if err != nil {
		return nil, err
	}
	// Only the API calls record the server certificate: they go to the
	// coordinator (c.URL()); data transfers may be redirected to members.
	peer, rpcTLS := new(peerCert), tlsCfg.Clone()
	peer.wrap(rpcTLS)
	return &Client{
		peer:   peer,
		cfg:    cfg,
		log:    cfg.Logger.Named("xapi"),
		rpc:    newHTTPClient(rpcTLS, 8),
		events: newHTTPClient(tlsCfg, 2),
		data:   newHTTPClient(tlsCfg, 2),
		base:   u,
	}, nil
}

// URL returns the coordinator URL the client currently talks to (it changes
// after a HOST_IS_SLAVE redirect or a fail-over).
func (c *Client) URL() string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.base.String()
}

// Members returns the pool member addresses learned after login.
func (c *Client) Members() []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return append([]string(nil), c.members...)
}

// Session returns the current session ref. It is a secret: pass it only to
// things that need it (an NBD export name, a plugin) and never log it.
func (c *Client) Session() SessionRef {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.session
}

// Close logs out (best effort) and releases idle connections.
func (c *Client) Close(ctx context.Context) error {
	err := c.Logout(ctx)
	for _, h := range []*http.Client{c.rpc, c.events, c.data} {
		h.CloseIdleConnections()
	}
	return err
}

func (c *Client) snapshot() (*url.URL, SessionRef, uint64) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.base, c.session, c.gen
}

// Login opens a session with session.login_with_password. On HOST_IS_SLAVE
// it follows the named coordinator (same scheme and port) once.
//
// Calling Login again replaces the session and logs the old one out (best
// effort), so sessions are not leaked (xapi caps them per originator); a
// session given to UseSession is replaced but not logged out.
func (c *Client) Login(ctx context.Context) error {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	base, old, _ := c.snapshot()
	borrowed := c.isBorrowed()
	if err := c.loginLocked(ctx, base); err != nil {
		return err
	}
	if old != "" && !borrowed { // a borrowed session belongs to someone else
		if _, err := roundTrip(ctx, c.rpc, base.String(), "session.logout", []any{old}); err != nil {
			c.log.Debug("logout of the replaced session failed", "error", err)
		}
	}
	return nil
}

// loginLocked logs in at base (following one HOST_IS_SLAVE redirect) and
// installs the new session. Caller holds loginMu.
func (c *Client) loginLocked(ctx context.Context, base *url.URL) error {
	sess, at, err := c.loginAt(ctx, base, true)
	if err != nil {
		return err
	}
	c.mu.Lock()
	c.base, c.session, c.borrowed = at, sess, false
	c.gen++
	c.mu.Unlock()
	c.log.Debug("logged in", "url", at.String(), "originator", c.cfg.Originator)
	if !c.cfg.DisableMemberDiscovery {
		c.discoverMembers(ctx, at, sess)
	}
	return nil
}

func (c *Client) loginAt(ctx context.Context, base *url.URL, follow bool) (SessionRef, *url.URL, error) {
	const method = "session.login_with_password"
	v, err := roundTrip(ctx, c.rpc, base.String(), method,
		[]any{c.cfg.Username, c.cfg.Password, c.cfg.Version, c.cfg.Originator})
	if err != nil {
		var ae *APIError
		if follow && errors.As(err, &ae) && ae.Code == CodeHostIsSlave && ae.Param(0) != "" {
			next := redirectURL(base, ae.Param(0))
			c.log.Info("host is a pool supporter, following the coordinator", "coordinator", next.Host)
			return c.loginAt(ctx, next, false)
		}
		return "", nil, fmt.Errorf("xapi: login at %s: %w", base.Host, err)
	}
	var ref SessionRef
	if err := fromWire(method, v, &ref); err != nil {
		return "", nil, err
	}
	if IsNullRef(string(ref)) {
		return "", nil, protocolErrorf("%s returned a null session", method)
	}
	return ref, base, nil
}

// redirectURL returns base with its host replaced by address, keeping scheme
// and port. address is what HOST_IS_SLAVE and host.address carry: a bare IPv4,
// IPv6 or name (IPv6 literals get brackets). An address that already carries
// a port ("127.0.0.1:4443", "[fd00::1]:443", as a simulator with one port per
// host sends) keeps its own port.
func redirectURL(base *url.URL, address string) *url.URL {
	if h, p, err := net.SplitHostPort(address); err == nil && p != "" {
		return &url.URL{Scheme: base.Scheme, Host: net.JoinHostPort(h, p), Path: "/"}
	}
	address = strings.TrimSuffix(strings.TrimPrefix(address, "["), "]")
	host := address
	if strings.Contains(address, ":") {
		host = "[" + address + "]"
	}
	if p := base.Port(); p != "" {
		host = net.JoinHostPort(address, p)
	}
	return &url.URL{Scheme: base.Scheme, Host: host, Path: "/"}
}

func (c *Client) discoverMembers(ctx context.Context, base *url.URL, sess SessionRef) {
	v, err := roundTrip(ctx, c.rpc, base.String(), "host.get_all_records", []any{sess})
	if err != nil {
		c.log.Debug("pool member discovery failed", "error", err)
		return
	}
	var recs map[HostRef]HostRecord
	if err := fromWire("host.get_all_records", v, &recs); err != nil {
		c.log.Debug("pool member discovery failed", "error", err)
		return
	}
	var addrs []string
	for _, h := range recs {
		if h.Address != "" {
			addrs = append(addrs, h.Address)
		}
	}
	c.mu.Lock()
	c.members = addrs
	c.mu.Unlock()
}

// Logout ends the session (session.logout). It is a no-op when not logged in;
// a session given to UseSession is only dropped, not logged out.
func (c *Client) Logout(ctx context.Context) error {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	base, sess, _ := c.snapshot()
	if sess == "" {
		return nil
	}
	c.mu.Lock()
	borrowed := c.borrowed
	c.session, c.borrowed = "", false
	c.gen++
	c.mu.Unlock()
	if borrowed {
		return nil // someone else's session (UseSession): dropped, never logged out
	}
	_, err := roundTrip(ctx, c.rpc, base.String(), "session.logout", []any{sess})
	if err != nil && !errors.Is(err, ErrSessionInvalid) {
		return fmt.Errorf("xapi: logout: %w", err)
	}
	return nil
}

func (c *Client) isBorrowed() bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.borrowed
}

// relogin replaces the session unless another goroutine already did since
// generation gen was observed.
func (c *Client) relogin(ctx context.Context, gen uint64, base *url.URL) error {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	_, sess, cur := c.snapshot()
	if cur != gen && sess != "" {
		return nil
	}
	return c.loginLocked(ctx, base)
}

// failover tries to log in to the known pool members other than the failed
// coordinator (each following HOST_IS_SLAVE to the new coordinator).
func (c *Client) failover(ctx context.Context, gen uint64, failed *url.URL) error {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	base, sess, cur := c.snapshot()
	if cur != gen && sess != "" && base.Host != failed.Host {
		return nil // someone else already moved on
	}
	c.mu.RLock()
	members := append([]string(nil), c.members...)
	c.mu.RUnlock()
	var errs []error
	for _, m := range members {
		u := redirectURL(failed, m)
		if u.Host == failed.Host {
			continue
		}
		if err := c.loginLocked(ctx, u); err != nil {
			errs = append(errs, err)
			if ctx.Err() != nil {
				break
			}
			continue
		}
		c.log.Warn("coordinator unreachable, moved to another pool member", "from", failed.Host, "to", c.URL())
		return nil
	}
	if len(errs) == 0 {
		return errors.New("xapi: no other pool members known")
	}
	return errors.Join(errs...)
}

// safeToRepeat reports whether method can be sent again after a transport
// error that may have happened after xapi received it.
func safeToRepeat(method string) bool {
	m := strings.TrimPrefix(method, "Async.")
	if i := strings.IndexByte(m, '.'); i >= 0 {
		m = m[i+1:]
	}
	return strings.HasPrefix(m, "get_") || m == "from" || m == "listMethods"
}

// do runs method with the session prepended, handling SESSION_INVALID
// (re-login, retry once), HOST_IS_SLAVE (follow the coordinator, retry once)
// and transport errors (fail over to another member; retry once when the
// request surely did not reach xapi or the call is read-only).
func (c *Client) do(ctx context.Context, hc *http.Client, method string, args ...any) (any, error) {
	base, sess, gen := c.snapshot()
	if sess == "" {
		return nil, fmt.Errorf("xapi: %s: %w", method, ErrNotLoggedIn)
	}
	v, err := roundTrip(ctx, hc, base.String(), method, append([]any{sess}, args...))
	if err == nil {
		return v, nil
	}
	if ctx.Err() != nil {
		return nil, err
	}
	var ae *APIError
	var te *TransportError
	switch {
	case c.isBorrowed():
		// No credentials of our own: the session's owner decides.
		return nil, err
	case errors.As(err, &ae) && ae.Code == CodeSessionInvalid:
		c.log.Debug("session invalid, logging in again", "method", method)
		if lerr := c.relogin(ctx, gen, base); lerr != nil {
			return nil, errors.Join(err, lerr)
		}
	case errors.As(err, &ae) && ae.Code == CodeHostIsSlave && ae.Param(0) != "":
		next := redirectURL(base, ae.Param(0))
		c.log.Info("host is a pool supporter, following the coordinator", "method", method, "coordinator", next.Host)
		if lerr := c.relogin(ctx, gen, next); lerr != nil {
			return nil, errors.Join(err, lerr)
		}
	case errors.As(err, &te):
		if ferr := c.failover(ctx, gen, base); ferr != nil {
			c.log.Debug("fail-over found no pool member", "method", method, "error", ferr)
			return nil, err
		}
		if !isDialError(err) && !safeToRepeat(method) {
			return nil, err
		}
	default:
		return nil, err
	}
	base, sess, _ = c.snapshot()
	return roundTrip(ctx, hc, base.String(), method, append([]any{sess}, args...))
}

// Call is the escape hatch: it calls any XenAPI method with the session ref
// prepended and returns the decoded value (string, bool, float64, int64,
// []any, map[string]any; empty strings as ""). It has the same retry
// behaviour as the typed calls.
func (c *Client) Call(ctx context.Context, method string, args ...any) (any, error) {
	v, err := c.do(ctx, c.rpc, method, args...)
	if err != nil {
		return nil, err
	}
	return fillEmpty(v), nil
}

// CallInto is Call decoding the result into out (a pointer to a record type,
// ref, slice, map...).
func (c *Client) CallInto(ctx context.Context, out any, method string, args ...any) error {
	v, err := c.do(ctx, c.rpc, method, args...)
	if err != nil {
		return err
	}
	return fromWire(method, v, out)
}

// call is the typed internal helper.
func call[T any](ctx context.Context, c *Client, method string, args ...any) (T, error) {
	var out T
	v, err := c.do(ctx, c.rpc, method, args...)
	if err != nil {
		return out, err
	}
	err = fromWire(method, v, &out)
	return out, err
}

// callVoid runs a method whose result is void (xapi sends "").
func callVoid(ctx context.Context, c *Client, method string, args ...any) error {
	_, err := c.do(ctx, c.rpc, method, args...)
	return err
}

// ListMethods returns system.listMethods (all wire names).
func (c *Client) ListMethods(ctx context.Context) ([]string, error) {
	base, _, _ := c.snapshot()
	v, err := roundTrip(ctx, c.rpc, base.String(), "system.listMethods", nil)
	if err != nil {
		return nil, err
	}
	var out []string
	err = fromWire("system.listMethods", v, &out)
	return out, err
}
