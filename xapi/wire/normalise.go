// Package wire rewrites XML-RPC documents as xapi writes them into a form
// that github.com/kolo/xmlrpc decodes without losing data.
//
// xapi (through ocaml-rpc) writes strings and 64-bit ints as untyped values
// (<value>text</value>), the empty string as <value></value> or <value/>, and
// null as <value><nil/></value>. kolo mis-decodes an empty untyped value in a
// struct: every later member is silently dropped. It also rejects date layouts
// other than four fixed ones. Normalise rewrites every scalar value to an
// explicit, single-text-node typed element so that kolo decodes it faithfully.
package wire

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
)

// ErrMalformed is wrapped by every error Normalise returns.
var ErrMalformed = errors.New("malformed xml-rpc document")

// Normalise returns a copy of doc in which:
//   - an untyped <value>text</value>, <value></value> and <value/> become
//     <value><string>text</string></value> (whitespace kept verbatim);
//   - <nil/> becomes an empty <string>;
//   - <dateTime.iso8601> becomes <string> (dates are parsed later, tolerantly);
//   - every other scalar (<string>, <int>, <i4>, <i8>, <boolean>, <double>,
//     <base64>) is re-emitted with its text as one escaped node;
//   - comments, processing instructions and directives are dropped.
//
// The document is read with an encoding/xml token loop, never with regular
// expressions, so nesting and escaping are handled exactly. doc may be a whole
// methodResponse/methodCall or a bare <value> fragment (as in task.result).
func Normalise(doc []byte) ([]byte, error) {
	d := xml.NewDecoder(bytes.NewReader(doc))
	var out bytes.Buffer
	out.Grow(len(doc) + len(doc)/4)
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if t.Name.Local == "value" {
				if err := normaliseValue(d, &out); err != nil {
					return nil, err
				}
				continue
			}
			out.WriteString("<" + t.Name.Local + ">")
		case xml.EndElement:
			out.WriteString("</" + t.Name.Local + ">")
		case xml.CharData:
			if err := xml.EscapeText(&out, t); err != nil {
				return nil, fmt.Errorf("%w: %w", ErrMalformed, err)
			}
		}
	}
	return out.Bytes(), nil
}

// rename maps scalar element names to the name kolo should see.
func rename(name string) string {
	switch name {
	case "nil", "dateTime.iso8601", "string":
		return "string"
	default:
		return name
	}
}

// normaliseValue is called just after a <value> start tag has been read. It
// writes the rewritten value. For a struct or array it writes "<value><struct>"
// and returns, leaving the caller's loop to copy the nested content and the
// closing tags.
func normaliseValue(d *xml.Decoder, out *bytes.Buffer) error {
	var text []byte
	for {
		tok, err := d.Token()
		if err != nil {
			return fmt.Errorf("%w: in <value>: %w", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			text = append(text, t...)
		case xml.EndElement: // </value>: an untyped scalar
			writeScalar(out, "string", text)
			return nil
		case xml.StartElement:
			if len(bytes.TrimSpace(text)) != 0 {
				return fmt.Errorf("%w: <value> mixes text and <%s>", ErrMalformed, t.Name.Local)
			}
			switch t.Name.Local {
			case "struct", "array":
				out.WriteString("<value><" + t.Name.Local + ">")
				return nil
			}
			inner, err := scalarText(d, t.Name.Local)
			if err != nil {
				return err
			}
			if t.Name.Local == "nil" {
				inner = nil
			}
			if err := expectValueEnd(d); err != nil {
				return err
			}
			writeScalar(out, rename(t.Name.Local), inner)
			return nil
		}
	}
}

// scalarText reads the text of a scalar element up to its end tag.
func scalarText(d *xml.Decoder, name string) ([]byte, error) {
	var text []byte
	for {
		tok, err := d.Token()
		if err != nil {
			return nil, fmt.Errorf("%w: in <%s>: %w", ErrMalformed, name, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			text = append(text, t...)
		case xml.EndElement:
			return text, nil
		case xml.StartElement:
			return nil, fmt.Errorf("%w: element <%s> inside scalar <%s>", ErrMalformed, t.Name.Local, name)
		}
	}
}

// expectValueEnd consumes whitespace up to </value>.
func expectValueEnd(d *xml.Decoder) error {
	for {
		tok, err := d.Token()
		if err != nil {
			return fmt.Errorf("%w: in <value>: %w", ErrMalformed, err)
		}
		switch t := tok.(type) {
		case xml.CharData:
			if len(bytes.TrimSpace(t)) != 0 {
				return fmt.Errorf("%w: text after typed scalar in <value>", ErrMalformed)
			}
		case xml.EndElement:
			return nil
		case xml.StartElement:
			return fmt.Errorf("%w: second element <%s> in <value>", ErrMalformed, t.Name.Local)
		}
	}
}

func writeScalar(out *bytes.Buffer, tag string, text []byte) {
	out.WriteString("<value><" + tag + ">")
	_ = xml.EscapeText(out, text) // bytes.Buffer writes never fail
	out.WriteString("</" + tag + "></value>")
}
