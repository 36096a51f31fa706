package xapisim

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
)

// Param is one declared parameter of an API method (the session is not
// listed).
type Param struct {
	Name string
	Kind Kind
	// Default, when HasDefault, lets a caller omit this (trailing) param.
	Default    any
	HasDefault bool
}

// Method is one row of the method table. system.listMethods, parameter
// checking, MESSAGE_PARAMETER_COUNT_MISMATCH and Async dispatch all come
// from this table.
type Method struct {
	// Name is the wire name, "Class.method".
	Name   string
	Params []Param
	// NoSession methods (session.login_with_password) take no session ref.
	NoSession bool
	// NoAsync marks calls flagged `Session in the datamodel (task.*,
	// event.from, VDI.get_nbd_info): they have no Async. form.
	NoAsync bool
	// Unlocked handlers are called without the pool lock held (they lock
	// it themselves around DB access); all others run under Pool.mu.
	Unlocked bool
	// Handler does the work. It returns a value for EncodeValue, or an
	// error (a *Fault becomes a Failure response).
	Handler func(c *Call) (any, error)
}

// Call is the context of one API call given to a handler.
type Call struct {
	Ctx     context.Context
	Sim     *Sim
	Pool    *Pool
	Host    *Host // the host whose listener received the call
	Session string
	Method  *Method
	Args    []any // converted per Method.Params, defaults filled
	// Task is the task ref when the call runs as Async.; "" otherwise.
	Task string
}

// Str returns argument i as a string.
func (c *Call) Str(i int) string { s, _ := c.Args[i].(string); return s }

// Int returns argument i as an int64.
func (c *Call) Int(i int) int64 { n, _ := c.Args[i].(int64); return n }

// Bool returns argument i as a bool.
func (c *Call) Bool(i int) bool { b, _ := c.Args[i].(bool); return b }

// Float returns argument i as a float64.
func (c *Call) Float(i int) float64 { f, _ := c.Args[i].(float64); return f }

// Map returns argument i as a string map.
func (c *Call) Map(i int) map[string]string { m, _ := c.Args[i].(map[string]string); return m }

// Set returns argument i as a string set.
func (c *Call) Set(i int) []string { s, _ := c.Args[i].([]string); return s }

// Record returns argument i as a decoded struct (constructors).
func (c *Call) Record(i int) map[string]any { m, _ := c.Args[i].(map[string]any); return m }

// DB gives handlers the pool's database (the pool lock must be held).
func (c *Call) db() *db { return c.Pool.db }

// methods is the method table, by wire name.
var methods = map[string]*Method{}

// Register adds (or replaces) a method in the table. Call it from a
// function given to addRegistrar (package-level `var _ = addRegistrar(f)`),
// so it runs after the generic per-class methods and before any request;
// the table must not change once the simulator serves.
func Register(m *Method) { methods[m.Name] = m }

// p builds a Param; a trailing "=default" text gives a default.
func p(name string, k Kind) Param { return Param{Name: name, Kind: k} }

func pd(name string, k Kind, def any) Param {
	return Param{Name: name, Kind: k, Default: def, HasDefault: true}
}

// MethodNames returns every wire name (what system.listMethods returns).
func MethodNames() []string {
	names := make([]string, 0, len(methods)+1)
	for n := range methods {
		names = append(names, n)
	}
	names = append(names, "system.listMethods")
	sort.Strings(names)
	return names
}

// lookup resolves a wire name, accepting the Class_method alternative.
func lookup(name string) (*Method, bool) {
	if m, ok := methods[name]; ok {
		return m, true
	}
	if !strings.Contains(name, ".") {
		if cls, meth, ok := strings.Cut(name, "_"); ok {
			if m, ok := methods[cls+"."+meth]; ok {
				return m, true
			}
		}
	}
	return nil, false
}

// convert checks and converts a decoded XML-RPC value to kind k.
func convert(v any, k Kind) (any, bool) {
	switch k {
	case KAny:
		return v, true
	case KString, KRef, KEnum:
		s, ok := v.(string)
		if v == nil {
			return "", true
		}
		return s, ok
	case KInt:
		switch x := v.(type) {
		case int64:
			return x, true
		case string:
			n, err := parseInt64(x)
			return n, err == nil
		}
	case KFloat:
		switch x := v.(type) {
		case float64:
			return x, true
		case int64:
			return float64(x), true
		case string:
			f, err := parseFloat(x)
			return f, err == nil
		}
	case KBool:
		b, ok := v.(bool)
		return b, ok
	case KDate:
		switch x := v.(type) {
		case time.Time:
			return x, true
		case string:
			t, err := ParseDate(x)
			return t, err == nil
		}
	case KSet, KRefSet:
		arr, ok := v.([]any)
		if !ok {
			return nil, false
		}
		out := make([]string, 0, len(arr))
		for _, e := range arr {
			s, ok := e.(string)
			if !ok {
				return nil, false
			}
			out = append(out, s)
		}
		return out, true
	case KMap:
		m, ok := v.(map[string]any)
		if !ok {
			return nil, false
		}
		out := make(map[string]string, len(m))
		for key, e := range m {
			switch x := e.(type) {
			case string:
				out[key] = x
			case int64:
				out[key] = strconv.FormatInt(x, 10)
			case nil:
				out[key] = ""
			default:
				return nil, false
			}
		}
		return out, true
	}
	return nil, false
}

