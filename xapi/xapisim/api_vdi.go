package xapisim

import (
	"encoding/base64"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

var _ = addRegistrar(registerVDI)

func registerVDI() {
	self := p("self", KRef)
	Register(&Method{Name: "VDI.create", Params: []Param{p("args", KAny)}, Handler: vdiCreate})
	Register(&Method{Name: "VDI.destroy", Params: []Param{self}, Handler: vdiDestroy})
	Register(&Method{Name: "VDI.snapshot", Unlocked: true, Params: []Param{p("vdi", KRef), pd("driver_params", KMap, map[string]string{})},
		Handler: func(c *Call) (any, error) { return c.Pool.copyVDI(c.Str(0), copySnapshot, "", "") }})
	Register(&Method{Name: "VDI.clone", Unlocked: true, Params: []Param{p("vdi", KRef), pd("driver_params", KMap, map[string]string{})},
		Handler: func(c *Call) (any, error) { return c.Pool.copyVDI(c.Str(0), copyClone, "", "") }})
	Register(&Method{Name: "VDI.copy", Unlocked: true,
		Params:  []Param{p("vdi", KRef), pd("sr", KRef, NullRef), pd("base_vdi", KRef, NullRef), pd("into_vdi", KRef, NullRef)},
		Handler: func(c *Call) (any, error) { return c.Pool.copyVDI(c.Str(0), copyCopy, c.Str(1), c.Str(3)) }})
	Register(&Method{Name: "VDI.enable_cbt", Params: []Param{self}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("VDI", c.Str(0))
		if err != nil {
			return nil, err
		}
		if o.str("type") == "cbt_metadata" {
			return nil, Errorf(ErrVDIIncompatibleType, o.Ref, "cbt_metadata")
		}
		st := c.Pool.state(o.str("uuid"))
		if !o.bool("is_a_snapshot") && (st.ChainID == "" || !o.bool("cbt_enabled")) {
			st.ChainID = NewUUID()
			st.Seq = 0
			st.Bitmap = make([]byte, bitmapLen(o.int("virtual_size")))
		}
		if !o.bool("cbt_enabled") {
			c.db().set(o, "cbt_enabled", true)
		}
		return "", nil
	}})
	Register(&Method{Name: "VDI.disable_cbt", Params: []Param{self}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("VDI", c.Str(0))
		if err != nil {
			return nil, err
		}
		if !o.bool("is_a_snapshot") {
			st := c.Pool.state(o.str("uuid"))
			st.ChainID, st.Bitmap, st.Seq = "", nil, 0
		}
		if o.bool("cbt_enabled") {
			c.db().set(o, "cbt_enabled", false)
		}
		return "", nil
	}})
	Register(&Method{Name: "VDI.data_destroy", Params: []Param{self}, Handler: func(c *Call) (any, error) {
		o, err := c.db().get("VDI", c.Str(0))
		if err != nil {
			return nil, err
		}
		if o.str("type") == "cbt_metadata" {
			return "", nil
		}
		if !o.bool("is_a_snapshot") || !o.bool("cbt_enabled") {
			return nil, Errorf(ErrVDINoCBTMetadata, o.Ref)
		}
		if c.Pool.vdiAttached(o) {
			return nil, Errorf(ErrVDIInUse, o.Ref, "data_destroy")
		}
		if err := os.Remove(c.Pool.vdiPath(o)); err != nil && !os.IsNotExist(err) {
			return nil, Errorf(ErrInternal, err.Error())
		}
		o.Fields["type"] = "cbt_metadata"
		o.Fields["physical_utilisation"] = int64(0)
		c.db().touch(o)
		return "", nil
	}})
	Register(&Method{Name: "VDI.list_changed_blocks", Params: []Param{p("vdi_from", KRef), p("vdi_to", KRef)},
		Handler: func(c *Call) (any, error) {
			bm, err := c.Pool.changedBlocks(c.Str(0), c.Str(1))
			if err != nil {
				return nil, err
			}
			return base64.StdEncoding.EncodeToString(bm), nil
		}})
}

// vdiAttached reports whether a VBD attaches the VDI (pool lock held).
func (p *Pool) vdiAttached(o *object) bool {
	for _, vbd := range p.db.find("VBD", "VDI", o.Ref) {
		if vbd.bool("currently_attached") {
			return true
		}
	}
	return false
}

func vdiCreate(c *Call) (any, error) {
	fields, err := recordFields("VDI", c.Record(0))
	if err != nil {
		return nil, err
	}
	sr, _ := fields["SR"].(string)
	if _, err := c.db().get("SR", sr); err != nil {
		return nil, err
	}
	size, _ := fields["virtual_size"].(int64)
	if size < 0 {
		return nil, Errorf(ErrInvalidValue, "virtual_size", "negative")
	}
	o, err := c.Pool.CreateVDI(sr, size, fields)
	if err != nil {
		return nil, err
	}
	return o, nil
}

