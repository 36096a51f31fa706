package xapi

// UseSession makes the client use an existing session ref (one handed over
// by a caller that logged in, e.g. the controller giving a backend its
// session) instead of logging in. Such a client has no credentials of its
// own: a SESSION_INVALID is returned to the caller (the re-login attempt
// with the empty Config credentials fails). Call Forget before Close so the
// borrowed session is not logged out.
func (c *Client) UseSession(s SessionRef) {
	c.loginMu.Lock()
	defer c.loginMu.Unlock()
	c.mu.Lock()
	c.session = s
	c.gen++
	c.mu.Unlock()
}

// Forget drops the session without logging it out (for a session given to
// UseSession, which belongs to someone else). Close then only releases
// connections.
func (c *Client) Forget() {
	c.UseSession("")
}
