package xapi

import (
	"context"
	"errors"
	"net"
	"net/url"
	"strconv"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestFailureEnvelopes(t *testing.T) {
	tests := []struct {
		name     string
		reply    string
		sentinel error
		code     string
		params   []string
		text     string
	}{
		{"handle invalid", failureXML("HANDLE_INVALID", "VM", "OpaqueRef:gone"), ErrHandleInvalid, CodeHandleInvalid,
			[]string{"VM", "OpaqueRef:gone"}, "VM.get_record: HANDLE_INVALID [VM OpaqueRef:gone]"},
		{"bad power state", failureXML("VM_BAD_POWER_STATE", "OpaqueRef:vm", "running", "halted"), ErrVMBadPowerState,
			CodeVMBadPowerState, []string{"OpaqueRef:vm", "running", "halted"}, "VM.get_record: VM_BAD_POWER_STATE [OpaqueRef:vm running halted]"},
		{"no params", failureXML("EVENTS_LOST"), ErrEventsLost, CodeEventsLost, []string{}, "VM.get_record: EVENTS_LOST"},
		{"plugin failure", failureXML("XENAPI_PLUGIN_FAILURE", "non-zero exit", "", "boom"), ErrXenAPIPluginFailure,
			CodeXenAPIPluginFailure, []string{"non-zero exit", "", "boom"}, "VM.get_record: XENAPI_PLUGIN_FAILURE [non-zero exit  boom]"},
		{"unknown code kept", failureXML("SOMETHING_NEW", "x"), nil, "SOMETHING_NEW", []string{"x"}, "VM.get_record: SOMETHING_NEW [x]"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFake(t, loginOK("OpaqueRef:s1", func(string, []any) string { return tt.reply }))
			c := newTestClient(t, f.URL())
			require.NoError(t, c.Login(context.Background()))
			_, err := c.VMGetRecord(context.Background(), "OpaqueRef:vm")
			require.Error(t, err)
			ae, ok := AsAPIError(err)
			require.True(t, ok, "error is an *APIError: %v", err)
			assert.Equal(t, "VM.get_record", ae.Method)
			assert.Equal(t, tt.code, ae.Code)
			assert.Equal(t, tt.params, ae.Params)
			assert.Equal(t, tt.text, err.Error())
			assert.True(t, IsCode(err, tt.code))
			if tt.sentinel != nil {
				assert.ErrorIs(t, err, tt.sentinel)
			}
			assert.NotErrorIs(t, err, ErrSessionInvalid)
			assert.Equal(t, 1, f.count("VM.get_record"), "API errors other than session/redirect are not retried")
		})
	}
}

func TestProtocolErrors(t *testing.T) {
	for name, reply := range map[string]string{
		"no status":     successXML(xv("x"))[:60],
		"bad status":    `<methodResponse><params><param><value><struct><member><name>Status</name><value>Maybe</value></member></struct></value></param></params></methodResponse>`,
		"empty failure": `<methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data></data></array></value></member></struct></value></param></params></methodResponse>`,
		"fault":         `<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>1</int></value></member><member><name>faultString</name><value>no</value></member></struct></value></fault></methodResponse>`,
		"not xml":       "HTTP/1.1 500 oops",
		"wrong type":    successXML(xv([]any{"a"})),
	} {
		t.Run(name, func(t *testing.T) {
			f := newFake(t, loginOK("OpaqueRef:s1", func(string, []any) string { return reply }))
			c := newTestClient(t, f.URL())
			require.NoError(t, c.Login(context.Background()))
			_, err := c.VMGetRecord(context.Background(), "OpaqueRef:vm")
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrProtocol)
		})
	}
}

func TestSessionInvalidReloginOnce(t *testing.T) {
	var logins atomic.Int32
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "session.login_with_password":
			n := logins.Add(1)
			return successXML(xv("OpaqueRef:s" + strconv.Itoa(int(n))))
		case "host.get_all_records":
			return successXML(xv([][2]any{}))
		case "VM.get_all":
			if params[0] != "OpaqueRef:s2" {
				return failureXML("SESSION_INVALID", params[0].(string))
			}
			return successXML(xv([]any{"OpaqueRef:vm1"}))
		}
		return failureXML("MESSAGE_METHOD_UNKNOWN", method)
	})
	c := newTestClient(t, f.URL())
	require.NoError(t, c.Login(context.Background()))
	vms, err := c.VMGetAll(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []VMRef{"OpaqueRef:vm1"}, vms)
	assert.Equal(t, int32(2), logins.Load())
	assert.Equal(t, 2, f.count("VM.get_all"))
}

