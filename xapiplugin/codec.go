// Package xapiplugin is the wire codec of xapi's host-plugin protocol
// (/etc/xapi.d/plugins, xenapi-facts §2): xapi runs the plugin with one
// argument, an XML-RPC methodCall whose first parameter is the caller's
// session ref and whose second is a string→string struct; the plugin
// answers on stdout with a Status/Value (or Status/Failure) methodResponse.
//
// ParseCall decodes argv[1] as xapi's xml-light printer writes it (untyped
// <value>text</value> strings, no prolog) and as Python's xmlrpc.client
// writes it (<string> wrappers, a prolog, whitespace between elements).
// Success and Failure encode responses byte for byte as XenAPIPlugin.py's
// xmlrpc.client.dumps(..., methodresponse=True) followed by print().
package xapiplugin

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
	"unicode/utf8"
)

// MaxCallSize bounds the methodCall accepted by ParseCall (Linux limits one
// argv string to 128 KiB; TLS material for an agent fits easily).
const MaxCallSize = 1 << 20

// ErrMalformed is wrapped by every ParseCall error.
var ErrMalformed = errors.New("xapiplugin: malformed plugin call")

// Call is one decoded plugin invocation.
type Call struct {
	// Method is the plugin function (host.call_plugin's fn).
	Method string
	// Session is the caller's session ref. It is a credential: never log it.
	Session string
	// Args is host.call_plugin's args map.
	Args map[string]string
}

// LooksLikeCall reports cheaply whether s could be a methodCall (the
// command line of a binary that is also a CLI: only a string starting with
// an XML prolog or <methodCall is taken for one).
func LooksLikeCall(s string) bool {
	t := strings.TrimLeft(s, " \t\r\n")
	return strings.HasPrefix(t, "<methodCall") || strings.HasPrefix(t, "<?xml")
}

// ParseCall decodes a plugin's argv[1]. It requires exactly two params: a
// string session ref ("OpaqueRef:..." ) and a struct of strings.
func ParseCall(s string) (Call, error) {
	var c Call
	if len(s) > MaxCallSize {
		return c, fmt.Errorf("%w: %d bytes (limit %d)", ErrMalformed, len(s), MaxCallSize)
	}
	if !utf8.ValidString(s) {
		return c, fmt.Errorf("%w: not UTF-8", ErrMalformed)
	}
	d := xml.NewDecoder(strings.NewReader(s))
	d.Strict = true
	root, err := nextStart(d)
	if err != nil {
		return c, err
	}
	if root.Name.Local != "methodCall" {
		return c, fmt.Errorf("%w: root element <%s>, want <methodCall>", ErrMalformed, root.Name.Local)
	}
	var params []value
	sawName := false
	for {
		tok, err := nextElem(d)
		if err != nil {
			return c, err
		}
		if tok.end {
			break // </methodCall>
		}
		switch tok.start.Name.Local {
		case "methodName":
			if sawName {
				return c, fmt.Errorf("%w: two <methodName>", ErrMalformed)
			}
			sawName = true
			if c.Method, err = text(d); err != nil {
				return c, err
			}
		case "params":
			if params != nil {
				return c, fmt.Errorf("%w: two <params>", ErrMalformed)
			}
			if params, err = readParams(d); err != nil {
				return c, err
			}
		default:
			return c, fmt.Errorf("%w: unexpected <%s> in <methodCall>", ErrMalformed, tok.start.Name.Local)
		}
	}
	if err := trailing(d); err != nil {
		return c, err
	}
	c.Method = strings.TrimSpace(c.Method)
	if c.Method == "" {
		return c, fmt.Errorf("%w: no method name", ErrMalformed)
	}
	if len(params) != 2 {
		return c, fmt.Errorf("%w: %d params, want 2 (session, args)", ErrMalformed, len(params))
	}
	if params[0].isStruct {
		return c, fmt.Errorf("%w: param 1 (session) is not a string", ErrMalformed)
	}
	c.Session = strings.TrimSpace(params[0].str)
	if !strings.HasPrefix(c.Session, "OpaqueRef:") {
		return c, fmt.Errorf("%w: param 1 is not a session ref", ErrMalformed)
	}
	if !params[1].isStruct {
		return c, fmt.Errorf("%w: param 2 (args) is not a struct", ErrMalformed)
	}
	c.Args = params[1].members
	return c, nil
}

// value is a decoded XML-RPC value: a string or a struct of strings.
type value struct {
	str      string
	isStruct bool
	members  map[string]string
}

