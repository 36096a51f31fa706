package xapi

import (
	"bytes"
	"context"
	"encoding/xml"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// wireInt marks an <int>/<i4>/<i8> parameter in a parsed request, so tests
// can tell a typed int from a decimal string.
type wireInt int64

// parseCall parses an XML-RPC methodCall into its method name and params,
// keeping the wire types: string, wireInt, bool, float64, []any,
// map[string]any.
func parseCall(body []byte) (string, []any, error) {
	d := xml.NewDecoder(bytes.NewReader(body))
	var method string
	var params []any
	sawParams := false
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", nil, err
		}
		se, ok := tok.(xml.StartElement)
		if !ok {
			continue
		}
		switch se.Name.Local {
		case "methodName":
			var s string
			if err := d.DecodeElement(&s, &se); err != nil {
				return "", nil, err
			}
			method = s
		case "params":
			sawParams = true
		case "value":
			v, err := parseValue(d)
			if err != nil {
				return "", nil, err
			}
			params = append(params, v)
		}
	}
	if !sawParams {
		return "", nil, fmt.Errorf("no <params> element")
	}
	return method, params, nil
}

// parseValue parses after a <value> start up to its end.
func parseValue(d *xml.Decoder) (any, error) {
	var text strings.Builder
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, err
		}
		switch t := tok.(type) {
		case xml.CharData:
			text.Write(t)
		case xml.EndElement:
			return text.String(), nil
		case xml.StartElement:
			var v any
			switch t.Name.Local {
			case "struct":
				m := map[string]any{}
				for {
					tok, err := d.Token()
					if err != nil {
						return nil, err
					}
					if _, end := tok.(xml.EndElement); end {
						break
					}
					mem, ok := tok.(xml.StartElement)
					if !ok || mem.Name.Local != "member" {
						continue
					}
					var name string
					for {
						tok, err := d.Token()
						if err != nil {
							return nil, err
						}
						if s, ok := tok.(xml.StartElement); ok && s.Name.Local == "name" {
							if err := d.DecodeElement(&name, &s); err != nil {
								return nil, err
							}
						} else if ok && s.Name.Local == "value" {
							mv, err := parseValue(d)
							if err != nil {
								return nil, err
							}
							m[name] = mv
						} else if _, end := tok.(xml.EndElement); end {
							break
						}
					}
				}
				v = m
			case "array":
				var a []any
				depth := 0
				for {
					tok, err := d.Token()
					if err != nil {
						return nil, err
					}
					if s, ok := tok.(xml.StartElement); ok {
						if s.Name.Local == "value" {
							av, err := parseValue(d)
							if err != nil {
								return nil, err
							}
							a = append(a, av)
						} else {
							depth++
						}
					} else if _, end := tok.(xml.EndElement); end {
						if depth == 0 {
							break
						}
						depth--
					}
				}
				if a == nil {
					a = []any{}
				}
				v = a
			default:
				var s string
				if err := d.DecodeElement(&s, &t); err != nil {
					return nil, err
				}
				switch t.Name.Local {
				case "int", "i4", "i8":
					i, err := strconv.ParseInt(s, 10, 64)
					if err != nil {
						return nil, err
					}
					v = wireInt(i)
				case "boolean":
					v = s == "1"
				case "double":
					f, err := strconv.ParseFloat(s, 64)
					if err != nil {
						return nil, err
					}
					v = f
				default:
					v = s
				}
			}
			if err := d.Skip(); err != nil { // up to </value>
				return nil, err
			}
			return v, nil
		}
	}
}