// Response is the outcome of dispatching one call.
type Response struct {
	Value any
	Fault *Fault
}

// Encode returns the response's wire bytes.
func (r Response) Encode() []byte {
	if r.Fault != nil {
		return EncodeFailure(r.Fault.Code, r.Fault.Params)
	}
	return EncodeSuccess(r.Value)
}

// dispatch runs one decoded request received by host h.
func (s *Sim) dispatch(ctx context.Context, h *Host, req *Request) Response {
	name := req.Method
	if name == "system.listMethods" {
		return Response{Value: MethodNames()}
	}
	async := false
	if rest, ok := strings.CutPrefix(name, "Async."); ok {
		async = true
		name = rest
	}
	m, ok := lookup(name)
	if !ok {
		return Response{Fault: Errorf(ErrMethodUnknown, req.Method)}
	}
	params := req.Params
	required := 0
	for _, p := range m.Params {
		if !p.HasDefault {
			required++
		}
	}
	given := len(params)
	if !m.NoSession {
		given--
	}
	if given < required || given > len(m.Params) {
		// As gen_server.ml: the name without Async., the mandatory count,
		// and len(params) minus the session (so -1 when even it is missing).
		return Response{Fault: Errorf(ErrParamCountMismatch, name, strconv.Itoa(required), strconv.Itoa(given))}
	}
	c := &Call{Ctx: ctx, Sim: s, Pool: h.pool, Host: h, Method: m}
	sess := ""
	if !m.NoSession {
		sess, _ = params[0].(string)
		params = params[1:]
	}
	// gen_server.ml order: unmarshal the arguments, check the session,
	// then do_dispatch refuses Async of `Session-flagged calls.
	c.Args = make([]any, len(m.Params))
	for i, p := range m.Params {
		if i >= len(params) {
			c.Args[i] = cloneValue(p.Default)
			continue
		}
		v, ok := convert(params[i], p.Kind)
		if !ok {
			return Response{Fault: Errorf(ErrFieldTypeError, p.Name)}
		}
		c.Args[i] = v
	}
	if !m.NoSession {
		if !h.pool.validSession(sess) {
			return Response{Fault: Errorf(ErrSessionInvalid, sess)}
		}
		// A pool member serves API calls only to its local socket (xapi
		// forwards those to the coordinator) and to its own slave-local
		// sessions; over TCP anything else is HOST_IS_SLAVE (xen-api
		// api_server.ml, session_check.ml). The simulator's own sim.*
		// methods are answered anywhere.
		if !h.master && !isLocalConn(ctx) && !strings.HasPrefix(name, "sim.") {
			if lh, ok := h.pool.slaveLocal.Load(sess); !ok || lh != h.Ref {
				return Response{Fault: Errorf(ErrHostIsSlave, h.pool.Coordinator().Address())}
			}
		}
		c.Session = sess
	}
	if async && m.NoAsync {
		return Response{Fault: Errorf("Fault", "No async mode for this operation (rpc: "+name+")")}
	}
	if async {
		ref := h.pool.startAsync(c, req.Method)
		return Response{Value: ref}
	}
	v, err := c.run()
	if err != nil {
		return Response{Fault: asFault(err)}
	}
	return Response{Value: v}
}

// run calls the handler with the pool lock as the method requires.
func (c *Call) run() (v any, err error) {
	defer func() {
		if r := recover(); r != nil {
			// A handler bug must not kill the simulator; it is logged and
			// reported as xapi reports unexpected exceptions.
			c.Sim.log.Error("handler panicked", "method", c.Method.Name, "panic", fmt.Sprint(r))
			err = Errorf(ErrInternal, "panic: "+fmt.Sprint(r))
		}
	}()
	if !c.Method.Unlocked {
		c.Pool.mu.Lock()
		defer c.Pool.mu.Unlock()
	}
	return c.Method.Handler(c)
}

// ---- generic per-class methods ----