type elem struct {
	start xml.StartElement
	end   bool
}

// nextElem returns the next start or end element, skipping whitespace,
// comments and processing instructions; other text is an error.
func nextElem(d *xml.Decoder) (elem, error) {
	for {
		tok, err := d.Token()
		if err != nil {
			return elem{}, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			return elem{start: t.Copy()}, nil
		case xml.EndElement:
			return elem{end: true}, nil
		case xml.CharData:
			if len(bytes.TrimSpace(t)) != 0 {
				return elem{}, fmt.Errorf("%w: unexpected text %q", ErrMalformed, truncate(string(t)))
			}
		case xml.Directive:
			return elem{}, fmt.Errorf("%w: unexpected directive", ErrMalformed)
		}
	}
}

func nextStart(d *xml.Decoder) (xml.StartElement, error) {
	e, err := nextElem(d)
	if err != nil {
		return xml.StartElement{}, err
	}
	if e.end {
		return xml.StartElement{}, fmt.Errorf("%w: unexpected end element", ErrMalformed)
	}
	return e.start, nil
}

// trailing accepts only whitespace after the root element.
func trailing(d *xml.Decoder) error {
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		if cd, ok := tok.(xml.CharData); ok && len(bytes.TrimSpace(cd)) == 0 {
			continue
		}
		if _, ok := tok.(xml.Comment); ok {
			continue
		}
		return fmt.Errorf("%w: data after </methodCall>", ErrMalformed)
	}
}

// text reads character data up to the end of the current element (no
// child elements allowed).
func text(d *xml.Decoder) (string, error) {
	var b strings.Builder
	for {
		tok, err := d.Token()
		if err != nil {
			return "", fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			b.Write(t)
		case xml.EndElement:
			return b.String(), nil
		case xml.StartElement:
			return "", fmt.Errorf("%w: unexpected <%s> in text", ErrMalformed, t.Name.Local)
		}
	}
}

func readParams(d *xml.Decoder) ([]value, error) {
	out := []value{}
	for {
		e, err := nextElem(d)
		if err != nil {
			return nil, err
		}
		if e.end {
			return out, nil
		}
		if e.start.Name.Local != "param" {
			return nil, fmt.Errorf("%w: unexpected <%s> in <params>", ErrMalformed, e.start.Name.Local)
		}
		v, err := readWrappedValue(d, true)
		if err != nil {
			return nil, err
		}
		if e, err = nextElem(d); err != nil {
			return nil, err
		} else if !e.end {
			return nil, fmt.Errorf("%w: more than one value in <param>", ErrMalformed)
		}
		out = append(out, v)
		if len(out) > 2 {
			return nil, fmt.Errorf("%w: more than 2 params", ErrMalformed)
		}
	}
}

// readWrappedValue reads <value>...</value> (the start tag included).
func readWrappedValue(d *xml.Decoder, allowStruct bool) (value, error) {
	s, err := nextStart(d)
	if err != nil {
		return value{}, err
	}
	if s.Name.Local != "value" {
		return value{}, fmt.Errorf("%w: <%s>, want <value>", ErrMalformed, s.Name.Local)
	}
	return readValueBody(d, allowStruct)
}

// readValueBody reads what follows <value> up to and including </value>:
// text (an untyped string), <string>, or (when allowed) a <struct> of
// string members.
func readValueBody(d *xml.Decoder, allowStruct bool) (value, error) {
	var txt strings.Builder
	var v value
	typed := false
	for {
		tok, err := d.Token()
		if err != nil {
			return value{}, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			txt.Write(t)
		case xml.EndElement:
			if !typed {
				v.str = txt.String()
			} else if len(strings.TrimSpace(txt.String())) != 0 {
				return value{}, fmt.Errorf("%w: text beside a typed value", ErrMalformed)
			}
			return v, nil
		case xml.StartElement:
			if typed {
				return value{}, fmt.Errorf("%w: two types in one <value>", ErrMalformed)
			}
			typed = true
			switch t.Name.Local {
			case "string":
				if v.str, err = text(d); err != nil {
					return value{}, err
				}
			case "struct":
				if !allowStruct {
					return value{}, fmt.Errorf("%w: nested struct (args must be strings)", ErrMalformed)
				}
				v.isStruct = true
				if v.members, err = readStruct(d); err != nil {
					return value{}, err
				}
			default:
				return value{}, fmt.Errorf("%w: <%s> value (only strings are passed to plugins)", ErrMalformed, t.Name.Local)
			}
		}
	}
}

