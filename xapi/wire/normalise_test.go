package wire

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"testing"

	"github.com/kolo/xmlrpc"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestNormalise(t *testing.T) {
	tests := []struct {
		name, in, want string
	}{
		{"untyped", `<value>Success</value>`, `<value><string>Success</string></value>`},
		{"empty pair", `<value></value>`, `<value><string></string></value>`},
		{"self closing", `<value/>`, `<value><string></string></value>`},
		{"whitespace kept", `<value>  a b </value>`, `<value><string>  a b </string></value>`},
		{"escapes", `<value>a&amp;b&lt;c&gt;"</value>`, `<value><string>a&amp;b&lt;c&gt;&#34;</string></value>`},
		{"nil", `<value><nil/></value>`, `<value><string></string></value>`},
		{"typed string", `<value><string>x</string></value>`, `<value><string>x</string></value>`},
		{"empty typed string", `<value><string/></value>`, `<value><string></string></value>`},
		{"date", `<value><dateTime.iso8601>20250319T04:16:24Z</dateTime.iso8601></value>`, `<value><string>20250319T04:16:24Z</string></value>`},
		{"i4 kept", `<value><i4>3</i4></value>`, `<value><i4>3</i4></value>`},
		{"boolean", `<value><boolean>1</boolean></value>`, `<value><boolean>1</boolean></value>`},
		{"double", `<value><double>0.5</double></value>`, `<value><double>0.5</double></value>`},
		{"cdata", `<value><![CDATA[a<b]]></value>`, `<value><string>a&lt;b</string></value>`},
		{"python style", "<value><struct>\n<member>\n<name>k</name>\n<value><string>v</string></value>\n</member>\n</struct></value>",
			"<value><struct>&#xA;<member>&#xA;<name>k</name>&#xA;<value><string>v</string></value>&#xA;</member>&#xA;</struct></value>"},
		{"typed with whitespace", "<value>\n <int>7</int>\n</value>", `<value><int>7</int></value>`},
		{"array", `<value><array><data><value>a</value><value></value><value/></data></array></value>`,
			`<value><array><data><value><string>a</string></value><value><string></string></value><value><string></string></value></data></array></value>`},
		{"prolog and comment dropped", `<?xml version="1.0"?><!-- c --><methodResponse><params><param><value>x</value></param></params></methodResponse>`,
			`<methodResponse><params><param><value><string>x</string></value></param></params></methodResponse>`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Normalise([]byte(tt.in))
			require.NoError(t, err)
			assert.Equal(t, tt.want, string(got))
		})
	}
}

func TestNormaliseRejectsMalformed(t *testing.T) {
	for _, in := range []string{
		`<value>`,
		`<value>a<string>b</string></value>`,
		`<value><string>a</string><string>b</string></value>`,
		`<value><string><x/></string></value>`,
		`<value><int>1</int>junk</value>`,
		`<a></b>`,
	} {
		_, err := Normalise([]byte(in))
		require.Error(t, err, in)
		assert.True(t, errors.Is(err, ErrMalformed), in)
	}
}

// vmRec mirrors how a typed client would decode a record with kolo.
type vmRec struct {
	UUID       string `xmlrpc:"uuid"`
	NameDesc   string `xmlrpc:"name_description"`
	NameLabel  string `xmlrpc:"name_label"`
	PowerState string `xmlrpc:"power_state"`
	MemMax     string `xmlrpc:"memory_static_max"`
}

// xapi-style bytes: untyped values, an empty member in the middle.
const recordDoc = `<?xml version="1.0"?><methodResponse><params><param><value><struct>` +
	`<member><name>uuid</name><value>0b2f</value></member>` +
	`<member><name>name_description</name><value></value></member>` +
	`<member><name>name_label</name><value>demo-vm</value></member>` +
	`<member><name>power_state</name><value>Running</value></member>` +
	`<member><name>memory_static_max</name><value>4294967296</value></member>` +
	`</struct></value></param></params></methodResponse>`

// TestKoloTruncatesEmptyMembers is the regression test for the data loss the
// normaliser exists to prevent: kolo decodes the raw bytes without an error
// but drops every member after the empty one. If kolo is ever fixed the first
// half fails, which is the cue to revisit the normaliser.
func TestKoloTruncatesEmptyMembers(t *testing.T) {
	var raw vmRec
	require.NoError(t, xmlrpc.Response(recordDoc).Unmarshal(&raw), "kolo reports no error")
	assert.Equal(t, "0b2f", raw.UUID)
	assert.Empty(t, raw.NameLabel, "kolo silently truncates after <value></value>")
	assert.Empty(t, raw.PowerState)
	assert.Empty(t, raw.MemMax)

	norm, err := Normalise([]byte(recordDoc))
	require.NoError(t, err)
	var rec vmRec
	require.NoError(t, xmlrpc.Response(norm).Unmarshal(&rec))
	assert.Equal(t, vmRec{UUID: "0b2f", NameDesc: "", NameLabel: "demo-vm", PowerState: "Running", MemMax: "4294967296"}, rec)
}

func TestKoloStringSetWithEmptyElement(t *testing.T) {
	doc := `<value><array><data><value>a</value><value></value><value>b</value><value>c</value></data></array></value>`
	var raw []string
	require.NoError(t, xmlrpc.Response(doc).Unmarshal(&raw))
	assert.NotEqual(t, []string{"a", "", "b", "c"}, raw, "kolo loses elements without normalisation")

	norm, err := Normalise([]byte(doc))
	require.NoError(t, err)
	var got []string
	require.NoError(t, xmlrpc.Response(norm).Unmarshal(&got))
	assert.Equal(t, []string{"a", "", "b", "c"}, got)
}

// wellFormed reads a document to the end with encoding/xml.
func wellFormed(b []byte) error {
	d := xml.NewDecoder(bytes.NewReader(b))
	for {
		_, err := d.Token()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

func FuzzNormalise(f *testing.F) {
	f.Add([]byte(recordDoc))
	f.Add([]byte(`<value><nil/></value>`))
	f.Fuzz(func(t *testing.T, in []byte) {
		out, err := Normalise(in)
		if err != nil {
			return
		}
		require.NoError(t, wellFormed(out), "output must be well-formed")
		again, err := Normalise(out)
		require.NoError(t, err)
		assert.Equal(t, string(out), string(again), "normalising is idempotent")
		var v any
		_ = xmlrpc.Response(out).Unmarshal(&v) // must not panic
	})
}