func TestSessionInvalidPersistentGivesUp(t *testing.T) {
	var logins atomic.Int32
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "session.login_with_password":
			logins.Add(1)
			return successXML(xv("OpaqueRef:s"))
		case "host.get_all_records":
			return successXML(xv([][2]any{}))
		}
		return failureXML("SESSION_INVALID", params[0].(string))
	})
	c := newTestClient(t, f.URL())
	require.NoError(t, c.Login(context.Background()))
	_, err := c.VMGetAll(context.Background())
	require.ErrorIs(t, err, ErrSessionInvalid)
	assert.NotContains(t, err.Error(), "OpaqueRef:s", "the session ref is not printed")
	assert.Equal(t, 2, f.count("VM.get_all"), "one retry only")
	assert.Equal(t, int32(2), logins.Load())
}

func TestLoginAuthenticationFailed(t *testing.T) {
	f := newFake(t, func(string, []any) string {
		return failureXML("SESSION_AUTHENTICATION_FAILED", "root", "Authentication failure")
	})
	c := newTestClient(t, f.URL())
	err := c.Login(context.Background())
	require.ErrorIs(t, err, ErrSessionAuthenticationFailed)
	assert.NotContains(t, err.Error(), "secret")
}

// listenPair returns listeners on 127.0.0.1:P and <other>:P (same port), as a
// pool coordinator and supporter on different addresses would be.
func listenPair(t *testing.T, other string) (string, string) {
	t.Helper()
	for i := 0; i < 20; i++ {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		port := ln.Addr().(*net.TCPAddr).Port
		_ = ln.Close()
		ln2, err := net.Listen("tcp", net.JoinHostPort(other, strconv.Itoa(port)))
		if err != nil {
			continue
		}
		_ = ln2.Close()
		return "127.0.0.1:" + strconv.Itoa(port), net.JoinHostPort(other, strconv.Itoa(port))
	}
	t.Skip("no free port pair on loopback")
	return "", ""
}

func TestHostIsSlaveRedirectOnLogin(t *testing.T) {
	memberAddr, coordAddr := listenPair(t, "127.0.0.2")
	member := newFakeOn(t, memberAddr, false, func(method string, _ []any) string {
		return failureXML("HOST_IS_SLAVE", "127.0.0.2")
	})
	coord := newFakeOn(t, coordAddr, false, loginOK("OpaqueRef:s1", func(method string, _ []any) string {
		return successXML(xv([]any{"OpaqueRef:vm1"}))
	}))
	c := newTestClient(t, member.URL())
	require.NoError(t, c.Login(context.Background()))
	assert.Equal(t, "http://"+coordAddr+"/", c.URL())
	vms, err := c.VMGetAll(context.Background())
	require.NoError(t, err)
	assert.Len(t, vms, 1)
	assert.Equal(t, 1, member.count("session.login_with_password"))
	assert.Equal(t, 1, coord.count("session.login_with_password"))
	assert.Equal(t, 1, coord.count("VM.get_all"))
}

func TestHostIsSlaveOnCallRedirects(t *testing.T) {
	aAddr, bAddr := listenPair(t, "127.0.0.2")
	var demoted atomic.Bool
	a := newFakeOn(t, aAddr, false, loginOK("OpaqueRef:a", func(method string, _ []any) string {
		if demoted.Load() {
			return failureXML("HOST_IS_SLAVE", "127.0.0.2")
		}
		return successXML(xv([]any{}))
	}))
	b := newFakeOn(t, bAddr, false, loginOK("OpaqueRef:b", func(method string, _ []any) string {
		return successXML(xv([]any{"OpaqueRef:vm-b"}))
	}))
	c := newTestClient(t, a.URL())
	require.NoError(t, c.Login(context.Background()))
	demoted.Store(true)
	vms, err := c.VMGetAll(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []VMRef{"OpaqueRef:vm-b"}, vms)
	assert.Equal(t, 1, b.count("VM.get_all"))
	assert.Equal(t, "http://"+bAddr+"/", c.URL())
}

