package xapi

import (
	"context"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestUseSessionWithoutLogin(t *testing.T) {
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "VM.get_all":
			if params[0] != "OpaqueRef:given" {
				return failureXML("SESSION_INVALID", params[0].(string))
			}
			return successXML(xv([]any{"OpaqueRef:vm1"}))
		case "session.logout":
			return successXML(xv(""))
		case "session.login_with_password":
			return failureXML("SESSION_AUTHENTICATION_FAILED", "", "no credentials")
		}
		return failureXML("MESSAGE_METHOD_UNKNOWN", method)
	})
	c := newTestClient(t, f.URL())
	_, err := c.VMGetAll(context.Background())
	require.ErrorIs(t, err, ErrNotLoggedIn, "no session before UseSession")

	c.UseSession("OpaqueRef:given")
	assert.Equal(t, SessionRef("OpaqueRef:given"), c.Session())
	vms, err := c.VMGetAll(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []VMRef{"OpaqueRef:vm1"}, vms)
	assert.Equal(t, 0, f.count("session.login_with_password"), "a borrowed session needs no login")

	c.Forget()
	require.NoError(t, c.Close(context.Background()))
	assert.Equal(t, 0, f.count("session.logout"), "a borrowed session is never logged out")

	c.UseSession("OpaqueRef:stale")
	_, err = c.VMGetAll(context.Background())
	require.ErrorIs(t, err, ErrSessionInvalid, "an invalid borrowed session is reported, not replaced")
}

// A borrowed session is never replaced by a login of the client's own, even
// where a login would succeed (over a host's local socket xapi admits any
// root process): the caller gets SESSION_INVALID, and a later Login does
// not log the borrowed session out.
func TestBorrowedSessionIsNotReplaced(t *testing.T) {
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "VM.get_all":
			if params[0] != "OpaqueRef:root" {
				return failureXML("SESSION_INVALID", params[0].(string))
			}
			return successXML(xv([]any{"OpaqueRef:vm1"}))
		case "session.logout":
			return successXML(xv(""))
		case "session.login_with_password":
			return successXML(xv("OpaqueRef:root"))
		}
		return failureXML("MESSAGE_METHOD_UNKNOWN", method)
	})
	c := newTestClient(t, f.URL())
	c.UseSession("OpaqueRef:caller")
	_, err := c.VMGetAll(context.Background())
	require.ErrorIs(t, err, ErrSessionInvalid)
	assert.Equal(t, 0, f.count("session.login_with_password"), "no login behind the caller's back")
	assert.Equal(t, SessionRef("OpaqueRef:caller"), c.Session())

	require.NoError(t, c.Login(context.Background()))
	assert.Equal(t, 0, f.count("session.logout"), "Login does not log out the borrowed session")
	vms, err := c.VMGetAll(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []VMRef{"OpaqueRef:vm1"}, vms)
}

// Close without Forget must not log out a borrowed session either: it
// belongs to the caller (XenCenter, the plugin's caller).
func TestCloseDoesNotLogOutBorrowedSession(t *testing.T) {
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "session.logout":
			return successXML(xv(""))
		case "session.login_with_password":
			return successXML(xv("OpaqueRef:own"))
		}
		return failureXML("MESSAGE_METHOD_UNKNOWN", method)
	})
	c := newTestClient(t, f.URL())
	c.UseSession("OpaqueRef:caller")
	require.NoError(t, c.Close(context.Background()))
	assert.Equal(t, 0, f.count("session.logout"), "a borrowed session is dropped, not logged out")
	assert.Equal(t, SessionRef(""), c.Session())

	require.NoError(t, c.Login(context.Background()))
	require.NoError(t, c.Close(context.Background()))
	assert.Equal(t, 1, f.count("session.logout"), "the client's own session is logged out")
}