// CreateVDI creates a VDI record and its sparse backing file (pool lock
// held). fields may set any VDI field; content_id is generated.
func (p *Pool) CreateVDI(srRef string, size int64, fields map[string]any) (string, error) {
	if fields == nil {
		fields = map[string]any{}
	}
	uuid := NewUUID()
	fields["uuid"] = uuid
	fields["location"] = uuid
	fields["virtual_size"] = size
	fields["SR"] = srRef
	oc, _ := fields["other_config"].(map[string]string)
	if oc == nil {
		oc = map[string]string{}
	}
	if oc["content_id"] == "" {
		oc["content_id"] = NewUUID()
	}
	fields["other_config"] = oc
	fields["cbt_enabled"] = false
	fields["is_a_snapshot"] = false
	sr, err := p.db.get("SR", srRef)
	if err != nil {
		return "", err
	}
	path := filepath.Join(p.sim.srDir(sr.str("uuid")), uuid+".img")
	if err := createVDIFile(path, size); err != nil {
		return "", Errorf(ErrInternal, err.Error())
	}
	o := p.db.create("VDI", fields)
	st := p.state(uuid)
	st.Clean = true
	st.stale = true
	return o.Ref, nil
}

func vdiDestroy(c *Call) (any, error) {
	o, err := c.db().get("VDI", c.Str(0))
	if err != nil {
		return nil, err
	}
	if c.Pool.vdiAttached(o) {
		return nil, Errorf(ErrVDIInUse, o.Ref, "destroy")
	}
	c.Pool.destroyVDI(o)
	return "", nil
}

// destroyVDI removes a VDI, its VBDs and file, merging its CBT bitmap into
// the next point of its chain (pool lock held).
func (p *Pool) destroyVDI(o *object) {
	uuid := o.str("uuid")
	if st, ok := p.vdis[uuid]; ok && st.ChainID != "" && st.Live != "" {
		var next *vdiState
		for _, other := range p.vdis {
			if other != st && other.Live == st.Live && other.ChainID == st.ChainID && other.Seq > st.Seq &&
				(next == nil || other.Seq < next.Seq) {
				next = other
			}
		}
		if next == nil {
			if live, ok := p.vdis[st.Live]; ok && live.ChainID == st.ChainID {
				next = live
			}
		}
		if next != nil {
			if len(next.Bitmap) < len(st.Bitmap) {
				next.Bitmap = append(next.Bitmap, make([]byte, len(st.Bitmap)-len(next.Bitmap))...)
			}
			orInto(next.Bitmap, st.Bitmap)
		}
	}
	_ = os.Remove(p.vdiPath(o))
	for _, vbd := range p.db.find("VBD", "VDI", o.Ref) {
		p.db.destroy(vbd)
	}
	p.db.destroy(o)
	delete(p.vdis, uuid)
}

type copyKind int

const (
	copySnapshot copyKind = iota
	copyClone
	copyCopy
)

