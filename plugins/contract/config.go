package contract

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strconv"
)

// ConfigFromJSON converts a backend's section of the pool's
// wanmotion:config (a JSON object) into the msgpack bytes Configure
// carries. Keys stay keys, so a backend decodes them into a struct with
// matching `msgpack:"..."` tags; whole numbers become integers. Empty
// input or JSON null gives nil (defaults). Anything but an object is
// ErrInvalidArgument.
func ConfigFromJSON(b []byte) ([]byte, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, nil
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("backend config: %v: %w", err, ErrInvalidArgument)
	}
	if dec.More() {
		return nil, fmt.Errorf("backend config: trailing data after the JSON object: %w", ErrInvalidArgument)
	}
	if v == nil {
		return nil, nil
	}
	if _, ok := v.(map[string]any); !ok {
		return nil, fmt.Errorf("backend config: want a JSON object, got %T: %w", v, ErrInvalidArgument)
	}
	return EncodeOpaque(normalizeJSON(v))
}

func normalizeJSON(v any) any {
	switch t := v.(type) {
	case json.Number:
		if i, err := strconv.ParseInt(string(t), 10, 64); err == nil {
			return i
		}
		f, _ := t.Float64()
		return f
	case map[string]any:
		for k, e := range t {
			t[k] = normalizeJSON(e)
		}
		return t
	case []any:
		for i, e := range t {
			t[i] = normalizeJSON(e)
		}
		return t
	}
	return v
}
