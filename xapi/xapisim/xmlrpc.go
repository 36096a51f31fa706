package xapisim

import (
	"bytes"
	"encoding/base64"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"
)

// This file is the simulator's own XML-RPC codec: a tolerant request parser
// (typed and untyped values, as xapi accepts them) and a response writer that
// produces xapi's exact bytes (no whitespace, untyped strings, ints as
// untyped strings, <boolean>, <double>, xapi dates).

// ErrMalformed marks a request body that is not a well-formed XML-RPC call.
var ErrMalformed = errors.New("malformed XML-RPC request")

// maxDepth bounds nesting of arrays/structs in a request.
const maxDepth = 64

// Request is a decoded XML-RPC methodCall. Param values are Go values:
// string (untyped and <string>), int64 (<int>, <i4>, <i8>), bool, float64,
// time.Time, []byte (<base64>), []any (<array>), map[string]any (<struct>)
// and nil (<nil/>).
type Request struct {
	Method string
	Params []any
}

// ParseRequest decodes an XML-RPC methodCall. It never panics; any error
// wraps ErrMalformed.
func ParseRequest(r io.Reader) (*Request, error) {
	d := xml.NewDecoder(r)
	d.Strict = true
	req := &Request{}
	root, err := nextStart(d)
	if err != nil {
		return nil, err
	}
	if root.Name.Local != "methodCall" {
		return nil, fmt.Errorf("%w: root element %q", ErrMalformed, root.Name.Local)
	}
	sawName := false
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch t.Name.Local {
			case "methodName":
				s, err := textOnly(d)
				if err != nil {
					return nil, err
				}
				req.Method = strings.TrimSpace(s)
				sawName = true
			case "params":
				ps, err := parseParams(d)
				if err != nil {
					return nil, err
				}
				req.Params = ps
			default:
				return nil, fmt.Errorf("%w: unexpected <%s>", ErrMalformed, t.Name.Local)
			}
		case xml.EndElement:
			if !sawName || req.Method == "" {
				return nil, fmt.Errorf("%w: no methodName", ErrMalformed)
			}
			return req, nil
		}
	}
}

func nextStart(d *xml.Decoder) (xml.StartElement, error) {
	for {
		tok, err := d.Token()
		if err != nil {
			return xml.StartElement{}, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		if s, ok := tok.(xml.StartElement); ok {
			return s, nil
		}
	}
}

// textOnly reads character data up to the end of the current element; a
// child element is an error.
func textOnly(d *xml.Decoder) (string, error) {
	var b strings.Builder
	for {
		tok, err := d.Token()
		if err != nil {
			return "", fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			b.Write(t)
		case xml.StartElement:
			return "", fmt.Errorf("%w: unexpected <%s> in text", ErrMalformed, t.Name.Local)
		case xml.EndElement:
			return b.String(), nil
		}
	}
}

func parseParams(d *xml.Decoder) ([]any, error) {
	out := []any{}
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if t.Name.Local != "param" {
				return nil, fmt.Errorf("%w: unexpected <%s> in params", ErrMalformed, t.Name.Local)
			}
			v, err := parseParam(d)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		case xml.EndElement:
			return out, nil
		}
	}
}

func parseParam(d *xml.Decoder) (any, error) {
	var v any
	got := false
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if t.Name.Local != "value" || got {
				return nil, fmt.Errorf("%w: unexpected <%s> in param", ErrMalformed, t.Name.Local)
			}
			v, err = parseValue(d, 0)
			if err != nil {
				return nil, err
			}
			got = true
		case xml.EndElement:
			if !got {
				return nil, fmt.Errorf("%w: empty param", ErrMalformed)
			}
			return v, nil
		}
	}
}

// parseValue is called after <value> was consumed and consumes </value>.
func parseValue(d *xml.Decoder, depth int) (any, error) {
	if depth > maxDepth {
		return nil, fmt.Errorf("%w: nesting too deep", ErrMalformed)
	}
	var text strings.Builder
	var v any
	typed := false
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			text.Write(t)
		case xml.StartElement:
			if typed {
				return nil, fmt.Errorf("%w: two types in one value", ErrMalformed)
			}
			typed = true
			v, err = parseTyped(d, t.Name.Local, depth)
			if err != nil {
				return nil, err
			}
		case xml.EndElement:
			if !typed {
				return text.String(), nil
			}
			if strings.TrimSpace(text.String()) != "" {
				return nil, fmt.Errorf("%w: text beside a typed value", ErrMalformed)
			}
			return v, nil
		}
	}
}