func readStruct(d *xml.Decoder) (map[string]string, error) {
	out := map[string]string{}
	for {
		e, err := nextElem(d)
		if err != nil {
			return nil, err
		}
		if e.end {
			return out, nil
		}
		if e.start.Name.Local != "member" {
			return nil, fmt.Errorf("%w: <%s> in <struct>", ErrMalformed, e.start.Name.Local)
		}
		var name *string
		var val *value
		for {
			m, err := nextElem(d)
			if err != nil {
				return nil, err
			}
			if m.end {
				break
			}
			switch m.start.Name.Local {
			case "name":
				if name != nil {
					return nil, fmt.Errorf("%w: two <name> in a member", ErrMalformed)
				}
				n, err := text(d)
				if err != nil {
					return nil, err
				}
				name = &n
			case "value":
				if val != nil {
					return nil, fmt.Errorf("%w: two <value> in a member", ErrMalformed)
				}
				v, err := readValueBody(d, false)
				if err != nil {
					return nil, err
				}
				val = &v
			default:
				return nil, fmt.Errorf("%w: <%s> in <member>", ErrMalformed, m.start.Name.Local)
			}
		}
		if name == nil || val == nil {
			return nil, fmt.Errorf("%w: member without name or value", ErrMalformed)
		}
		if _, dup := out[*name]; dup {
			return nil, fmt.Errorf("%w: duplicate member %q", ErrMalformed, truncate(*name))
		}
		out[*name] = val.str
	}
}

func truncate(s string) string {
	if len(s) > 40 {
		return s[:40] + "..."
	}
	return s
}

// Success is the response of a function that returned value, exactly as
// XenAPIPlugin.py prints it (xmlrpc.client.dumps + print's newline).
func Success(value string) []byte {
	var b bytes.Buffer
	head(&b)
	member(&b, "Status", "<value><string>Success</string></value>\n")
	member(&b, "Value", stringValue(value))
	tail(&b)
	return b.Bytes()
}

// Failure is the response of a failed function: xapi raises the API error
// code with params (ErrorDescription = [code, params...]).
func Failure(code string, params ...string) []byte {
	var b bytes.Buffer
	head(&b)
	member(&b, "Status", "<value><string>Failure</string></value>\n")
	var arr strings.Builder
	arr.WriteString("<value><array><data>\n")
	for _, s := range append([]string{code}, params...) {
		arr.WriteString(stringValue(s))
	}
	arr.WriteString("</data></array></value>\n")
	member(&b, "ErrorDescription", arr.String())
	tail(&b)
	return b.Bytes()
}

func head(b *bytes.Buffer) {
	b.WriteString("<?xml version='1.0'?>\n<methodResponse>\n<params>\n<param>\n<value><struct>\n")
}

func tail(b *bytes.Buffer) {
	b.WriteString("</struct></value>\n</param>\n</params>\n</methodResponse>\n\n")
}

func member(b *bytes.Buffer, name, val string) {
	b.WriteString("<member>\n<name>")
	b.WriteString(name)
	b.WriteString("</name>\n")
	b.WriteString(val)
	b.WriteString("</member>\n")
}

func stringValue(s string) string {
	return "<value><string>" + Escape(s) + "</string></value>\n"
}

// Escape escapes s as xmlrpc.client does (&, <, >) and replaces what XML
// cannot carry at all (invalid UTF-8, control characters other than tab,
// newline and carriage return) with U+FFFD, so the response always parses.
func Escape(s string) string {
	var b strings.Builder
	for i, r := range s {
		switch {
		case r == '&':
			b.WriteString("&amp;")
		case r == '<':
			b.WriteString("&lt;")
		case r == '>':
			b.WriteString("&gt;")
		case r == utf8.RuneError && isInvalidAt(s, i):
			b.WriteRune('\uFFFD')
		case !xmlChar(r):
			b.WriteRune('\uFFFD')
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func isInvalidAt(s string, i int) bool {
	r, n := utf8.DecodeRuneInString(s[i:])
	return r == utf8.RuneError && n <= 1
}

// xmlChar is the XML 1.0 Char production.
func xmlChar(r rune) bool {
	return r == 0x09 || r == 0x0A || r == 0x0D ||
		(r >= 0x20 && r <= 0xD7FF) || (r >= 0xE000 && r <= 0xFFFD) || (r >= 0x10000 && r <= 0x10FFFF)
}
