package xapisim

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"sort"
	"strconv"
	"time"
)

// JSON-RPC on POST /jsonrpc, as xapi's Api_server.jsoncallback
// (xenapi-facts §9): the same methods and positional params as XML-RPC;
// ints are JSON numbers, dates strings; errors use code 1 with the xapi
// error code as message (v2) or an array (v1, no "jsonrpc" member).

type jsonRequest struct {
	JSONRPC string          `json:"jsonrpc"`
	Method  string          `json:"method"`
	Params  []any           `json:"params"`
	ID      json.RawMessage `json:"id"`
}

func (s *Sim) serveJSONRPC(h *Host, w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Access-Control-Allow-Origin", "*")
	if r.Method == http.MethodOptions {
		w.Header().Set("Access-Control-Allow-Methods", "POST, OPTIONS")
		w.Header().Set("Access-Control-Allow-Headers", "content-type")
		w.WriteHeader(http.StatusOK)
		return
	}
	if r.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	var jr jsonRequest
	d := json.NewDecoder(io.LimitReader(r.Body, maxRequestBody))
	d.UseNumber()
	var resp Response
	if err := d.Decode(&jr); err != nil || jr.Method == "" {
		resp = Response{Fault: Errorf(ErrInternal, fmt.Sprintf("malformed JSON-RPC request: %v", err))}
	} else {
		params := make([]any, len(jr.Params))
		for i, p := range jr.Params {
			params[i] = fromJSON(p)
		}
		resp = s.dispatch(r.Context(), h, &Request{Method: jr.Method, Params: params})
	}
	id := jr.ID
	if len(id) == 0 {
		id = json.RawMessage("null")
	}
	var b bytes.Buffer
	switch {
	case jr.JSONRPC == "2.0" && resp.Fault != nil:
		b.WriteString(`{"jsonrpc":"2.0","error":{"code":1,"message":`)
		encodeJSON(&b, resp.Fault.Code)
		b.WriteString(`,"data":`)
		encodeJSON(&b, append([]string{}, resp.Fault.Params...))
		b.WriteString(`},"id":`)
	case jr.JSONRPC == "2.0":
		b.WriteString(`{"jsonrpc":"2.0","result":`)
		encodeJSON(&b, resp.Value)
		b.WriteString(`,"id":`)
	case resp.Fault != nil:
		b.WriteString(`{"result":null,"error":`)
		encodeJSON(&b, append([]string{resp.Fault.Code}, resp.Fault.Params...))
		b.WriteString(`,"id":`)
	default:
		b.WriteString(`{"result":`)
		encodeJSON(&b, resp.Value)
		b.WriteString(`,"error":null,"id":`)
	}
	b.Write(id)
	b.WriteString("}")
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(b.Len()))
	_, _ = w.Write(b.Bytes())
}

// fromJSON converts a decoded JSON value to the XML-RPC parser's Go types.
func fromJSON(v any) any {
	switch x := v.(type) {
	case json.Number:
		if n, err := x.Int64(); err == nil {
			return n
		}
		f, _ := x.Float64()
		return f
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = fromJSON(e)
		}
		return out
	case map[string]any:
		out := make(map[string]any, len(x))
		for k, e := range x {
			out[k] = fromJSON(e)
		}
		return out
	}
	return v
}

// encodeJSON writes v (the same Go values EncodeValue takes) as xapi's
// JSON: ints as numbers, dates as xapi date strings, records in order.
func encodeJSON(b *bytes.Buffer, v any) {
	switch x := v.(type) {
	case nil:
		b.WriteString("null")
	case string:
		s, _ := json.Marshal(x)
		b.Write(s)
	case int64:
		b.WriteString(strconv.FormatInt(x, 10))
	case int:
		b.WriteString(strconv.Itoa(x))
	case I4:
		b.WriteString(strconv.FormatInt(int64(x), 10))
	case bool:
		b.WriteString(strconv.FormatBool(x))
	case float64:
		switch {
		case math.IsNaN(x):
			b.WriteString("NaN")
		case math.IsInf(x, 1):
			b.WriteString("Infinity")
		case math.IsInf(x, -1):
			b.WriteString("-Infinity")
		default:
			b.WriteString(strconv.FormatFloat(x, 'g', -1, 64))
		}
	case time.Time:
		encodeJSON(b, FormatDate(x))
	case XMLValue:
		encodeJSON(b, string(x))
	case []string:
		b.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				b.WriteByte(',')
			}
			encodeJSON(b, e)
		}
		b.WriteByte(']')
	case []any:
		b.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				b.WriteByte(',')
			}
			encodeJSON(b, e)
		}
		b.WriteByte(']')
	case []Struct:
		b.WriteByte('[')
		for i, e := range x {
			if i > 0 {
				b.WriteByte(',')
			}
			encodeJSON(b, e)
		}
		b.WriteByte(']')
	case map[string]string:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		st := make(Struct, 0, len(keys))
		for _, k := range keys {
			st = append(st, Member{k, x[k]})
		}
		encodeJSON(b, st)
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		st := make(Struct, 0, len(keys))
		for _, k := range keys {
			st = append(st, Member{k, x[k]})
		}
		encodeJSON(b, st)
	case Struct:
		b.WriteByte('{')
		for i, m := range x {
			if i > 0 {
				b.WriteByte(',')
			}
			encodeJSON(b, m.Name)
			b.WriteByte(':')
			encodeJSON(b, m.Value)
		}
		b.WriteByte('}')
	default:
		encodeJSON(b, fmt.Sprint(x))
	}
}