// copyVDI snapshots, clones or copies a VDI (pool lock NOT held). Data are
// copied sparse-aware while guest writes to the source are held off, so
// the copy and the CBT hand-over are consistent.
func (p *Pool) copyVDI(ref string, kind copyKind, srRef, intoRef string) (string, error) {
	p.mu.Lock()
	o, err := p.db.get("VDI", ref)
	if err != nil {
		p.mu.Unlock()
		return "", err
	}
	if o.str("type") == "cbt_metadata" {
		p.mu.Unlock()
		return "", Errorf(ErrVDIIncompatibleType, o.Ref, "cbt_metadata")
	}
	st := p.state(o.str("uuid"))
	p.mu.Unlock()

	st.data.Lock()
	defer st.data.Unlock()
	p.mu.Lock()
	o, err = p.db.get("VDI", ref)
	if err != nil {
		p.mu.Unlock()
		return "", err
	}
	srcPath := p.vdiPath(o)
	size := o.int("virtual_size")
	if srRef == "" || srRef == NullRef {
		srRef = o.str("SR")
	}
	sr, err := p.db.get("SR", srRef)
	if err != nil {
		p.mu.Unlock()
		return "", err
	}
	var into *object
	if intoRef != "" && intoRef != NullRef {
		if into, err = p.db.get("VDI", intoRef); err != nil {
			p.mu.Unlock()
			return "", err
		}
	}
	newUUID := NewUUID()
	dstPath := filepath.Join(p.sim.srDir(sr.str("uuid")), newUUID+".img")
	dstSize := size
	if into != nil {
		if into.int("virtual_size") < size || into.str("type") == "cbt_metadata" {
			p.mu.Unlock()
			return "", Errorf("VDI_TOO_SMALL", into.Ref, strconv.FormatInt(size, 10))
		}
		if p.vdiAttached(into) {
			p.mu.Unlock()
			return "", Errorf(ErrVDIInUse, into.Ref, "copy")
		}
		dstPath = p.vdiPath(into)
		dstSize = into.int("virtual_size")
	}
	p.mu.Unlock()

	if err := os.MkdirAll(filepath.Dir(dstPath), 0o755); err != nil {
		return "", Errorf(ErrInternal, err.Error())
	}
	if err := copyFile(dstPath, srcPath, size, dstSize); err != nil {
		return "", Errorf(ErrInternal, err.Error())
	}

	p.mu.Lock()
	defer p.mu.Unlock()
	o, err = p.db.get("VDI", ref)
	if err != nil {
		_ = os.Remove(dstPath)
		return "", err
	}
	contentID := o.strMap("other_config")["content_id"]
	if into != nil {
		into.strMap("other_config")["content_id"] = contentID
		into.Fields["physical_utilisation"] = physicalUtilisation(dstPath)
		p.db.touch(into)
		p.state(into.str("uuid")).Clean = true
		if ist := p.state(into.str("uuid")); into.bool("cbt_enabled") && ist.ChainID != "" {
			ist.Bitmap = make([]byte, bitmapLen(into.int("virtual_size")))
			for i := range ist.Bitmap {
				ist.Bitmap[i] = 0xff
			}
		}
		return into.Ref, nil
	}
	fields := map[string]any{}
	for k, v := range o.Fields {
		fields[k] = cloneValue(v)
	}
	fields["uuid"] = newUUID
	fields["location"] = newUUID
	fields["SR"] = srRef
	fields["physical_utilisation"] = physicalUtilisation(dstPath)
	fields["current_operations"] = map[string]string{}
	fields["other_config"] = map[string]string{"content_id": contentID}
	if kind == copySnapshot {
		oc := maps2(o.strMap("other_config"))
		fields["other_config"] = oc
		fields["is_a_snapshot"] = true
		fields["snapshot_of"] = o.Ref
		fields["snapshot_time"] = time.Now().UTC().Truncate(time.Second)
	} else {
		fields["is_a_snapshot"] = false
		fields["snapshot_of"] = NullRef
		fields["snapshot_time"] = Never
		fields["cbt_enabled"] = false
	}
	n := p.db.create("VDI", fields)
	nst := p.state(newUUID)
	nst.Clean = true
	nst.stale = true
	st.Clean = true
	if kind == copySnapshot && o.bool("cbt_enabled") && st.ChainID != "" && st.Live == "" {
		st.Seq++
		nst.ChainID, nst.Seq, nst.Live = st.ChainID, st.Seq, o.str("uuid")
		nst.Bitmap = st.Bitmap
		if len(nst.Bitmap) == 0 {
			nst.Bitmap = make([]byte, bitmapLen(size))
		}
		st.Bitmap = make([]byte, bitmapLen(size))
	}
	return n.Ref, nil
}

func maps2(m map[string]string) map[string]string {
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// changedBlocks implements VDI.list_changed_blocks (pool lock held).
func (p *Pool) changedBlocks(fromRef, toRef string) ([]byte, error) {
	from, err := p.db.get("VDI", fromRef)
	if err != nil {
		return nil, err
	}
	to, err := p.db.get("VDI", toRef)
	if err != nil {
		return nil, err
	}
	for _, o := range []*object{from, to} {
		if !o.bool("cbt_enabled") {
			return nil, Errorf(ErrVDINoCBTMetadata, o.Ref)
		}
	}
	if p.vdiAttached(to) {
		return nil, Errorf(ErrVDIInUse, to.Ref, "list_changed_blocks")
	}
	fs, ts := p.state(from.str("uuid")), p.state(to.str("uuid"))
	root := func(o *object, st *vdiState) string {
		if st.Live != "" {
			return st.Live
		}
		return o.str("uuid")
	}
	pos := func(st *vdiState) int64 {
		if st.Live == "" {
			return math.MaxInt64
		}
		return st.Seq
	}
	if fs.ChainID == "" || fs.ChainID != ts.ChainID || root(from, fs) != root(to, ts) {
		return nil, Errorf(ErrSRBackendFailure, "", "Source and target VDI are unrelated", "")
	}
	a, b := pos(fs), pos(ts)
	if a > b {
		a, b = b, a
	}
	out := make([]byte, bitmapLen(max(from.int("virtual_size"), to.int("virtual_size"))))
	rootUUID := root(from, fs)
	for _, st := range p.vdis {
		if st.ChainID == fs.ChainID && st.Live == rootUUID && st.Seq > a && st.Seq <= b {
			orInto(out, st.Bitmap)
		}
	}
	if b == math.MaxInt64 {
		if live, ok := p.vdis[rootUUID]; ok && live.ChainID == fs.ChainID {
			orInto(out, live.Bitmap)
		}
	}
	return out, nil
}
