package xapisim

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestEncodeGolden(t *testing.T) {
	date := time.Date(2025, 3, 19, 4, 16, 24, 0, time.UTC)
	tests := []struct {
		name string
		v    any
		want string
	}{
		{"string", "OpaqueRef:abc", `<value>OpaqueRef:abc</value>`},
		{"empty string", "", `<value></value>`},
		{"escapes", `a<b>&"c'`, `<value>a&lt;b&gt;&amp;&quot;c'</value>`},
		{"int64 untyped", int64(-42), `<value>-42</value>`},
		{"i4", I4(7), `<value><i4>7</i4></value>`},
		{"true", true, `<value><boolean>1</boolean></value>`},
		{"false", false, `<value><boolean>0</boolean></value>`},
		{"double", 0.5, `<value><double>0.5</double></value>`},
		{"double whole", 1.0, `<value><double>1</double></value>`},
		{"date", date, `<value><dateTime.iso8601>20250319T04:16:24Z</dateTime.iso8601></value>`},
		{"never", Never, `<value><dateTime.iso8601>19700101T00:00:00Z</dateTime.iso8601></value>`},
		{"set", []string{"a", ""}, `<value><array><data><value>a</value><value></value></data></array></value>`},
		{"map sorted", map[string]string{"b": "2", "a": "1"}, `<value><struct><member><name>a</name><value>1</value></member><member><name>b</name><value>2</value></member></struct></value>`},
		{"ordered struct", Struct{{"z", int64(1)}, {"a", "x"}}, `<value><struct><member><name>z</name><value>1</value></member><member><name>a</name><value>x</value></member></struct></value>`},
		{"nil", nil, `<value><nil/></value>`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, ValueString(tt.v))
		})
	}
}

func TestEnvelopeGolden(t *testing.T) {
	assert.Equal(t,
		`<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name><value>OpaqueRef:x</value></member></struct></value></param></params></methodResponse>`,
		string(EncodeSuccess("OpaqueRef:x")))
	assert.Equal(t,
		`<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name><value><array><data><value>HANDLE_INVALID</value><value>VM</value><value>OpaqueRef:x</value></data></array></value></member></struct></value></param></params></methodResponse>`,
		string(EncodeFailure(ErrHandleInvalid, []string{"VM", "OpaqueRef:x"})))
}

func TestParseRequestTypedAndUntyped(t *testing.T) {
	body := `<?xml version='1.0'?>
<methodCall>
<methodName>VM.start</methodName>
<params>
<param><value><string>OpaqueRef:s</string></value></param>
<param><value>untyped text</value></param>
<param><value><int>5</int></value></param>
<param><value><i4>6</i4></value></param>
<param><value><i8>9000000000</i8></value></param>
<param><value><boolean>1</boolean></value></param>
<param><value><double>1.5</double></value></param>
<param><value><dateTime.iso8601>2025-03-19T04:16:24Z</dateTime.iso8601></value></param>
<param><value><array><data><value>a</value><value><string>b</string></value></data></array></value></param>
<param><value><struct><member><name>k</name><value>v</value></member></struct></value></param>
<param><value/></param>
<param><value><string/></value></param>
<param><value><nil/></value></param>
<param><value><base64>aGk=</base64></value></param>
</params>
</methodCall>`
	req, err := ParseRequest(strings.NewReader(body))
	require.NoError(t, err)
	assert.Equal(t, "VM.start", req.Method)
	want := []any{"OpaqueRef:s", "untyped text", int64(5), int64(6), int64(9000000000), true, 1.5,
		time.Date(2025, 3, 19, 4, 16, 24, 0, time.UTC), []any{"a", "b"}, map[string]any{"k": "v"}, "", "", nil, []byte("hi")}
	assert.Equal(t, want, req.Params)
}

func TestParseRequestNoParams(t *testing.T) {
	for _, body := range []string{
		`<methodCall><methodName>system.listMethods</methodName></methodCall>`,
		`<methodCall><methodName>system.listMethods</methodName><params/></methodCall>`,
	} {
		req, err := ParseRequest(strings.NewReader(body))
		require.NoError(t, err)
		assert.Equal(t, "system.listMethods", req.Method)
		assert.Empty(t, req.Params)
	}
}

