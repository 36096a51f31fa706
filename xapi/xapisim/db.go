package xapisim

import (
	"crypto/rand"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// object is one row of the simulated xapi database.
type object struct {
	Class    string
	Ref      string
	Fields   map[string]any
	Created  int64 // generation at creation
	Modified int64 // generation of the last change
}

type tombstone struct {
	Class   string
	Ref     string
	Created int64
	Deleted int64
}

// db is one pool's object database. Every method requires the owning
// Pool's mu to be held.
type db struct {
	objs  map[string]*object // by ref
	uuids map[string]*object // by uuid
	gen   int64
	// lostBefore: tombstones older than this generation were dropped, so a
	// token before it gets EVENTS_LOST.
	lostBefore int64
	tombs      []tombstone
	changed    chan struct{} // closed (and replaced) on every change
	// onChange is called on every change (schedules a save).
	onChange func()
}

func newDB() *db {
	return &db{objs: map[string]*object{}, uuids: map[string]*object{}, changed: make(chan struct{})}
}

// links maps "Child.field" to the parent class that derives a set from it
// (e.g. "VBD.VM" -> "VM" because of VM.VBDs).
var links = map[string]string{}

func initLinks() {
	for _, c := range Classes {
		for _, f := range c.Fields {
			if f.Derived != "" {
				links[f.Derived] = c.Name
			}
		}
	}
}

// NewUUID returns a random RFC 4122 version 4 UUID.
func NewUUID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// NewRef returns a fresh OpaqueRef.
func NewRef() string { return "OpaqueRef:" + NewUUID() }

func (d *db) bump() int64 {
	d.gen++
	close(d.changed)
	d.changed = make(chan struct{})
	if d.onChange != nil {
		d.onChange()
	}
	return d.gen
}

// create inserts an object of class with the given fields (others get
// defaults) and returns it.
func (d *db) create(class string, fields map[string]any) *object {
	c := Classes[class]
	o := &object{Class: class, Ref: NewRef(), Fields: map[string]any{}}
	for _, f := range c.Fields {
		if f.Derived != "" {
			continue
		}
		if v, ok := fields[f.Name]; ok {
			o.Fields[f.Name] = cloneValue(v)
		} else {
			o.Fields[f.Name] = f.zero()
		}
	}
	if o.Fields["uuid"] == "" {
		o.Fields["uuid"] = NewUUID()
	}
	if class == "VM" {
		d.ensureVMMetrics(o) // xapi creates every VM with its VM_metrics
	}
	g := d.bump()
	o.Created, o.Modified = g, g
	d.objs[o.Ref] = o
	d.uuids[o.str("uuid")] = o
	d.touchParents(o, nil)
	return o
}

// touchParents marks as modified the objects whose derived sets include o
// through a link field (optionally only the given field).
func (d *db) touchParents(o *object, only *string) {
	for _, f := range Classes[o.Class].Fields {
		if f.Kind != KRef || (only != nil && *only != f.Name) {
			continue
		}
		if _, ok := links[o.Class+"."+f.Name]; !ok {
			continue
		}
		if p, ok := d.objs[o.Fields[f.Name].(string)]; ok {
			p.Modified = d.bump()
		}
	}
}

// get returns the object ref of class, or HANDLE_INVALID.
func (d *db) get(class, ref string) (*object, error) {
	o, ok := d.objs[ref]
	if !ok || o.Class != class {
		return nil, Errorf(ErrHandleInvalid, class, ref)
	}
	return o, nil
}

// set changes one field and records the change.
func (d *db) set(o *object, field string, v any) {
	if _, isLink := links[o.Class+"."+field]; isLink {
		d.touchParents(o, &field) // old parent
	}
	o.Fields[field] = cloneValue(v)
	o.Modified = d.bump()
	if _, isLink := links[o.Class+"."+field]; isLink {
		d.touchParents(o, &field) // new parent
	}
}

// touch records a change to o without changing a field.
func (d *db) touch(o *object) { o.Modified = d.bump() }

func (d *db) destroy(o *object) {
	d.touchParents(o, nil)
	delete(d.objs, o.Ref)
	delete(d.uuids, o.str("uuid"))
	d.tombs = append(d.tombs, tombstone{Class: o.Class, Ref: o.Ref, Created: o.Created, Deleted: d.bump()})
	if len(d.tombs) > 10000 {
		d.lostBefore = d.tombs[len(d.tombs)-5000].Deleted
		d.tombs = slices.Clone(d.tombs[len(d.tombs)-5000:])
	}
}

// all returns the objects of class sorted by creation.
func (d *db) all(class string) []*object {
	var out []*object
	for _, o := range d.objs {
		if o.Class == class {
			out = append(out, o)
		}
	}
	slices.SortFunc(out, func(a, b *object) int { return int(a.Created - b.Created) })
	return out
}

// find returns objects of class whose field equals v.
func (d *db) find(class, field string, v string) []*object {
	var out []*object
	for _, o := range d.all(class) {
		if s, ok := o.Fields[field].(string); ok && s == v {
			out = append(out, o)
		}
	}
	return out
}

func (d *db) byUUID(class, uuid string) (*object, error) {
	if o, ok := d.uuids[uuid]; ok && o.Class == class {
		return o, nil
	}
	return nil, Errorf(ErrUUIDInvalid, class, uuid)
}

// value returns a field value, computing derived sets.
func (d *db) value(o *object, f Field) any {
	if f.Derived != "" {
		child, field, _ := strings.Cut(f.Derived, ".")
		refs := []string{}
		for _, c := range d.find(child, field, o.Ref) {
			refs = append(refs, c.Ref)
		}
		return refs
	}
	return cloneValue(o.Fields[f.Name])
}

// record returns o's full record in datamodel field order.
func (d *db) record(o *object) Struct {
	c := Classes[o.Class]
	rec := make(Struct, 0, len(c.Fields))
	for _, f := range c.Fields {
		rec = append(rec, Member{Name: f.Name, Value: d.value(o, f)})
	}
	return rec
}

func (o *object) str(f string) string {
	s, _ := o.Fields[f].(string)
	return s
}

func (o *object) int(f string) int64 {
	n, _ := o.Fields[f].(int64)
	return n
}

func (o *object) bool(f string) bool {
	b, _ := o.Fields[f].(bool)
	return b
}

func (o *object) strMap(f string) map[string]string {
	m, _ := o.Fields[f].(map[string]string)
	if m == nil {
		m = map[string]string{}
		o.Fields[f] = m
	}
	return m
}

func cloneValue(v any) any {
	switch x := v.(type) {
	case []string:
		return slices.Clone(x)
	case map[string]string:
		return maps.Clone(x)
	}
	return v
}

func parseInt64(s string) (int64, error) { return strconv.ParseInt(strings.TrimSpace(s), 10, 64) }

func parseFloat(s string) (float64, error) {
	return strconv.ParseFloat(strings.TrimSpace(s), 64)
}
