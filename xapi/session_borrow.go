package xapi

// UseSession makes the client use an existing session ref (one handed over
// by a caller that logged in, e.g. the controller giving a backend its
// session) instead of logging in. Such a client never logs in by itself: a
// SESSION_INVALID, a HOST_IS_SLAVE or a transport error is returned to the
// caller as is. (Over a host's local socket xapi lets any root process in
// whatever the credentials, so a re-login would silently swap the caller's
// identity for root's and leak that session.) Login replaces the borrowed
// session with one of the client's own. Logout and Close drop a borrowed
// session without logging it out (Forget does the same explicitly).
func (c *Client) UseSession(s SessionRef) {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	c.mu.Lock()
	c.session = s
	c.borrowed = s != ""
	c.gen++
	c.mu.Unlock()
}

// Forget drops the session without logging it out (for a session given to
// UseSession, which belongs to someone else). Close then only releases
// connections.
func (c *Client) Forget() {
	c.UseSession("")
}