func TestParseRequestMalformed(t *testing.T) {
	for _, body := range []string{
		``, `<x/>`, `<methodCall>`, `<methodCall><params/></methodCall>`,
		`<methodCall><methodName>a</methodName><params><param><value><int>x</int></value></param></params></methodCall>`,
		`<methodCall><methodName>a</methodName><params><param><value><boolean>true</boolean></value></param></params></methodCall>`,
		`<methodCall><methodName>a</methodName><params><param><value><foo/></value></param></params></methodCall>`,
		`<methodCall><methodName>a</methodName><params><param></param></params></methodCall>`,
		`<methodCall><methodName>a</methodName><params><param><value>` + strings.Repeat(`<array><data><value>`, 100) + `</value></param></params></methodCall>`,
	} {
		_, err := ParseRequest(strings.NewReader(body))
		assert.ErrorIs(t, err, ErrMalformed, body)
	}
}

func FuzzParseRequest(f *testing.F) {
	seeds := []string{
		`<methodCall><methodName>session.login_with_password</methodName><params><param><value>root</value></param><param><value><string>pw</string></value></param></params></methodCall>`,
		`<methodCall><methodName>VM.get_record</methodName><params><param><value>OpaqueRef:1</value></param><param><value><struct><member><name>a</name><value><array><data><value><i4>1</i4></value></data></array></value></member></struct></value></param></params></methodCall>`,
		`<methodCall><methodName>x</methodName><params><param><value><dateTime.iso8601>20250319T04:16:24Z</dateTime.iso8601></value></param><param><value><double>1e3</double></value></param><param><value><base64>AA==</base64></value></param><param><value><nil/></value></param></params></methodCall>`,
		`<methodCall><methodName>`, `<<<>>>`, "\x00\xff",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := ParseRequest(bytes.NewReader(data))
		if err == nil {
			// Whatever parsed must re-encode without panicking.
			_ = EncodeSuccess(req.Params)
		}
	})
}

// FuzzDispatch feeds arbitrary calls to a live simulator's dispatcher (the
// literal param "SESSION" is replaced by a valid session): no handler may
// panic, whatever the method and arguments.
func FuzzDispatch(f *testing.F) {
	seeds := []string{
		`<methodCall><methodName>VM.get_all_records</methodName><params><param><value>SESSION</value></param></params></methodCall>`,
		`<methodCall><methodName>VM.start</methodName><params><param><value>SESSION</value></param><param><value>OpaqueRef:x</value></param><param><value><boolean>0</boolean></value></param><param><value><boolean>0</boolean></value></param></params></methodCall>`,
		`<methodCall><methodName>VDI.create</methodName><params><param><value>SESSION</value></param><param><value><struct><member><name>SR</name><value>OpaqueRef:x</value></member><member><name>virtual_size</name><value>-5</value></member></struct></value></param></params></methodCall>`,
		`<methodCall><methodName>VBD.create</methodName><params><param><value>SESSION</value></param><param><value><struct><member><name>VM</name><value><int>3</int></value></member></struct></value></param></params></methodCall>`,
		`<methodCall><methodName>event.from</methodName><params><param><value>SESSION</value></param><param><value><array><data><value>*</value></data></array></value></param><param><value></value></param><param><value><double>0.01</double></value></param></params></methodCall>`,
		`<methodCall><methodName>Async.VDI.list_changed_blocks</methodName><params><param><value>SESSION</value></param><param><value>a</value></param><param><value>b</value></param></params></methodCall>`,
		`<methodCall><methodName>pool.add_to_other_config</methodName><params><param><value>SESSION</value></param><param><value><nil/></value></param><param><value>k</value></param><param><value>v</value></param></params></methodCall>`,
		`<methodCall><methodName>session.login_with_password</methodName><params><param><value>root</value></param><param><value>xenroot</value></param></params></methodCall>`,
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	s, err := New(Config{StateDir: f.TempDir(), DiskSize: 1 << 20, FillSize: 256 << 10})
	require.NoError(f, err)
	defer func() { _ = s.Close() }()
	h := s.pools[0].Coordinator()
	s.pools[0].mu.Lock()
	sess := s.pools[0].newSession(h.Ref, "root", "fuzz")
	s.pools[0].mu.Unlock()
	f.Fuzz(func(t *testing.T, data []byte) {
		req, err := ParseRequest(bytes.NewReader(data))
		if err != nil {
			return
		}
		for i, p := range req.Params {
			if p == "SESSION" {
				req.Params[i] = sess
			}
		}
		if req.Method == "session.logout" || req.Method == "session.local_logout" {
			return // keep the session for the next inputs
		}
		ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
		defer cancel()
		resp := s.dispatch(ctx, h, req)
		if resp.Fault != nil && resp.Fault.Code == ErrInternal && len(resp.Fault.Params) > 0 {
			assert.False(t, strings.HasPrefix(resp.Fault.Params[0], "panic:"), "%s: %v", req.Method, resp.Fault)
		}
		_ = resp.Encode()
	})
}