func registerGeneric() {
	for _, cn := range classOrder {
		c := Classes[cn]
		Register(&Method{Name: cn + ".get_all", Handler: func(call *Call) (any, error) {
			refs := []string{}
			for _, o := range call.db().all(cn) {
				refs = append(refs, o.Ref)
			}
			return refs, nil
		}})
		Register(&Method{Name: cn + ".get_all_records", Handler: func(call *Call) (any, error) {
			out := map[string]any{}
			for _, o := range call.db().all(cn) {
				out[o.Ref] = call.db().record(o)
			}
			return out, nil
		}})
		Register(&Method{Name: cn + ".get_record", Params: []Param{p("self", KRef)}, Handler: func(call *Call) (any, error) {
			o, err := call.db().get(cn, call.Str(0))
			if err != nil {
				return nil, err
			}
			return call.db().record(o), nil
		}})
		Register(&Method{Name: cn + ".get_by_uuid", Params: []Param{p("uuid", KString)}, Handler: func(call *Call) (any, error) {
			o, err := call.db().byUUID(cn, call.Str(0))
			if err != nil {
				return nil, err
			}
			return o.Ref, nil
		}})
		if nameLabelled(c) {
			Register(&Method{Name: cn + ".get_by_name_label", Params: []Param{p("label", KString)}, Handler: func(call *Call) (any, error) {
				refs := []string{}
				for _, o := range call.db().find(cn, "name_label", call.Str(0)) {
					refs = append(refs, o.Ref)
				}
				return refs, nil
			}})
		}
		for _, f := range c.Fields {
			Register(&Method{Name: cn + ".get_" + f.Name, Params: []Param{p("self", KRef)}, Handler: func(call *Call) (any, error) {
				o, err := call.db().get(cn, call.Str(0))
				if err != nil {
					return nil, err
				}
				return call.db().value(o, f), nil
			}})
			if !f.RW {
				continue
			}
			Register(&Method{Name: cn + ".set_" + f.Name, Params: []Param{p("self", KRef), p("value", f.Kind)}, Handler: func(call *Call) (any, error) {
				o, err := call.db().get(cn, call.Str(0))
				if err != nil {
					return nil, err
				}
				call.db().set(o, f.Name, call.Args[1])
				return "", nil
			}})
			switch f.Kind {
			case KMap:
				Register(&Method{Name: cn + ".add_to_" + f.Name, Params: []Param{p("self", KRef), p("key", KString), p("value", KString)}, Handler: func(call *Call) (any, error) {
					o, err := call.db().get(cn, call.Str(0))
					if err != nil {
						return nil, err
					}
					return "", call.db().addToMap(o, f.Name, call.Str(1), call.Str(2))
				}})
				Register(&Method{Name: cn + ".remove_from_" + f.Name, Params: []Param{p("self", KRef), p("key", KString)}, Handler: func(call *Call) (any, error) {
					o, err := call.db().get(cn, call.Str(0))
					if err != nil {
						return nil, err
					}
					call.db().removeFromMap(o, f.Name, call.Str(1))
					return "", nil
				}})
			case KSet:
				sing := strings.TrimSuffix(f.Name, "s")
				Register(&Method{Name: cn + ".add_" + sing, Params: []Param{p("self", KRef), p("value", KString)}, Handler: func(call *Call) (any, error) {
					o, err := call.db().get(cn, call.Str(0))
					if err != nil {
						return nil, err
					}
					set := o.Fields[f.Name].([]string)
					if !slices.Contains(set, call.Str(1)) {
						call.db().set(o, f.Name, append(slices.Clone(set), call.Str(1)))
					}
					return "", nil
				}})
				Register(&Method{Name: cn + ".remove_" + sing, Params: []Param{p("self", KRef), p("value", KString)}, Handler: func(call *Call) (any, error) {
					o, err := call.db().get(cn, call.Str(0))
					if err != nil {
						return nil, err
					}
					set := o.Fields[f.Name].([]string)
					if i := slices.Index(set, call.Str(1)); i >= 0 {
						call.db().set(o, f.Name, slices.Delete(slices.Clone(set), i, i+1))
					}
					return "", nil
				}})
			}
		}
	}
}

// addToMap implements add_to_<field>: MAP_DUPLICATE_KEY if key exists.
func (d *db) addToMap(o *object, field, key, value string) error {
	m := o.strMap(field)
	if _, ok := m[key]; ok {
		return Errorf(ErrMapDuplicateKey, o.Class, field, o.str("uuid"), key)
	}
	m[key] = value
	d.touch(o)
	return nil
}

// removeFromMap implements remove_from_<field>; a missing key is a no-op.
func (d *db) removeFromMap(o *object, field, key string) {
	m := o.strMap(field)
	if _, ok := m[key]; ok {
		delete(m, key)
		d.touch(o)
	}
}

type localConnKey struct{}

// localConnHandler marks requests that came in on a host's local unix
// socket (where a member forwards to the coordinator).
func localConnHandler(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), localConnKey{}, true)))
	})
}

func isLocalConn(ctx context.Context) bool {
	v, _ := ctx.Value(localConnKey{}).(bool)
	return v
}