// xv encodes a Go value the way xapi (ocaml-rpc, non-strict) does.
func xv(v any) string {
	var b strings.Builder
	var enc func(v any)
	enc = func(v any) {
		switch t := v.(type) {
		case string:
			var e bytes.Buffer
			_ = xml.EscapeText(&e, []byte(t))
			b.WriteString("<value>" + e.String() + "</value>")
		case bool:
			if t {
				b.WriteString("<value><boolean>1</boolean></value>")
			} else {
				b.WriteString("<value><boolean>0</boolean></value>")
			}
		case float64:
			b.WriteString("<value><double>" + strconv.FormatFloat(t, 'g', 16, 64) + "</double></value>")
		case []any:
			b.WriteString("<value><array><data>")
			for _, e := range t {
				enc(e)
			}
			b.WriteString("</data></array></value>")
		case [][2]any: // ordered struct
			b.WriteString("<value><struct>")
			for _, kv := range t {
				b.WriteString("<member><name>" + kv[0].(string) + "</name>")
				enc(kv[1])
				b.WriteString("</member>")
			}
			b.WriteString("</struct></value>")
		case nil:
			b.WriteString("<value><nil/></value>")
		default:
			panic(fmt.Sprintf("xv: %T", v))
		}
	}
	enc(v)
	return b.String()
}

func successXML(value string) string {
	return `<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>` +
		value + `</member></struct></value></param></params></methodResponse>`
}

func failureXML(code string, params ...string) string {
	items := []any{code}
	for _, p := range params {
		items = append(items, p)
	}
	return `<?xml version="1.0"?><methodResponse><params><param><value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name>` +
		xv(items) + `</member></struct></value></param></params></methodResponse>`
}

type recordedCall struct {
	Method string
	Params []any
	Body   string
}

// fakeXapi is a scripted XML-RPC server: handle returns the raw response body
// for each call. It records every call.
type fakeXapi struct {
	t      *testing.T
	srv    *httptest.Server
	mu     sync.Mutex
	calls  []recordedCall
	handle func(method string, params []any) string
}

func newFake(t *testing.T, handle func(method string, params []any) string) *fakeXapi {
	return newFakeOn(t, "127.0.0.1:0", false, handle)
}

func newFakeOn(t *testing.T, addr string, useTLS bool, handle func(method string, params []any) string) *fakeXapi {
	t.Helper()
	f := &fakeXapi{t: t, handle: handle}
	ln, err := net.Listen("tcp", addr)
	require.NoError(t, err)
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(f.serve))
	_ = f.srv.Listener.Close()
	f.srv.Listener = ln
	if useTLS {
		f.srv.StartTLS()
	} else {
		f.srv.Start()
	}
	t.Cleanup(f.srv.Close)
	return f
}

func (f *fakeXapi) serve(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(r.Body)
	if err != nil {
		http.Error(w, err.Error(), 400)
		return
	}
	method, params, err := parseCall(body)
	if err != nil {
		http.Error(w, "bad call: "+err.Error(), 400)
		return
	}
	f.mu.Lock()
	f.calls = append(f.calls, recordedCall{Method: method, Params: params, Body: string(body)})
	f.mu.Unlock()
	w.Header().Set("Content-Type", "text/xml")
	_, _ = io.WriteString(w, f.handle(method, params))
}

func (f *fakeXapi) URL() string { return f.srv.URL }

func (f *fakeXapi) Calls() []recordedCall {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]recordedCall(nil), f.calls...)
}

func (f *fakeXapi) count(method string) int {
	n := 0
	for _, c := range f.Calls() {
		if c.Method == method {
			n++
		}
	}
	return n
}

// loginOK answers login/logout and host.get_all_records (empty); other
// methods go to next.
func loginOK(session string, next func(method string, params []any) string) func(string, []any) string {
	return func(method string, params []any) string {
		switch method {
		case "session.login_with_password":
			return successXML(xv(session))
		case "session.logout":
			return successXML(xv(""))
		case "host.get_all_records":
			return successXML(xv([][2]any{}))
		}
		return next(method, params)
	}
}

func newTestClient(t *testing.T, url string, mod ...func(*Config)) *Client {
	t.Helper()
	cfg := Config{URL: url, Username: "root", Password: "secret", Logger: testutil.Logger(t)}
	for _, m := range mod {
		m(&cfg)
	}
	c, err := New(cfg)
	require.NoError(t, err)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5e9)
		defer cancel()
		_ = c.Close(ctx)
	})
	return c
}
