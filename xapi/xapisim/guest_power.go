package xapisim

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"time"
)

// poolMigrate implements VM.pool_migrate: the memory is streamed to the
// target host's xenops endpoint in pre-copy rounds, the guest paused for
// the last pages, and the VM then resides on the target host. Disks stay
// where they are (shared SR).
func (s *Sim) poolMigrate(c *Call) error {
	p := c.Pool
	p.mu.Lock()
	vm, err := p.db.get("VM", c.Str(0))
	if err != nil {
		p.mu.Unlock()
		return err
	}
	if vm.bool("is_control_domain") {
		p.mu.Unlock()
		return Errorf(ErrOperationNotAllowed, "This operation is not allowed on a control domain")
	}
	if ps := vm.str("power_state"); ps != Running {
		p.mu.Unlock()
		return badPowerState(vm.Ref, ps, Running)
	}
	target, err := p.db.get("host", c.Str(1))
	if err != nil {
		p.mu.Unlock()
		return err
	}
	opts := c.Map(2)
	if v, ok := opts["compress"]; ok {
		if _, valid := parseBoolOption(v); !valid {
			p.mu.Unlock()
			return Errorf(ErrInvalidValue, "compress", v)
		}
	}
	vmRef, vmUUID, domid, size := vm.Ref, vm.str("uuid"), vm.int("domid"), vm.int("memory_static_max")
	src := vm.str("resident_on")
	sess := p.newSession(target.Ref, s.cfg.Username, "pool_migrate")
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		if o, err := p.db.get("session", sess); err == nil {
			p.db.destroy(o)
		}
		p.mu.Unlock()
	}()
	th := p.hostByRef(target.Ref, c.Host)
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	defer client.CloseIdleConnections()
	xo, err := newRemote(client, th.url+"services/xenops", sess)
	if err != nil {
		return Errorf(ErrInternal, err.Error())
	}
	e := s.ext()
	rec := MigrationRecord{VM: vmUUID, Kind: "pool_migrate", SourceHost: src, DestHost: target.Ref, DestVM: vmRef, Started: time.Now().UTC()}
	fail := func(cause error, unfreeze func()) error {
		unfreeze()
		_ = xo.do(context.WithoutCancel(c.Ctx), http.MethodPost, "abort", url.Values{"vm": {vmRef}, "keep": {"true"}}, nil, nil)
		rec.Result, rec.Error, rec.Finished = "failure", cause.Error(), time.Now().UTC()
		if errors.Is(cause, Errorf(ErrTaskCancelled)) {
			rec.Result = "cancelled"
		}
		rec.XenopsBytes = xo.sent.Load()
		e.setRecord(rec)
		var f *Fault
		if errors.As(cause, &f) && (f.Code == ErrTaskCancelled || f.Code == ErrHookFailed) {
			return f
		}
		return Errorf("VM_MIGRATE_FAILED", vmRef, src, target.Ref, cause.Error())
	}
	if err := xo.do(c.Ctx, http.MethodPost, "receive", url.Values{"vm": {vmRef}}, nil, nil); err != nil {
		return fail(err, func() {})
	}
	if err := migrateHook(c.Ctx, s, s.hostOf(p, src), "vm-pre-migrate", vmUUID, "source", domid); err != nil {
		return fail(err, func() {})
	}
	mem := e.memFor(vmUUID, size)
	unfreeze, vers, pauseStart, err := streamMemory(c.Ctx, c, e, xo, vmRef, vmUUID, mem, &rec, true)
	if err != nil {
		mem.stopTracking()
		return fail(err, unfreeze)
	}
	var fin struct {
		HookError string `json:"hook_error"`
	}
	if err := xo.json(c.Ctx, "finish", url.Values{"vm": {vmRef}}, map[string]any{"state": Running, "host": target.Ref, "move": true}, &fin); err != nil {
		mem.stopTracking()
		return fail(err, unfreeze)
	}
	unfreeze()
	rec.PauseMS = time.Since(pauseStart).Milliseconds()
	mem.stopTracking()
	d := mem.digest(vers)
	var ver struct{ OK bool }
	_ = xo.json(context.WithoutCancel(c.Ctx), "verify", url.Values{"vm": {vmRef}},
		map[string]any{"digest": hex.EncodeToString(d[:]), "other_config": map[string]string{"sim:migration_pause_ms": itoa(rec.PauseMS)}}, &ver)
	rec.MemoryVerified = ver.OK
	rec.XenopsBytes = xo.sent.Load()
	rec.Result, rec.Finished = "success", time.Now().UTC()
	e.setRecord(rec)
	if fin.HookError != "" {
		return decodeHookError(fin.HookError)
	}
	return nil
}

