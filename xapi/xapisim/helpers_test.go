package xapisim

import (
	"bytes"
	"context"
	"encoding/xml"
	"io"
	"net/http"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// startSim starts a small simulator (16 MiB demo disk) in a temp dir.
func startSim(t *testing.T, dir string) *Sim {
	t.Helper()
	if dir == "" {
		dir = t.TempDir()
	}
	s, err := New(Config{StateDir: dir, DiskSize: 16 << 20, FillSize: 4 << 20, Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// rawCall posts one call and returns the raw response body.
func rawCall(t *testing.T, url, method string, params ...any) []byte {
	t.Helper()
	var b bytes.Buffer
	b.WriteString(`<?xml version="1.0"?><methodCall><methodName>` + method + `</methodName><params>`)
	for _, p := range params {
		b.WriteString("<param>")
		EncodeValue(&b, p)
		b.WriteString("</param>")
	}
	b.WriteString("</params></methodCall>")
	resp, err := http.Post(url, "text/xml", &b)
	require.NoError(t, err)
	defer func() { _ = resp.Body.Close() }()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	require.Equal(t, "text/xml", resp.Header.Get("Content-Type"))
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return body
}

// call returns (value, nil) on Success or (nil, fault) on Failure.
func call(t *testing.T, url, method string, params ...any) (any, *Fault) {
	t.Helper()
	body := rawCall(t, url, method, params...)
	d := xml.NewDecoder(bytes.NewReader(body))
	for {
		tok, err := d.Token()
		require.NoError(t, err, string(body))
		if se, ok := tok.(xml.StartElement); ok && se.Name.Local == "value" {
			v, err := parseValue(d, 0)
			require.NoError(t, err)
			m := v.(map[string]any)
			if m["Status"] == "Success" {
				return m["Value"], nil
			}
			desc := m["ErrorDescription"].([]any)
			f := &Fault{Code: desc[0].(string)}
			for _, p := range desc[1:] {
				f.Params = append(f.Params, p.(string))
			}
			return nil, f
		}
	}
}

// ok calls and requires success.
func ok(t *testing.T, url, method string, params ...any) any {
	t.Helper()
	v, f := call(t, url, method, params...)
	require.Nil(t, f, "%s: %v", method, f)
	return v
}

func login(t *testing.T, s *Sim, pool int) (url, session string) {
	t.Helper()
	pi := s.Info().Pools[pool]
	return pi.URL, ok(t, pi.URL, "session.login_with_password", pi.Username, pi.Password).(string)
}

func demoVM(t *testing.T, url, sess string) string {
	t.Helper()
	vms := ok(t, url, "VM.get_by_name_label", sess, DemoVMName).([]any)
	require.Len(t, vms, 1)
	return vms[0].(string)
}

func demoVDI(t *testing.T, url, sess string) (ref, uuid string) {
	t.Helper()
	vm := demoVM(t, url, sess)
	vbds := ok(t, url, "VM.get_VBDs", sess, vm).([]any)
	require.Len(t, vbds, 1)
	ref = ok(t, url, "VBD.get_VDI", sess, vbds[0]).(string)
	return ref, ok(t, url, "VDI.get_uuid", sess, ref).(string)
}
