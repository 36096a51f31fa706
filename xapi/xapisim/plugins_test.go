package xapisim

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// installPlugin writes an executable plugin on every host of pool 0.
func installPlugin(t *testing.T, s *Sim, name, script string) {
	t.Helper()
	for _, h := range s.Pools()[0].Hosts() {
		dir := s.PluginDir(h.Ref)
		require.NotEmpty(t, dir)
		require.NoError(t, os.MkdirAll(dir, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755))
	}
}

// respond is a shell plugin printing body on stdout.
func respond(body string) string {
	return "#!/bin/sh\ncat <<'EOF'\n" + body + "\nEOF\n"
}

const pyStyleSuccess = `<?xml version='1.0'?>
<methodResponse>
<params>
<param>
<value><struct>
<member>
<name>Status</name>
<value><string>Success</string></value>
</member>
<member>
<name>Value</name>
<value><string>hello</string></value>
</member>
</struct></value>
</param>
</params>
</methodResponse>`

func wrapStatus(members string) string {
	return `<methodResponse><params><param><value><struct>` + members + `</struct></value></param></params></methodResponse>`
}

func TestCallPluginResults(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	host := s.Pools()[0].Hosts()[1].Ref // a member: the call runs on the target host

	cases := []struct {
		name, script string
		want         string
		code         string
		params       []string // nil: not checked beyond code
	}{
		{name: "untyped", script: respond(wrapStatus(`<member><name>Status</name><value>Success</value></member><member><name>Value</name><value>hi there</value></member>`)), want: "hi there"},
		{name: "python", script: respond(pyStyleSuccess), want: "hello"},
		{name: "empty", script: respond(wrapStatus(`<member><name>Status</name><value>Success</value></member><member><name>Value</name><value/></member>`)), want: ""},
		{name: "failure", script: respond(wrapStatus(`<member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>MY_CODE</value><value>p1</value><value><string>p2</string></value></data></array></value></member>`)),
			code: "MY_CODE", params: []string{"p1", "p2"}},
		{name: "fault", script: respond(`<methodResponse><fault><value><struct><member><name>faultCode</name><value><int>42</int></value></member><member><name>faultString</name><value>boom</value></member></struct></value></fault></methodResponse>`),
			code: ErrPluginFailure, params: []string{"fault", "42", "boom"}},
		{name: "non-zero exit", script: "#!/bin/sh\nprintf out\nprintf err >&2\nexit 3\n",
			code: ErrPluginFailure, params: []string{"non-zero exit", "out", "err"}},
		{name: "signal", script: "#!/bin/sh\nprintf partial\nkill -KILL $$\n",
			code: ErrPluginFailure, params: []string{"signal: SIGKILL", "partial", ""}},
		{name: "garbage", script: "#!/bin/sh\nprintf 'not xml'\n", code: ErrPluginFailure},
		{name: "int value", script: respond(wrapStatus(`<member><name>Status</name><value>Success</value></member><member><name>Value</name><value><int>5</int></value></member>`)),
			code: ErrPluginFailure},
		{name: "unknown status", script: respond(wrapStatus(`<member><name>Status</name><value>Maybe</value></member>`)), code: ErrPluginFailure},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			name := strings.ReplaceAll(tc.name, " ", "-")
			installPlugin(t, s, name, tc.script)
			v, f := call(t, url, "host.call_plugin", sess, host, name, "fn", map[string]any{})
			if tc.code == "" {
				require.Nil(t, f, "%v", f)
				assert.Equal(t, tc.want, v)
				return
			}
			require.NotNil(t, f)
			assert.Equal(t, tc.code, f.Code)
			if tc.params != nil {
				assert.Equal(t, tc.params, f.Params)
			}
		})
	}
	t.Run("garbage params", func(t *testing.T) {
		_, f := call(t, url, "host.call_plugin", sess, host, "garbage", "fn", map[string]any{})
		require.NotNil(t, f)
		require.Len(t, f.Params, 3)
		assert.Equal(t, []string{"failed to parse plugin output", "not xml"}, f.Params[:2])
		assert.NotEmpty(t, f.Params[2])
	})
	t.Run("unexpected shape params", func(t *testing.T) {
		_, f := call(t, url, "host.call_plugin", sess, host, "int-value", "fn", map[string]any{})
		require.NotNil(t, f)
		require.Len(t, f.Params, 2)
		assert.Equal(t, "unexpected XMLRPC result", f.Params[0])
		assert.Contains(t, f.Params[1], "<int>5</int>")
	})
	t.Run("missing plugin", func(t *testing.T) {
		_, f := call(t, url, "host.call_plugin", sess, host, "nope", "fn", map[string]any{})
		require.NotNil(t, f)
		assert.Equal(t, ErrMissingPlugin, f.Code)
		assert.Equal(t, []string{"nope"}, f.Params)
		_, f = call(t, url, "host.call_plugin", sess, host, "../plugins/untyped", "fn", map[string]any{})
		require.NotNil(t, f)
		assert.Equal(t, ErrMissingPlugin, f.Code)
	})
	t.Run("bad host", func(t *testing.T) {
		_, f := call(t, url, "host.call_plugin", sess, "OpaqueRef:nope", "untyped", "fn", map[string]any{})
		require.NotNil(t, f)
		assert.Equal(t, ErrHandleInvalid, f.Code)
	})
	t.Run("async", func(t *testing.T) {
		task := ok(t, url, "Async.host.call_plugin", sess, host, "python", "fn", map[string]any{}).(string)
		require.Eventually(t, func() bool {
			return ok(t, url, "task.get_status", sess, task) != "pending"
		}, 30*time.Second, 20*time.Millisecond)
		assert.Equal(t, "success", ok(t, url, "task.get_status", sess, task))
		assert.Equal(t, "<value>hello</value>", ok(t, url, "task.get_result", sess, task))
		task = ok(t, url, "Async.host.call_plugin", sess, host, "failure", "fn", map[string]any{}).(string)
		require.Eventually(t, func() bool {
			return ok(t, url, "task.get_status", sess, task) != "pending"
		}, 30*time.Second, 20*time.Millisecond)
		assert.Equal(t, "failure", ok(t, url, "task.get_status", sess, task))
		assert.Equal(t, []any{"MY_CODE", "p1", "p2"}, ok(t, url, "task.get_error_info", sess, task))
	})
}

