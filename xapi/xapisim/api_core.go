package xapisim

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// registrars are the functions that fill the method table; each api_*.go
// file adds its own with addRegistrar. Generic per-class methods are
// registered first, so explicit handlers override them.
var registrars []func()

func addRegistrar(f func()) bool { registrars = append(registrars, f); return true }

// init builds the schema and the method table in a fixed order (Go runs
// init functions per file in name order, so there is only this one).
func init() {
	initSchema()
	initLinks()
	registerGeneric()
	for _, f := range registrars {
		f()
	}
}

var _ = addRegistrar(registerCore)

func registerCore() {
	// ---- session ----
	Register(&Method{Name: "session.login_with_password", NoSession: true,
		Params: []Param{p("uname", KString), p("pwd", KString), pd("version", KString, "1.1"), pd("originator", KString, "")},
		Handler: func(c *Call) (any, error) {
			if !c.Host.master {
				return nil, Errorf(ErrHostIsSlave, c.Pool.Coordinator().Address())
			}
			return c.login()
		}})
	Register(&Method{Name: "session.slave_local_login_with_password", NoSession: true,
		Params: []Param{p("uname", KString), p("pwd", KString)},
		Handler: func(c *Call) (any, error) {
			ref, err := c.login()
			if err == nil {
				c.Pool.slaveLocal.Store(ref, c.Host.Ref)
			}
			return ref, err
		}})
	Register(&Method{Name: "session.logout", Handler: logout})
	Register(&Method{Name: "session.local_logout", Handler: logout})

	// ---- task ----
	Register(&Method{Name: "task.create", NoAsync: true, Params: []Param{p("label", KString), p("description", KString)},
		Handler: func(c *Call) (any, error) {
			return c.Pool.createTask(c.Str(0), c.Str(1), c.Host.Ref).Ref, nil
		}})
	Register(&Method{Name: "task.destroy", NoAsync: true, Params: []Param{p("self", KRef)},
		Handler: func(c *Call) (any, error) {
			o, err := c.db().get("task", c.Str(0))
			if err != nil {
				return nil, err
			}
			if o.str("status") == "pending" || o.str("status") == "cancelling" {
				// Xapi_task.destroy: add_to_current_operations key "task"
				// (a second destroy is MAP_DUPLICATE_KEY).
				return "", c.db().addToMap(o, "current_operations", "task", "destroy")
			}
			c.db().destroy(o)
			return "", nil
		}})
	Register(&Method{Name: "task.cancel", NoAsync: true, Params: []Param{p("task", KRef)},
		Handler: func(c *Call) (any, error) {
			o, err := c.db().get("task", c.Str(0))
			if err != nil {
				return nil, err
			}
			// Xapi_task.cancel checks only who may touch the task, not
			// its status, and replaces current_operations with
			// {<calling task>: cancel}.
			c.db().set(o, "current_operations", map[string]string{NewRef(): "cancel"})
			return "", nil
		}})
	Register(&Method{Name: "task.set_status", NoAsync: true, Params: []Param{p("self", KRef), p("value", KEnum)},
		Handler: func(c *Call) (any, error) {
			o, err := c.db().get("task", c.Str(0))
			if err != nil {
				return nil, err
			}
			v := strings.ToLower(c.Str(1))
			if !slices.Contains([]string{"pending", "success", "failure", "cancelling", "cancelled"}, v) {
				return nil, Errorf(ErrInvalidValue, "value", c.Str(1))
			}
			// Xapi_task.set_status sets the status only: finished (and
			// progress) are left alone, so a task a client finishes
			// this way keeps finished = 19700101T00:00:00Z.
			c.db().set(o, "status", v)
			return "", nil
		}})
	Register(&Method{Name: "task.set_progress", NoAsync: true, Params: []Param{p("self", KRef), p("value", KFloat)},
		Handler: taskSetter("progress")})
	Register(&Method{Name: "task.set_result", NoAsync: true, Params: []Param{p("self", KRef), p("value", KString)},
		Handler: taskSetter("result")})
	Register(&Method{Name: "task.set_error_info", NoAsync: true, Params: []Param{p("self", KRef), p("value", KSet)},
		Handler: taskSetter("error_info")})
	Register(&Method{Name: "task.set_resident_on", NoAsync: true, Params: []Param{p("self", KRef), p("value", KRef)},
		Handler: taskSetter("resident_on")})
	for name, m := range methods {
		if strings.HasPrefix(name, "task.") {
			m.NoAsync = true
		}
	}

	// ---- event ----
	Register(&Method{Name: "event.from", NoAsync: true, Unlocked: true,
		Params:  []Param{p("classes", KSet), p("token", KString), p("timeout", KFloat)},
		Handler: eventFrom})
	Register(&Method{Name: "event.inject", Params: []Param{p("class", KString), p("ref", KString)},
		Handler: func(c *Call) (any, error) {
			cls, ok := classByLower(c.Str(0))
			if !ok {
				return nil, Errorf(ErrHandleInvalid, c.Str(0), c.Str(1))
			}
			o, err := c.db().get(cls, c.Str(1))
			if err != nil {
				return nil, err
			}
			c.db().touch(o)
			return formatToken(c.db().gen - 1), nil
		}})
	Register(&Method{Name: "event.get_current_id", Handler: func(c *Call) (any, error) {
		return c.db().gen, nil
	}})

	// ---- network ----
	for _, op := range []string{"add_purpose", "remove_purpose"} {
		Register(&Method{Name: "network." + op, Params: []Param{p("self", KRef), p("value", KEnum)},
			Handler: func(c *Call) (any, error) {
				o, err := c.db().get("network", c.Str(0))
				if err != nil {
					return nil, err
				}
				v := strings.ToLower(c.Str(1))
				if v != "nbd" && v != "insecure_nbd" {
					return nil, Errorf(ErrInvalidValue, "purpose", c.Str(1))
				}
				set := slices.Clone(o.Fields["purpose"].([]string))
				i := slices.Index(set, v)
				switch {
				case op == "add_purpose" && i < 0:
					other := map[string]string{"nbd": "insecure_nbd", "insecure_nbd": "nbd"}[v]
					if slices.Contains(set, other) {
						return nil, Errorf("NETWORK_INCOMPATIBLE_PURPOSES", v, other)
					}
					set = append(set, v)
				case op == "remove_purpose" && i >= 0:
					set = slices.Delete(set, i, i+1)
				default:
					return "", nil
				}
				c.db().set(o, "purpose", set)
				return "", nil
			}})
	}
	Register(&Method{Name: "network.create", Params: []Param{p("args", KAny)}, Handler: func(c *Call) (any, error) {
		fields, err := recordFields("network", c.Record(0))
		if err != nil {
			return nil, err
		}
		if fields["bridge"] == nil {
			fields["bridge"] = fmt.Sprintf("xapi%d", len(c.db().all("network")))
		}
		return c.db().create("network", fields).Ref, nil
	}})
	Register(&Method{Name: "network.destroy", Params: []Param{p("self", KRef)}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("network", c.Str(0))
		if err != nil {
			return nil, err
		}
		if len(c.db().find("VIF", "network", o.Ref)) > 0 || len(c.db().find("PIF", "network", o.Ref)) > 0 {
			return nil, Errorf("NETWORK_CONTAINS_VIF", o.Ref)
		}
		c.db().destroy(o)
		return "", nil
	}})

	// ---- host / pool helpers ----
	Register(&Method{Name: "host.get_servertime", Params: []Param{p("host", KRef)}, Handler: func(c *Call) (any, error) {
		if _, err := c.db().get("host", c.Str(0)); err != nil {
			return nil, err
		}
		return time.Now().UTC().Truncate(time.Second), nil
	}})
}

