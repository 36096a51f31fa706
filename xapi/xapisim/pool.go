package xapisim

import (
	"context"
	"sync"
	"time"
)

// Pool is one simulated pool: its own database, sessions and hosts.
type Pool struct {
	sim  *Sim
	Name string

	mu    sync.Mutex // guards db, vdis and sessions
	db    *db
	vdis  map[string]*vdiState // by VDI uuid
	hosts []*Host              // coordinator first
	tasks sync.WaitGroup       // running Async calls
	// slaveLocal maps sessions made by session.slave_local_login_with_password
	// to the member host that made them (the only host they are valid on
	// over TCP; such sessions are not in xapi's database).
	slaveLocal sync.Map
	// lastDomid is the largest domid handed out (under mu): like Xen,
	// a new domain never reuses a recent domid.
	lastDomid int64
}

func newPool(s *Sim, name string) *Pool {
	p := &Pool{sim: s, Name: name, db: newDB(), vdis: map[string]*vdiState{}}
	p.db.onChange = s.markDirty
	return p
}

// Lock locks the pool's database (for extensions working on the DB
// outside a handler).
func (p *Pool) Lock() { p.mu.Lock() }

// Unlock unlocks the pool's database.
func (p *Pool) Unlock() { p.mu.Unlock() }

// Hosts returns the pool's hosts, coordinator first.
func (p *Pool) Hosts() []*Host { return p.hosts }

// Coordinator returns the pool's master host.
func (p *Pool) Coordinator() *Host {
	for _, h := range p.hosts {
		if h.master {
			return h
		}
	}
	return p.hosts[0]
}

// attachHosts builds the runtime Host list from the DB.
func (p *Pool) attachHosts() {
	p.mu.Lock()
	defer p.mu.Unlock()
	master := ""
	if pools := p.db.all("pool"); len(pools) > 0 {
		master = pools[0].str("master")
	}
	p.hosts = nil
	for _, o := range p.db.all("host") {
		h := &Host{pool: p, Ref: o.Ref, Name: o.str("name_label"), master: o.Ref == master}
		if h.master {
			p.hosts = append([]*Host{h}, p.hosts...)
		} else {
			p.hosts = append(p.hosts, h)
		}
	}
}

// ---- sessions ----

func (p *Pool) validSession(ref string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, err := p.db.get("session", ref)
	return err == nil
}

// NewSession creates a session as login_with_password does (for tests
// and extensions; the pool lock must be held).
func (p *Pool) newSession(host, user, originator string) string {
	now := time.Now().UTC().Truncate(time.Second)
	o := p.db.create("session", map[string]any{
		"this_host": host, "this_user": user, "last_active": now, "pool": false,
		"validation_time": now, "auth_user_name": user, "originator": originator,
	})
	return o.Ref
}

// ---- tasks ----

// createTask makes a task record as TaskHelper.make does.
func (p *Pool) createTask(label, description, host string) *object {
	return p.db.create("task", map[string]any{
		"name_label": label, "name_description": description,
		"created": time.Now().UTC().Truncate(time.Second), "finished": Never,
		"resident_on": host, "subtask_of": NullRef,
	})
}

// completeTask finishes a task as TaskHelper.complete / failed do.
func (p *Pool) completeTask(ref string, v any, err error) {
	o, gerr := p.db.get("task", ref)
	if gerr != nil {
		return
	}
	o.Fields["finished"] = time.Now().UTC().Truncate(time.Second)
	o.Fields["allowed_operations"] = []string{}
	if err != nil {
		f := asFault(err)
		o.Fields["error_info"] = append([]string{f.Code}, f.Params...)
		if f.Code == ErrTaskCancelled {
			o.Fields["status"] = "cancelled"
		} else {
			o.Fields["status"] = "failure"
		}
	} else {
		o.Fields["progress"] = 1.0
		o.Fields["result"] = ValueString(v)
		o.Fields["status"] = "success"
	}
	p.db.touch(o)
	// A destroy requested while running is carried out now.
	for _, op := range o.strMap("current_operations") {
		if op == "destroy" {
			p.db.destroy(o)
			break
		}
	}
}

// startAsync runs c in a new task and returns the task ref.
func (p *Pool) startAsync(c *Call, wire string) string {
	p.mu.Lock()
	t := p.createTask(wire, "", c.Host.Ref)
	p.mu.Unlock()
	c.Task = t.Ref
	c.Ctx = context.WithoutCancel(c.Ctx)
	p.tasks.Add(1)
	go func() {
		defer p.tasks.Done()
		v, err := c.run()
		p.mu.Lock()
		defer p.mu.Unlock()
		p.completeTask(t.Ref, v, err)
	}()
	return t.Ref
}

// TaskCancelled reports whether task (may be "") has a pending cancel in
// current_operations (pool lock held). Long handlers poll it.
func (p *Pool) TaskCancelled(task string) bool {
	if task == "" {
		return false
	}
	o, err := p.db.get("task", task)
	if err != nil {
		return false
	}
	for _, op := range o.strMap("current_operations") {
		if op == "cancel" {
			return true
		}
	}
	return false
}

// SetTaskProgress sets a task's progress (pool lock held; task may be "").
func (p *Pool) SetTaskProgress(task string, progress float64) {
	if o, err := p.db.get("task", task); err == nil {
		p.db.set(o, "progress", progress)
	}
}