// TestCallPluginArgv checks the exact argv, environment, cwd and stdin a
// plugin gets, and that a detached child holding stdout does not hold the
// call.
func TestCallPluginArgv(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	h := s.Pools()[0].Hosts()[0]
	out := t.TempDir()
	installPlugin(t, s, "probe", "#!/bin/sh\n"+
		"D="+out+"\n"+
		"printf '%s' \"$1\" > $D/argv1\n"+
		"printf '%s' \"$#\" > $D/argc\n"+
		"printf '%s' \"$0\" > $D/argv0\n"+
		"env | grep -v '^PWD=' > $D/env\n"+
		"pwd > $D/cwd\n"+
		"cat > $D/stdin\n"+
		"sleep 3 &\n"+ // keeps stdout/stderr open after the plugin exits
		"cat <<'EOF'\n"+wrapStatus(`<member><name>Status</name><value>Success</value></member><member><name>Value</name><value>done</value></member>`)+"\nEOF\n")

	start := time.Now()
	v := ok(t, url, "host.call_plugin", sess, h.Ref, "probe", "do<it>", map[string]any{"b": "1 <&> 'q' \"d\"", "a": "x", "empty": ""})
	assert.Equal(t, "done", v)
	assert.Less(t, time.Since(start), 3*time.Second, "the call must not wait for a detached child")

	read := func(n string) string {
		b, err := os.ReadFile(filepath.Join(out, n))
		require.NoError(t, err)
		return string(b)
	}
	want := `<methodCall><methodName>do&lt;it&gt;</methodName><params><param><value>` + sess +
		`</value></param><param><value><struct>` +
		`<member><name>a</name><value>x</value></member>` +
		`<member><name>b</name><value>1 &lt;&amp;&gt; &apos;q&apos; &quot;d&quot;</value></member>` +
		`<member><name>empty</name><value/></member>` +
		`</struct></value></param></params></methodCall>`
	assert.Equal(t, want, read("argv1"))
	assert.Equal(t, "1", read("argc"))
	assert.Equal(t, filepath.Join(s.PluginDir(h.Name), "probe"), read("argv0"))
	assert.Equal(t, "PATH=/sbin:/usr/sbin:/bin:/usr/bin\n", read("env"))
	assert.Equal(t, "/\n", read("cwd"))
	assert.Equal(t, "", read("stdin"))

	// No args: an empty struct.
	ok(t, url, "host.call_plugin", sess, h.Ref, "probe", "f", map[string]any{})
	assert.Contains(t, read("argv1"), `<param><value><struct/></value></param>`)
}

