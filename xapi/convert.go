package xapi

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"math"
	"reflect"
	"strconv"
	"strings"
	"time"
)

// Decoding happens in two steps: kolo decodes the normalised XML into generic
// values (string, bool, float64, int64, []any, map[string]any; nil for an
// empty string), then fromWire converts them into the typed destination with
// the rules of the official SDK's Convert* templates.

var (
	timeType   = reflect.TypeFor[time.Time]()
	enumIface  = reflect.TypeFor[enum]()
	anyType    = reflect.TypeFor[any]()
	genMapType = reflect.TypeFor[map[string]any]()
)

// fromWire converts src into *dst. path names the value in errors, e.g.
// "VM.get_record -> .memory_static_max".
func fromWire(path string, src any, dst any) error {
	v := reflect.ValueOf(dst)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return fmt.Errorf("xapi: decode %s: destination must be a non-nil pointer", path)
	}
	return convert(path, src, v.Elem())
}

func mismatch(path string, want string, src any) error {
	return protocolErrorf("decode %s: want %s, got %T", path, want, src)
}

func convert(path string, src any, dst reflect.Value) error {
	t := dst.Type()
	switch {
	case t == timeType:
		s, ok := src.(string)
		if src == nil {
			s, ok = "", true
		}
		if tt, isTime := src.(time.Time); isTime {
			dst.Set(reflect.ValueOf(tt.UTC()))
			return nil
		}
		if !ok {
			return mismatch(path, "date", src)
		}
		tt, err := ParseDate(s)
		if err != nil {
			return protocolErrorf("decode %s: date %q: %v", path, s, err)
		}
		dst.Set(reflect.ValueOf(tt))
		return nil
	case t == anyType:
		dst.Set(reflect.ValueOf(fillEmpty(src)))
		return nil
	case t.Kind() == reflect.String && t.Implements(enumIface):
		s, err := asString(path, src)
		if err != nil {
			return err
		}
		dst.SetString(parseEnum(s, reflect.Zero(t).Interface().(enum).enumValues()))
		return nil
	}
	switch t.Kind() {
	case reflect.String:
		s, err := asString(path, src)
		if err != nil {
			return err
		}
		dst.SetString(s)
	case reflect.Bool:
		switch s := src.(type) {
		case bool:
			dst.SetBool(s)
		case string:
			if strings.TrimSpace(s) == "" {
				dst.SetBool(false)
				return nil
			}
			b, err := strconv.ParseBool(strings.TrimSpace(s))
			if err != nil {
				return mismatch(path, "bool", src)
			}
			dst.SetBool(b)
		case nil:
			dst.SetBool(false)
		default:
			return mismatch(path, "bool", src)
		}
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		i, err := asInt(path, src)
		if err != nil {
			return err
		}
		if dst.OverflowInt(i) {
			return protocolErrorf("decode %s: %d overflows %s", path, i, t)
		}
		dst.SetInt(i)
	case reflect.Float32, reflect.Float64:
		switch s := src.(type) {
		case float64:
			dst.SetFloat(s)
		case int64:
			dst.SetFloat(float64(s))
		case string:
			if strings.TrimSpace(s) == "" {
				dst.SetFloat(0)
				return nil
			}
			f, err := strconv.ParseFloat(strings.TrimSpace(s), 64)
			if err != nil {
				return mismatch(path, "float", src)
			}
			dst.SetFloat(f)
		case nil:
			dst.SetFloat(0)
		default:
			return mismatch(path, "float", src)
		}
	case reflect.Slice:
		var items []any
		switch s := src.(type) {
		case []any:
			items = s
		case nil:
		case string:
			if s != "" {
				return mismatch(path, "array", src)
			}
		default:
			return mismatch(path, "array", src)
		}
		out := reflect.MakeSlice(t, len(items), len(items))
		for i, it := range items {
			if err := convert(fmt.Sprintf("%s[%d]", path, i), it, out.Index(i)); err != nil {
				return err
			}
		}
		dst.Set(out)
	case reflect.Map:
		if t.Key().Kind() != reflect.String {
			return fmt.Errorf("xapi: decode %s: unsupported map key %s", path, t.Key())
		}
		var m map[string]any
		switch s := src.(type) {
		case map[string]any:
			m = s
		case nil:
		default:
			return mismatch(path, "struct", src)
		}
		out := reflect.MakeMapWithSize(t, len(m))
		for k, v := range m {
			ev := reflect.New(t.Elem()).Elem()
			if err := convert(path+"["+k+"]", v, ev); err != nil {
				return err
			}
			kv := reflect.New(t.Key()).Elem()
			kv.SetString(k)
			out.SetMapIndex(kv, ev)
		}
		dst.Set(out)
	case reflect.Struct:
		var m map[string]any
		switch s := src.(type) {
		case map[string]any:
			m = s
		case nil:
		default:
			return mismatch(path, "struct", src)
		}
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := f.Tag.Get("xapi")
			name, _, _ = strings.Cut(name, ",")
			if name == "" || name == "-" || !f.IsExported() {
				continue
			}
			v, ok := m[name]
			if !ok {
				continue
			}
			if err := convert(path+" -> ."+name, v, dst.Field(i)); err != nil {
				return err
			}
		}
	case reflect.Pointer:
		if src == nil {
			return nil
		}
		nv := reflect.New(t.Elem())
		if err := convert(path, src, nv.Elem()); err != nil {
			return err
		}
		dst.Set(nv)
	default:
		return fmt.Errorf("xapi: decode %s: unsupported destination %s", path, t)
	}
	return nil
}