func TestFailoverToPoolMember(t *testing.T) {
	aAddr, bAddr := listenPair(t, "127.0.0.3")
	hosts := successXML(xv([][2]any{
		{"OpaqueRef:h1", [][2]any{{"address", "127.0.0.1"}, {"name_label", "a"}}},
		{"OpaqueRef:h2", [][2]any{{"address", "127.0.0.3"}, {"name_label", "b"}}},
	}))
	handler := func(session string) func(string, []any) string {
		return func(method string, _ []any) string {
			switch method {
			case "session.login_with_password":
				return successXML(xv(session))
			case "host.get_all_records":
				return hosts
			}
			return successXML(xv([]any{"OpaqueRef:from-" + session}))
		}
	}
	a := newFakeOn(t, aAddr, false, handler("OpaqueRef:a"))
	b := newFakeOn(t, bAddr, false, handler("OpaqueRef:b"))
	c := newTestClient(t, a.URL())
	require.NoError(t, c.Login(context.Background()))
	assert.ElementsMatch(t, []string{"127.0.0.1", "127.0.0.3"}, c.Members())

	a.srv.Close() // the coordinator dies
	vms, err := c.VMGetAll(context.Background())
	require.NoError(t, err)
	assert.Equal(t, []VMRef{"OpaqueRef:from-OpaqueRef:b"}, vms)
	assert.Equal(t, "http://"+bAddr+"/", c.URL())
	assert.Equal(t, 1, b.count("session.login_with_password"))
}

func TestRedirectURL(t *testing.T) {
	base := func(s string) *url.URL { u, err := url.Parse(s); require.NoError(t, err); return u }
	tests := []struct{ base, addr, want string }{
		{"https://192.0.2.1/", "192.0.2.2", "https://192.0.2.2/"},
		{"https://192.0.2.1:8443/", "192.0.2.2", "https://192.0.2.2:8443/"},
		{"https://192.0.2.1/", "fd00::2", "https://[fd00::2]/"},
		{"https://[fd00::1]:443/", "fd00::2", "https://[fd00::2]:443/"},
		{"http://127.0.0.1:8080/", "[fd00::3]", "http://[fd00::3]:8080/"},
		{"https://pool.example/", "xcp-b.example", "https://xcp-b.example/"},
		{"http://127.0.0.1:8080/", "127.0.0.1:9090", "http://127.0.0.1:9090/"},
		{"https://[fd00::1]:443/", "[fd00::2]:8443", "https://[fd00::2]:8443/"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, redirectURL(base(tt.base), tt.addr).String(), tt.addr)
	}
}

func TestNewValidatesURL(t *testing.T) {
	for _, u := range []string{"", "ftp://x", "https://", "://bad"} {
		_, err := New(Config{URL: u})
		assert.Error(t, err, u)
	}
	c, err := New(Config{URL: "https://xcp.example:8443/some/path"})
	require.NoError(t, err)
	assert.Equal(t, "https://xcp.example:8443/", c.URL())
}

func TestTransportErrorType(t *testing.T) {
	f := newFake(t, loginOK("OpaqueRef:s", func(string, []any) string { return successXML(xv("")) }))
	c := newTestClient(t, f.URL(), func(c *Config) { c.DisableMemberDiscovery = true })
	require.NoError(t, c.Login(context.Background()))
	f.srv.Close()
	_, err := c.VMGetAll(context.Background())
	var te *TransportError
	require.True(t, errors.As(err, &te), "%v", err)
	assert.Equal(t, "VM.get_all", te.Method)
}

func TestLoginAgainLogsOutOldSession(t *testing.T) {
	var n atomic.Int32
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "session.login_with_password":
			return successXML(xv("OpaqueRef:s" + strconv.Itoa(int(n.Add(1)))))
		case "host.get_all_records":
			return successXML(xv([][2]any{}))
		}
		return successXML(xv(""))
	})
	c := newTestClient(t, f.URL())
	require.NoError(t, c.Login(context.Background()))
	require.NoError(t, c.Login(context.Background()))
	var logouts []any
	for _, call := range f.Calls() {
		if call.Method == "session.logout" {
			logouts = append(logouts, call.Params[0])
		}
	}
	assert.Equal(t, []any{"OpaqueRef:s1"}, logouts)
	assert.Equal(t, SessionRef("OpaqueRef:s2"), c.Session())
}

func TestConcurrentSessionInvalidLogsInOnce(t *testing.T) {
	var logins atomic.Int32
	f := newFake(t, func(method string, params []any) string {
		switch method {
		case "session.login_with_password":
			return successXML(xv("OpaqueRef:s" + strconv.Itoa(int(logins.Add(1)))))
		case "host.get_all_records":
			return successXML(xv([][2]any{}))
		}
		if params[0] == "OpaqueRef:s1" {
			return failureXML("SESSION_INVALID", "OpaqueRef:s1")
		}
		return successXML(xv([]any{}))
	})
	c := newTestClient(t, f.URL())
	require.NoError(t, c.Login(context.Background()))
	const n = 8
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		go func() {
			_, err := c.VMGetAll(context.Background())
			errs <- err
		}()
	}
	for i := 0; i < n; i++ {
		require.NoError(t, <-errs)
	}
	assert.Equal(t, int32(2), logins.Load(), "one re-login shared by all failing calls")
}