// pythonPlugin is a XenAPIPlugin.py-style plugin (XenAPIPlugin.py itself
// is not packaged in Debian): it decodes argv[1] with xmlrpc.client, calls
// back into the simulator through the host's local socket found in the
// inventory next to its etc, and answers with xmlrpc.client.dumps.
const pythonPlugin = `#!/usr/bin/python3
import http.client, os, socket, sys, xmlrpc.client

class Failure(Exception):
    def __init__(self, code, params):
        Exception.__init__(self)
        self.params = [code] + params

def success_message(result):
    return xmlrpc.client.dumps(({'Status': 'Success', 'Value': result},), '', True)

def failure_message(description):
    return xmlrpc.client.dumps(({'Status': 'Failure', 'ErrorDescription': description},), '', True)

class UDSConnection(http.client.HTTPConnection):
    def __init__(self, path):
        http.client.HTTPConnection.__init__(self, 'localhost')
        self.path = path
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)

class UDSTransport(xmlrpc.client.Transport):
    def __init__(self, path):
        xmlrpc.client.Transport.__init__(self)
        self.path = path
    def make_connection(self, host):
        return UDSConnection(self.path)

def inventory():
    etc = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))))
    inv = {}
    with open(os.path.join(etc, 'xensource-inventory')) as f:
        for line in f:
            k, _, v = line.strip().partition('=')
            inv[k] = v.strip("'")
    return inv

def whoami(session, args):
    inv = inventory()
    proxy = xmlrpc.client.ServerProxy('http://localhost/', transport=UDSTransport(inv['WANMOTION_SIM_XAPI_SOCKET']))
    r = proxy.session.get_this_host(session, session)
    if r['Status'] != 'Success':
        raise Failure('SIM_CALL_FAILED', r['ErrorDescription'])
    host = r['Value']
    uuid = proxy.host.get_uuid(session, host)['Value']
    return uuid + ' ' + inv['INSTALLATION_UUID']

def echo(session, args):
    return ','.join('%s=%s' % (k, args[k]) for k in sorted(args))

def fail(session, args):
    raise Failure('WANMOTION_INVALID_ARGUMENT', ['x', args.get('x', '')])

def crash(session, args):
    raise ValueError('bad value')

def dispatch(fn_table):
    if len(sys.argv) != 2:
        raise Exception('Incorrect number of commandline arguments')
    params, methodname = xmlrpc.client.loads(sys.argv[1])
    session_id, args = params[0], params[1]
    if methodname in fn_table:
        try:
            print(success_message(fn_table[methodname](session_id, args)))
        except Failure as e:
            print(failure_message(e.params))
        except Exception as e:
            print(failure_message(['XENAPI_PLUGIN_FAILURE', methodname, e.__class__.__name__, str(e)]))
    else:
        print(failure_message(['UNKNOWN_XENAPI_PLUGIN_FUNCTION', methodname]))

if __name__ == '__main__':
    dispatch({'whoami': whoami, 'echo': echo, 'fail': fail, 'crash': crash})
`