func parseTyped(d *xml.Decoder, tag string, depth int) (any, error) {
	switch tag {
	case "string":
		return textOnly(d)
	case "int", "i4", "i8":
		s, err := textOnly(d)
		if err != nil {
			return nil, err
		}
		n, err := strconv.ParseInt(strings.TrimSpace(s), 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: bad <%s> %q", ErrMalformed, tag, s)
		}
		return n, nil
	case "boolean":
		s, err := textOnly(d)
		if err != nil {
			return nil, err
		}
		switch strings.TrimSpace(s) {
		case "1":
			return true, nil
		case "0":
			return false, nil
		}
		return nil, fmt.Errorf("%w: bad boolean %q", ErrMalformed, s)
	case "double":
		s, err := textOnly(d)
		if err != nil {
			return nil, err
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
		if err != nil {
			return nil, fmt.Errorf("%w: bad double %q", ErrMalformed, s)
		}
		return f, nil
	case "dateTime.iso8601":
		s, err := textOnly(d)
		if err != nil {
			return nil, err
		}
		t, err := ParseDate(strings.TrimSpace(s))
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		return t, nil
	case "base64":
		s, err := textOnly(d)
		if err != nil {
			return nil, err
		}
		b, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(s), ""))
		if err != nil {
			return nil, fmt.Errorf("%w: bad base64", ErrMalformed)
		}
		return b, nil
	case "nil":
		if err := d.Skip(); err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		return nil, nil
	case "array":
		return parseArray(d, depth)
	case "struct":
		return parseStruct(d, depth)
	}
	return nil, fmt.Errorf("%w: unknown value type <%s>", ErrMalformed, tag)
}

func parseArray(d *xml.Decoder, depth int) (any, error) {
	out := []any{}
	inData := false
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch {
			case !inData && t.Name.Local == "data":
				inData = true
			case inData && t.Name.Local == "value":
				v, err := parseValue(d, depth+1)
				if err != nil {
					return nil, err
				}
				out = append(out, v)
			default:
				return nil, fmt.Errorf("%w: unexpected <%s> in array", ErrMalformed, t.Name.Local)
			}
		case xml.EndElement:
			if inData && t.Name.Local == "data" {
				inData = false
				continue
			}
			return out, nil
		}
	}
}

func parseStruct(d *xml.Decoder, depth int) (any, error) {
	out := map[string]any{}
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if t.Name.Local != "member" {
				return nil, fmt.Errorf("%w: unexpected <%s> in struct", ErrMalformed, t.Name.Local)
			}
			name, v, err := parseMember(d, depth)
			if err != nil {
				return nil, err
			}
			out[name] = v
		case xml.EndElement:
			return out, nil
		}
	}
}

func parseMember(d *xml.Decoder, depth int) (string, any, error) {
	var name string
	var v any
	gotName, gotValue := false, false
	for {
		tok, err := d.Token()
		if err != nil {
			return "", nil, fmt.Errorf("%w: %v", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			switch {
			case t.Name.Local == "name" && !gotName:
				name, err = textOnly(d)
				if err != nil {
					return "", nil, err
				}
				gotName = true
			case t.Name.Local == "value" && !gotValue:
				v, err = parseValue(d, depth+1)
				if err != nil {
					return "", nil, err
				}
				gotValue = true
			default:
				return "", nil, fmt.Errorf("%w: unexpected <%s> in member", ErrMalformed, t.Name.Local)
			}
		case xml.EndElement:
			if !gotName || !gotValue {
				return "", nil, fmt.Errorf("%w: incomplete member", ErrMalformed)
			}
			return name, v, nil
		}
	}
}

// ---- dates ----

// DateFormat is xapi's wire format for dates (UTC).
const DateFormat = "20060102T15:04:05Z"

// FormatDate renders t as xapi does: 20250319T04:16:24Z.
func FormatDate(t time.Time) string { return t.UTC().Format(DateFormat) }

// ParseDate accepts xapi's date forms, with or without hyphens and zone
// (a missing zone means UTC).
func ParseDate(s string) (time.Time, error) {
	layouts := []string{
		"20060102T15:04:05Z07:00", "20060102T15:04:05Z", "20060102T15:04:05",
		"2006-01-02T15:04:05Z07:00", "2006-01-02T15:04:05", "20060102T150405Z", "20060102T150405",
	}
	for _, l := range layouts {
		if t, err := time.Parse(l, s); err == nil {
			return t.UTC(), nil
		}
	}
	return time.Time{}, fmt.Errorf("bad date %q", s)
}

// ---- response writer ----

// I4 is encoded as <i4>, as xapi does for the rare int32 values
// (event.from valid_ref_counts).
type I4 int32

// Member is one member of an ordered struct.
type Member struct {
	Name  string
	Value any
}

// Struct is an XML-RPC struct whose members keep their order (records are
// written in datamodel field order). map[string]any and map[string]string
// are written with sorted keys.
type Struct []Member

// XMLValue is a value that is already XML-RPC text (<value>...</value>).
type XMLValue string

var xmlEscaper = strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;", "\"", "&quot;")

