package xapiplugin

import (
	"encoding/json"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

const xapiStyle = `<methodCall><methodName>migrate</methodName><params><param><value>OpaqueRef:abc</value></param>` +
	`<param><value><struct><member><name>vm</name><value>u-1</value></member><member><name>empty</name><value/></member>` +
	`<member><name>esc</name><value>a&lt;b&amp;c&apos;&quot;</value></member></struct></value></param></params></methodCall>`

const pythonStyle = `<?xml version='1.0'?>
<methodCall>
<methodName>migrate</methodName>
<params>
<param>
<value><string>OpaqueRef:abc</string></value>
</param>
<param>
<value><struct>
<member>
<name>vm</name>
<value><string>u-1</string></value>
</member>
<member>
<name>empty</name>
<value><string></string></value>
</member>
<member>
<name>esc</name>
<value><string>a&lt;b&amp;c'"</string></value>
</member>
</struct></value>
</param>
</params>
</methodCall>
`

func TestParseCall(t *testing.T) {
	want := Call{Method: "migrate", Session: "OpaqueRef:abc", Args: map[string]string{"vm": "u-1", "empty": "", "esc": `a<b&c'"`}}
	for _, tc := range []struct{ name, in string }{{"xapi", xapiStyle}, {"python", pythonStyle}} {
		t.Run(tc.name, func(t *testing.T) {
			require.True(t, LooksLikeCall(tc.in))
			got, err := ParseCall(tc.in)
			require.NoError(t, err)
			assert.Equal(t, want, got)
		})
	}
}

func TestParseCallSimulatorArgv(t *testing.T) {
	args := map[string]string{"a": "1", "b": "", "c": "x y <z> & 'q' \"r\"", "d": "  padded  "}
	got, err := ParseCall(xapisim.PluginCall("fn", "OpaqueRef:s-1", args))
	require.NoError(t, err)
	assert.Equal(t, Call{Method: "fn", Session: "OpaqueRef:s-1", Args: args}, got)
}

func TestParseCallRejects(t *testing.T) {
	for _, tc := range []struct{ name, in, msg string }{
		{"empty", "", "EOF"},
		{"not xml", "hello", "unexpected text"},
		{"wrong root", "<methodResponse/>", "root element"},
		{"no name", "<methodCall><params><param><value>OpaqueRef:a</value></param><param><value><struct/></value></param></params></methodCall>", "no method name"},
		{"one param", "<methodCall><methodName>f</methodName><params><param><value>OpaqueRef:a</value></param></params></methodCall>", "1 params"},
		{"three params", "<methodCall><methodName>f</methodName><params><param><value>OpaqueRef:a</value></param><param><value><struct/></value></param><param><value>x</value></param></params></methodCall>", "more than 2"},
		{"not a session", "<methodCall><methodName>f</methodName><params><param><value>root</value></param><param><value><struct/></value></param></params></methodCall>", "session ref"},
		{"args not struct", "<methodCall><methodName>f</methodName><params><param><value>OpaqueRef:a</value></param><param><value>x</value></param></params></methodCall>", "not a struct"},
		{"int arg", "<methodCall><methodName>f</methodName><params><param><value>OpaqueRef:a</value></param><param><value><struct><member><name>n</name><value><int>1</int></value></member></struct></value></param></params></methodCall>", "<int>"},
		{"dup member", "<methodCall><methodName>f</methodName><params><param><value>OpaqueRef:a</value></param><param><value><struct><member><name>n</name><value>1</value></member><member><name>n</name><value>2</value></member></struct></value></param></params></methodCall>", "duplicate"},
		{"trailing", xapiStyle + "<x/>", "after"},
		{"unclosed", strings.TrimSuffix(xapiStyle, "</methodCall>"), "EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseCall(tc.in)
			require.ErrorIs(t, err, ErrMalformed)
			assert.Contains(t, err.Error(), tc.msg)
		})
	}
	assert.False(t, LooksLikeCall("version"))
	assert.False(t, LooksLikeCall("--help"))
}

// TestResponsesMatchPython compares the bytes with what XenAPIPlugin.py
// prints (xmlrpc.client.dumps(..., methodresponse=True) and print()), and
// checks the simulator (xapi's rules) reads them back.
func TestResponsesMatchPython(t *testing.T) {
	py := testutil.PythonPath(t)
	values := []string{"", "hello", `{"a":"b<c>&d"}`, "multi\nline\ttab", "ünïcödé €"}
	for _, v := range values {
		script := `import sys, json, xmlrpc.client as x
v = json.loads(sys.argv[1])
print(x.dumps(({'Status': 'Success', 'Value': v},), '', True))
print("\x00SPLIT\x00")
print(x.dumps(({'Status': 'Failure', 'ErrorDescription': ['WANMOTION_INVALID_ARGUMENT', v, 'p2']},), '', True))`
		arg, _ := json.Marshal(v)
		out, err := exec.Command(py, "-c", script, string(arg)).Output()
		require.NoError(t, err)
		ok, fail, found := strings.Cut(string(out), "\x00SPLIT\x00\n")
		require.True(t, found)
		assert.Equal(t, ok, string(Success(v)), "success %q", v)
		assert.Equal(t, fail, string(Failure("WANMOTION_INVALID_ARGUMENT", v, "p2")), "failure %q", v)

		got, err := xapisim.ParsePluginOutput(string(Success(v)))
		require.NoError(t, err)
		assert.Equal(t, v, got)
		_, err = xapisim.ParsePluginOutput(string(Failure("WANMOTION_NOT_FOUND", v)))
		require.Error(t, err)
		assert.Contains(t, err.Error(), "WANMOTION_NOT_FOUND")
	}
}

func TestEscapeKeepsXMLValid(t *testing.T) {
	v := "a\x00b\x1bc\xffd"
	out := string(Success(v))
	got, err := xapisim.ParsePluginOutput(out)
	require.NoError(t, err)
	assert.Equal(t, "a\uFFFDb\uFFFDc\uFFFDd", got)
}

// FuzzParseCall: ParseCall never panics, and what it accepts survives a
// round trip through the simulator's (xapi's) argv printer.
func FuzzParseCall(f *testing.F) {
	f.Add(xapiStyle)
	f.Add(pythonStyle)
	f.Add(xapisim.PluginCall("status", "OpaqueRef:1", map[string]string{"task": "OpaqueRef:2"}))
	f.Add("<methodCall><methodName>f</methodName><params></params></methodCall>")
	f.Add("<?xml version='1.0'?><methodCall/>")
	f.Fuzz(func(t *testing.T, in string) {
		c, err := ParseCall(in)
		if err != nil {
			return
		}
		again, err := ParseCall(xapisim.PluginCall(c.Method, c.Session, c.Args))
		if err != nil {
			// Text the printer cannot carry (e.g. "\r" normalised by XML)
			// is the only acceptable difference.
			return
		}
		if again.Method != c.Method || again.Session != c.Session || len(again.Args) != len(c.Args) {
			t.Fatalf("round trip changed the call: %+v -> %+v", c, again)
		}
	})
}