func TestCallPluginPython(t *testing.T) {
	py := testutil.PythonPath(t)
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	installPlugin(t, s, "pyplugin", strings.Replace(pythonPlugin, "/usr/bin/python3", py, 1))
	for _, h := range s.Pools()[0].Hosts() {
		if len(s.XapiSocketPath(h)) > 107 {
			t.Skip("state dir too long for a unix socket")
		}
		v := ok(t, url, "host.call_plugin", sess, h.Ref, "pyplugin", "whoami", map[string]any{}).(string)
		uuids := strings.Fields(v)
		require.Len(t, uuids, 2, v)
		assert.Equal(t, ok(t, url, "host.get_uuid", sess, s.Pools()[0].Coordinator().Ref), uuids[0],
			"through the local socket, session.get_this_host is the host the session logged in on")
		assert.Equal(t, ok(t, url, "host.get_uuid", sess, h.Ref), uuids[1],
			"the inventory names the host the plugin runs on")
	}
	host := s.Pools()[0].Coordinator().Ref
	assert.Equal(t, "a=1,b=<&>,c=", ok(t, url, "host.call_plugin", sess, host, "pyplugin", "echo", map[string]any{"a": "1", "b": "<&>", "c": ""}))
	for _, tc := range []struct {
		fn   string
		code string
		args []string
	}{
		{"fail", "WANMOTION_INVALID_ARGUMENT", []string{"x", "7"}},
		{"crash", ErrPluginFailure, []string{"crash", "ValueError", "bad value"}},
		{"nosuch", "UNKNOWN_XENAPI_PLUGIN_FUNCTION", []string{"nosuch"}},
	} {
		_, f := call(t, url, "host.call_plugin", sess, host, "pyplugin", tc.fn, map[string]any{"x": "7"})
		require.NotNil(t, f, tc.fn)
		assert.Equal(t, tc.code, f.Code, tc.fn)
		assert.Equal(t, tc.args, f.Params, tc.fn)
	}
}

// TestPluginCallParsesInPython checks argv[1] decodes with Python's
// xmlrpc.client.loads into (session, args) as XenAPIPlugin.py expects.
func TestPluginCallParsesInPython(t *testing.T) {
	py := testutil.PythonPath(t)
	arg := PluginCall("migrate", "OpaqueRef:abc", map[string]string{"vm": "u<1>", "empty": "", "q": "'\"&"})
	out, err := exec.Command(py, "-c", `import sys, xmlrpc.client, json
p, m = xmlrpc.client.loads(sys.argv[1])
print(json.dumps([m, p[0], p[1]], sort_keys=True))`, arg).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.Equal(t, `["migrate", "OpaqueRef:abc", {"empty": "", "q": "'\"&", "vm": "u<1>"}]`, strings.TrimSpace(string(out)))
}

func FuzzParsePluginOutput(f *testing.F) {
	f.Add(pyStyleSuccess)
	f.Add(wrapStatus(`<member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data/></array></value></member>`))
	f.Add(`<methodResponse><fault><value><struct><member><name>faultCode</name><value><i4>1</i4></value></member><member><name>faultString</name><value/></member></struct></value></fault></methodResponse>`)
	f.Add("")
	f.Add("<a>")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := ParsePluginOutput(s)
		if err != nil {
			assert.Empty(t, v)
			var fault *Fault
			require.ErrorAs(t, err, &fault)
			assert.NotEmpty(t, fault.Code)
		}
	})
}