var _ = addRegistrar(func() {
	Register(&Method{Name: "VM.suspend", Unlocked: true, Params: []Param{p("vm", KRef)},
		Handler: func(c *Call) (any, error) { return "", c.Sim.suspendVM(c) }})
	for _, on := range []bool{false, true} {
		name, params := "VM.resume", []Param{p("vm", KRef), p("start_paused", KBool), p("force", KBool)}
		if on {
			name, params = "VM.resume_on", []Param{p("vm", KRef), p("host", KRef), p("start_paused", KBool), p("force", KBool)}
		}
		Register(&Method{Name: name, Unlocked: true, Params: params,
			Handler: func(c *Call) (any, error) { return "", c.Sim.resumeVM(c, on) }})
	}
})

// suspendVM implements VM.suspend: the guest is paused, its memory image
// written to a new suspend VDI on the pool's suspend_image_SR, and the VM
// becomes Suspended with suspend_VDI set.
func (s *Sim) suspendVM(c *Call) error {
	p := c.Pool
	p.mu.Lock()
	vm, err := p.db.get("VM", c.Str(0))
	if err == nil {
		err = checkPowerOp(vm, "suspend")
	}
	if err != nil {
		p.mu.Unlock()
		return err
	}
	vmRef, vmUUID, size, host := vm.Ref, vm.str("uuid"), vm.int("memory_static_max"), vm.str("resident_on")
	sr := ""
	if pools := p.db.all("pool"); len(pools) > 0 {
		sr = pools[0].str("suspend_image_SR")
	}
	if _, gerr := p.db.get("SR", sr); gerr != nil {
		if srs := p.db.all("SR"); len(srs) > 0 {
			sr = srs[0].Ref
		}
	}
	p.mu.Unlock()
	e := s.ext()
	rec := MigrationRecord{VM: vmUUID, Kind: "suspend", SourceHost: host, Started: time.Now().UTC()}
	pauseStart := time.Now()
	unfreeze := e.freeze(vmUUID)
	defer unfreeze()
	mem := e.memFor(vmUUID, size)
	vers := mem.versions()
	p.mu.Lock()
	vdiRef, err := p.CreateVDI(sr, int64(len(vers))*PageSize, map[string]any{"name_label": "Suspend image", "type": "suspend",
		"name_description": "memory image of " + vmUUID})
	var vdiUUID string
	if err == nil {
		o, _ := p.db.get("VDI", vdiRef)
		vdiUUID = o.str("uuid")
	}
	p.mu.Unlock()
	if err != nil {
		return err
	}
	buf := make([]byte, 256*PageSize)
	for i := 0; i < len(vers); i += 256 {
		k := min(256, len(vers)-i)
		for j := range k {
			mem.fillPage(buf[j*PageSize:], int64(i+j), vers[i+j])
		}
		if isZero(buf[:k*PageSize]) {
			continue
		}
		if err := s.WriteVDI(vdiUUID, int64(i)*PageSize, buf[:k*PageSize]); err != nil {
			p.mu.Lock()
			if o, gerr := p.db.get("VDI", vdiRef); gerr == nil {
				p.destroyVDI(o)
			}
			p.mu.Unlock()
			return Errorf(ErrInternal, err.Error())
		}
		rec.MemoryBytes += int64(k) * PageSize
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err = p.db.get("VM", vmRef)
	if err == nil {
		err = checkPowerOp(vm, "suspend")
	}
	if err != nil {
		if o, gerr := p.db.get("VDI", vdiRef); gerr == nil {
			p.destroyVDI(o)
		}
		return err
	}
	vm.Fields["suspend_VDI"] = vdiRef
	vm.strMap("other_config")["sim:suspend_pause_ms"] = itoa(time.Since(pauseStart).Milliseconds())
	p.setPowerState(vm, Suspended, "")
	rec.PauseMS = time.Since(pauseStart).Milliseconds()
	rec.Result, rec.Finished = "success", time.Now().UTC()
	e.setRecord(rec)
	return nil
}

// checkPowerOp applies the power state machine rules of vmPowerOp.
func checkPowerOp(o *object, op string) error {
	rule := powerOps[op]
	ps := o.str("power_state")
	ok := false
	for _, f := range rule.from {
		ok = ok || f == ps
	}
	if !ok {
		return badPowerState(o.Ref, ps, rule.from...)
	}
	if o.bool("is_control_domain") {
		return Errorf(ErrOperationNotAllowed, "This operation is not allowed on a control domain")
	}
	if o.bool("is_a_snapshot") {
		return Errorf("VM_IS_SNAPSHOT", o.Ref, op)
	}
	if o.bool("is_a_template") {
		return Errorf("VM_IS_TEMPLATE", o.Ref, op)
	}
	return nil
}

// resumeVM implements VM.resume / resume_on: the memory image is read
// back from the suspend VDI (and checked against the guest's memory), the
// VDI destroyed, and the VM runs (or is paused) on the host.
func (s *Sim) resumeVM(c *Call, on bool) error {
	p := c.Pool
	p.mu.Lock()
	vm, err := p.db.get("VM", c.Str(0))
	op := "resume"
	if on {
		op = "resume_on"
	}
	if err == nil {
		err = checkPowerOp(vm, op)
	}
	host := p.Coordinator().Ref
	paused := c.Bool(1)
	if err == nil && on {
		if _, herr := p.db.get("host", c.Str(1)); herr != nil {
			err = herr
		}
		host, paused = c.Str(1), c.Bool(2)
	}
	if err != nil {
		p.mu.Unlock()
		return err
	}
	vmRef, vmUUID, size := vm.Ref, vm.str("uuid"), vm.int("memory_static_max")
	vdiRef := vm.str("suspend_VDI")
	var path string
	if v, gerr := p.db.get("VDI", vdiRef); gerr == nil {
		path = p.vdiPath(v)
	}
	p.mu.Unlock()
	e := s.ext()
	rec := MigrationRecord{VM: vmUUID, Kind: "resume", DestHost: host, Started: time.Now().UTC()}
	start := time.Now()
	if path != "" {
		mem := e.memFor(vmUUID, size)
		d := mem.digest(mem.versions())
		got, err := fileDigestSize(path, mem.pages()*PageSize)
		if err != nil {
			return Errorf(ErrInternal, err.Error())
		}
		rec.MemoryVerified = got == hex.EncodeToString(d[:])
		rec.MemoryBytes = mem.pages() * PageSize
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err = p.db.get("VM", vmRef)
	if err == nil {
		err = checkPowerOp(vm, op)
	}
	if err != nil {
		return err
	}
	if v, gerr := p.db.get("VDI", vdiRef); gerr == nil {
		p.destroyVDI(v)
	}
	vm.Fields["suspend_VDI"] = NullRef
	state := Running
	if paused {
		state = Paused
	}
	p.setPowerState(vm, state, host)
	rec.PauseMS = time.Since(start).Milliseconds()
	vm.strMap("other_config")["sim:resume_ms"] = itoa(rec.PauseMS)
	p.db.touch(vm)
	rec.Result, rec.Finished = "success", time.Now().UTC()
	e.setRecord(rec)
	return nil
}

// fileDigestSize is the SHA-256 of the first n bytes of a file.
func fileDigestSize(path string, n int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("read suspend image: %w", err)
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return "", err
	}
	if st.Size() < n {
		return "", fmt.Errorf("suspend image: %d bytes, want %s", st.Size(), strconv.FormatInt(n, 10))
	}
	return fileDigestN(f, n)
}

func fileDigestN(f *os.File, n int64) (string, error) {
	h := sha256.New()
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, n)); err != nil {
		return "", fmt.Errorf("read suspend image: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