func asString(path string, src any) (string, error) {
	switch s := src.(type) {
	case string:
		return s, nil
	case nil:
		return "", nil
	case int64:
		return strconv.FormatInt(s, 10), nil
	default:
		return "", mismatch(path, "string", src)
	}
}

func asInt(path string, src any) (int64, error) {
	switch s := src.(type) {
	case int64:
		return s, nil
	case string:
		s = strings.TrimSpace(s)
		if s == "" {
			return 0, nil
		}
		if i, err := strconv.ParseInt(s, 10, 64); err == nil {
			return i, nil
		}
		f, err := strconv.ParseFloat(s, 64)
		if err != nil || f != math.Trunc(f) || math.Abs(f) > 1<<63 {
			return 0, mismatch(path, "int", src)
		}
		return int64(f), nil
	case float64:
		if s != math.Trunc(s) || math.Abs(s) > 1<<63 {
			return 0, mismatch(path, "int", src)
		}
		return int64(s), nil
	case nil:
		return 0, nil
	default:
		return 0, mismatch(path, "int", src)
	}
}

// fillEmpty replaces the nils kolo produces for empty strings by "" (xapi
// never sends a real null for an API value) and copies containers.
func fillEmpty(v any) any {
	switch t := v.(type) {
	case nil:
		return ""
	case []any:
		out := make([]any, len(t))
		for i, e := range t {
			out[i] = fillEmpty(e)
		}
		return out
	case map[string]any:
		out := make(map[string]any, len(t))
		for k, e := range t {
			out[k] = fillEmpty(e)
		}
		return out
	default:
		return v
	}
}

// toWire converts a Go argument into a value kolo encodes the way xapi
// expects: strings (refs and enums included) as strings, ints as decimal
// strings (xapi's int is 64-bit and travels as a string), floats as <double>,
// bools as <boolean>, time.Time as a xapi date string, slices as arrays, and
// string-keyed maps and tagged structs as <struct>. Map keys are XML-escaped
// here because kolo writes them verbatim.
func toWire(v any) (any, error) {
	if v == nil {
		return nil, fmt.Errorf("xapi: encode: nil argument")
	}
	return toWireValue(reflect.ValueOf(v))
}

func toWireValue(v reflect.Value) (any, error) {
	if v.Type() == timeType {
		return FormatDate(v.Interface().(time.Time)), nil
	}
	switch v.Kind() {
	case reflect.String:
		return v.String(), nil
	case reflect.Bool:
		return v.Bool(), nil
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return strconv.FormatInt(v.Int(), 10), nil
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return strconv.FormatUint(v.Uint(), 10), nil
	case reflect.Float32, reflect.Float64:
		return v.Float(), nil
	case reflect.Slice, reflect.Array:
		out := make([]any, v.Len())
		for i := range out {
			e, err := toWireValue(v.Index(i))
			if err != nil {
				return nil, err
			}
			out[i] = e
		}
		return out, nil
	case reflect.Map:
		if v.Type().Key().Kind() != reflect.String {
			return nil, fmt.Errorf("xapi: encode: map key %s is not a string kind", v.Type().Key())
		}
		out := make(map[string]any, v.Len())
		it := v.MapRange()
		for it.Next() {
			e, err := toWireValue(it.Value())
			if err != nil {
				return nil, err
			}
			out[escapeKey(it.Key().String())] = e
		}
		return out, nil
	case reflect.Struct:
		out := map[string]any{}
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name, opts, _ := strings.Cut(f.Tag.Get("xapi"), ",")
			if name == "" || name == "-" || !f.IsExported() {
				continue
			}
			if opts == "omitempty" && v.Field(i).IsZero() {
				continue
			}
			e, err := toWireValue(v.Field(i))
			if err != nil {
				return nil, err
			}
			out[escapeKey(name)] = e
		}
		return out, nil
	case reflect.Interface, reflect.Pointer:
		if v.IsNil() {
			return nil, fmt.Errorf("xapi: encode: nil %s", v.Type())
		}
		return toWireValue(v.Elem())
	default:
		return nil, fmt.Errorf("xapi: encode: unsupported type %s", v.Type())
	}
}

func escapeKey(k string) string {
	var b bytes.Buffer
	_ = xml.EscapeText(&b, []byte(k))
	return b.String()
}