// TestCallPluginEtcDir runs a plugin from Config.EtcDir, shared by every host.
func TestCallPluginEtcDir(t *testing.T) {
	etc := t.TempDir()
	s, err := New(Config{StateDir: t.TempDir(), DiskSize: 4 << 20, FillSize: 1 << 20, EtcDir: etc, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	url, sess := login(t, s, 1)
	require.Equal(t, filepath.Join(etc, "xapi.d", "plugins"), s.PluginDir(s.Pools()[1].Coordinator().Ref))
	require.NoError(t, os.WriteFile(filepath.Join(etc, "xapi.d", "plugins", "hello"),
		[]byte(respond(wrapStatus(`<member><name>Status</name><value>Success</value></member><member><name>Value</name><value>from etc</value></member>`))), 0o755))
	for _, h := range s.Pools()[1].Hosts() {
		assert.Equal(t, "from etc", ok(t, url, "host.call_plugin", sess, h.Ref, "hello", "f", map[string]any{}))
	}
}

// TestCallPluginXenAPIPy calls plugins through the official XenAPI.py
// client: a string result, and a plugin Failure seen as XenAPI.Failure.
func TestCallPluginXenAPIPy(t *testing.T) {
	py := testutil.PythonPath(t)
	testutil.RequirePythonModule(t, "os_xenapi", "python3-os-xenapi")
	s := startSim(t, "")
	installPlugin(t, s, "pyplugin", strings.Replace(pythonPlugin, "/usr/bin/python3", py, 1))
	pi := s.Info().Pools[0]
	script := `import json, sys
from os_xenapi.client import XenAPI
s = XenAPI.Session(sys.argv[1])
s.xenapi.login_with_password(sys.argv[2], sys.argv[3])
host = s.xenapi.host.get_all()[1]
out = {"echo": s.xenapi.host.call_plugin(host, "pyplugin", "echo", {"k": "v w", "e": ""})}
try:
    s.xenapi.host.call_plugin(host, "pyplugin", "fail", {"x": "9"})
except XenAPI.Failure as e:
    out["fail"] = e.details
try:
    s.xenapi.host.call_plugin(host, "missing", "f", {})
except XenAPI.Failure as e:
    out["missing"] = e.details
print(json.dumps(out, sort_keys=True))`
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, py, "-c", script, pi.URL, pi.Username, pi.Password).CombinedOutput()
	require.NoError(t, err, string(out))
	assert.JSONEq(t, `{"echo": "e=,k=v w", "fail": ["WANMOTION_INVALID_ARGUMENT", "x", "9"], "missing": ["XENAPI_MISSING_PLUGIN", "missing"]}`,
		strings.TrimSpace(string(out)))
}

func TestInstallPluginAndHook(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 1)
	bin := filepath.Join(t.TempDir(), "tool")
	require.NoError(t, os.WriteFile(bin, []byte("#!/bin/sh\nprintf '%s' \"$0\" > \"$(dirname \"$0\")/../../argv0-$(basename \"$(dirname \"$0\")\")\"\n"+
		"cat <<'EOF'\n"+wrapStatus(`<member><name>Status</name><value>Success</value></member><member><name>Value</name><value>ok</value></member>`)+"\nEOF\n"), 0o755))
	require.NoError(t, s.InstallPlugin("tool", bin))
	require.NoError(t, s.InstallPlugin("tool", bin), "installing again replaces the link")
	require.NoError(t, s.InstallHook(HookVMPreMigrate, "10tool", bin))
	require.Error(t, s.InstallPlugin("../x", bin))
	h := s.Pools()[1].Hosts()[1]
	assert.Equal(t, "ok", ok(t, url, "host.call_plugin", sess, h.Ref, "tool", "f", map[string]any{}))
	b, err := os.ReadFile(filepath.Join(s.HostEtcDir(h.Ref), "argv0-plugins"))
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(s.PluginDir(h.Ref), "tool"), string(b), "argv[0] is the link inside the host's etc")
	require.NoError(t, s.RunHooks(context.Background(), h.Ref, HookVMPreMigrate, "u", "source", ""))
	b, err = os.ReadFile(filepath.Join(s.HostEtcDir(h.Ref), "argv0-"+HookVMPreMigrate))
	require.NoError(t, err)
	assert.Equal(t, filepath.Join(s.HookDir(h.Ref, HookVMPreMigrate), "10tool"), string(b))
}