func writeString(b *bytes.Buffer, s string) {
	b.WriteString("<value>")
	xmlEscaper.WriteString(b, s)
	b.WriteString("</value>")
}

// EncodeValue appends v in xapi's encoding. Supported: string, int64, int,
// I4, bool, float64, time.Time, []string, []any, map[string]string,
// map[string]any, Struct, []Struct, XMLValue and nil.
func EncodeValue(b *bytes.Buffer, v any) {
	switch x := v.(type) {
	case nil:
		b.WriteString("<value><nil/></value>")
	case string:
		writeString(b, x)
	case int64:
		writeString(b, strconv.FormatInt(x, 10))
	case int:
		writeString(b, strconv.Itoa(x))
	case I4:
		b.WriteString("<value><i4>" + strconv.FormatInt(int64(x), 10) + "</i4></value>")
	case bool:
		if x {
			b.WriteString("<value><boolean>1</boolean></value>")
		} else {
			b.WriteString("<value><boolean>0</boolean></value>")
		}
	case float64:
		b.WriteString("<value><double>" + formatDouble(x) + "</double></value>")
	case time.Time:
		b.WriteString("<value><dateTime.iso8601>" + FormatDate(x) + "</dateTime.iso8601></value>")
	case []string:
		b.WriteString("<value><array><data>")
		for _, s := range x {
			writeString(b, s)
		}
		b.WriteString("</data></array></value>")
	case []any:
		b.WriteString("<value><array><data>")
		for _, e := range x {
			EncodeValue(b, e)
		}
		b.WriteString("</data></array></value>")
	case []Struct:
		b.WriteString("<value><array><data>")
		for _, e := range x {
			EncodeValue(b, e)
		}
		b.WriteString("</data></array></value>")
	case map[string]string:
		writeSortedStruct(b, x)
	case map[string]any:
		writeSortedStruct(b, x)
	case Struct:
		b.WriteString("<value><struct>")
		for _, m := range x {
			writeMember(b, m.Name, m.Value)
		}
		b.WriteString("</struct></value>")
	case XMLValue:
		b.WriteString(string(x))
	default:
		// Programming error in a handler: encode as a string rather than crash.
		writeString(b, fmt.Sprint(x))
	}
}

// writeSortedStruct writes a map as a struct with its keys sorted.
func writeSortedStruct[V any](b *bytes.Buffer, m map[string]V) {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	b.WriteString("<value><struct>")
	for _, k := range keys {
		writeMember(b, k, m[k])
	}
	b.WriteString("</struct></value>")
}

func writeMember(b *bytes.Buffer, name string, v any) {
	b.WriteString("<member><name>")
	xmlEscaper.WriteString(b, name)
	b.WriteString("</name>")
	EncodeValue(b, v)
	b.WriteString("</member>")
}

// formatDouble mimics OCaml's %.16g.
func formatDouble(f float64) string {
	return strconv.FormatFloat(f, 'g', 16, 64)
}

// ValueString returns v as an XML-RPC value string (as stored in
// task.result).
func ValueString(v any) string {
	var b bytes.Buffer
	EncodeValue(&b, v)
	return b.String()
}

const respHead = `<?xml version="1.0"?><methodResponse><params><param>`
const respTail = `</param></params></methodResponse>`

// EncodeSuccess returns xapi's bytes for a successful call.
func EncodeSuccess(v any) []byte {
	var b bytes.Buffer
	b.WriteString(respHead)
	b.WriteString("<value><struct><member><name>Status</name><value>Success</value></member><member><name>Value</name>")
	EncodeValue(&b, v)
	b.WriteString("</member></struct></value>")
	b.WriteString(respTail)
	return b.Bytes()
}

// EncodeFailure returns xapi's bytes for a failed call.
func EncodeFailure(code string, params []string) []byte {
	var b bytes.Buffer
	b.WriteString(respHead)
	b.WriteString("<value><struct><member><name>Status</name><value>Failure</value></member><member><name>ErrorDescription</name>")
	EncodeValue(&b, append([]string{code}, params...))
	b.WriteString("</member></struct></value>")
	b.WriteString(respTail)
	return b.Bytes()
}