func taskSetter(field string) func(c *Call) (any, error) {
	return func(c *Call) (any, error) {
		o, err := c.db().get("task", c.Str(0))
		if err != nil {
			return nil, err
		}
		c.db().set(o, field, c.Args[1])
		return "", nil
	}
}

func (c *Call) login() (any, error) {
	cfg := c.Sim.cfg
	if c.Str(0) != cfg.Username || c.Str(1) != cfg.Password {
		return nil, Errorf(ErrAuthFailed, c.Str(0), "Authentication failure")
	}
	originator := ""
	if len(c.Args) > 3 {
		originator = c.Str(3)
	}
	return c.Pool.newSession(c.Host.Ref, c.Str(0), originator), nil
}

func logout(c *Call) (any, error) {
	if o, err := c.db().get("session", c.Session); err == nil {
		c.db().destroy(o)
	}
	return "", nil
}

// recordFields converts a constructor's struct argument into DB fields of
// class cls (unknown members are ignored, as xapi ignores extra fields).
func recordFields(cls string, rec map[string]any) (map[string]any, error) {
	c := Classes[cls]
	out := map[string]any{}
	for _, f := range c.Fields {
		if f.Derived != "" || f.Name == "uuid" {
			continue
		}
		v, ok := rec[f.Name]
		if !ok {
			continue
		}
		k := f.Kind
		cv, ok := convert(v, k)
		if !ok {
			return nil, Errorf(ErrFieldTypeError, f.Name)
		}
		out[f.Name] = cv
	}
	return out, nil
}

func classByLower(s string) (string, bool) {
	for _, n := range classOrder {
		if strings.EqualFold(n, s) {
			return n, true
		}
	}
	return "", false
}
