package xapisim

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
)

// The destination side of a migration: the /services/SM and
// /services/xenops endpoints every host serves, addressed by the URLs
// host.migrate_receive returns. The wire protocol is the simulator's own
// (xapi uses SMAPI calls plus an NBD mirror, and the xenopsd migration
// stream), but all data crosses HTTP through whatever the URLs point at.
//
//	POST /services/SM/check     {srs, networks, host}          refs exist in this pool
//	POST /services/SM/prepare   {sr, size, name_label, content_ids}
//	                            -> {vdi, uuid, base}            clone of the nearest content_id match, or a new VDI
//	PUT  /services/SM/write?vdi=UUID&offset=N                   raw bytes (Content-Length)
//	POST /services/SM/destroy?vdi=UUID                          cleanup of a failed migration
//	POST /services/xenops/import {vm record, vbds, vifs, host}  -> {vm}: the VM, halted, with its devices
//	POST /services/xenops/receive?vm=REF                        memory target for a VM of this pool (pool_migrate)
//	PUT  /services/xenops/memory?vm=REF                         pages: [u64 index][4096 bytes]...
//	POST /services/xenops/finish?vm=REF {state, host, move}     the VM runs here; vm-post-migrate hook
//	POST /services/xenops/verify?vm=REF {digest, other_config}  memory image check; annotations
//	POST /services/xenops/status?vm=REF                         -> {state}: after a finish without answer
//	POST /services/xenops/abort?vm=REF                          cleanup of a failed migration
//
// Every request carries session_id (a session of this pool); errors are
// JSON {"error":[code, params...]}.

// migrateHook runs a xenopsd hook (vm-pre-migrate on the source host,
// vm-post-migrate on the destination) through the hook runner (hooks.go).
func migrateHook(ctx context.Context, s *Sim, h *Host, hook, vmUUID, reason string, domid int64) error {
	d := ""
	if domid >= 0 {
		d = strconv.FormatInt(domid, 10)
	}
	return s.runHooks(ctx, h.Ref, hook, vmUUID, reason, d)
}

func init() {
	RegisterHTTP("/services/SM/", func(s *Sim, h *Host) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.serveSM(h, w, r) })
	})
	RegisterHTTP("/services/xenops/", func(s *Sim, h *Host) http.Handler {
		return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { s.serveXenops(h, w, r) })
	})
}

type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.n.Add(int64(n))
	return n, err
}

func writeJSON(w http.ResponseWriter, v any) {
	b, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(b)))
	_, _ = w.Write(b)
}

func writeFault(w http.ResponseWriter, status int, err error) {
	f := asFault(err)
	b, _ := json.Marshal(map[string][]string{"error": append([]string{f.Code}, f.Params...)})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(b)
}

// serviceAuth checks the session_id of a migration endpoint request.
func (s *Sim) serviceAuth(h *Host, w http.ResponseWriter, r *http.Request) bool {
	sess := r.URL.Query().Get("session_id")
	if sess == "" || !h.pool.validSession(sess) {
		writeFault(w, http.StatusUnauthorized, Errorf(ErrSessionInvalid, sess))
		return false
	}
	return true
}

func (s *Sim) serveSM(h *Host, w http.ResponseWriter, r *http.Request) {
	body := countingReader{r: r.Body, n: &s.ext().smBytes}
	if !s.serviceAuth(h, w, r) {
		return
	}
	op := strings.TrimPrefix(r.URL.Path, "/services/SM/")
	p := h.pool
	q := r.URL.Query()
	switch op {
	case "check":
		var req struct {
			SRs      []string `json:"srs"`
			Networks []string `json:"networks"`
			Host     string   `json:"host"`
		}
		if err := json.NewDecoder(io.LimitReader(body, maxRequestBody)).Decode(&req); err != nil {
			writeFault(w, http.StatusBadRequest, err)
			return
		}
		p.mu.Lock()
		err := func() error {
			if _, err := p.db.get("host", req.Host); err != nil {
				return err
			}
			for _, sr := range req.SRs {
				if _, err := p.db.get("SR", sr); err != nil {
					return err
				}
			}
			for _, n := range req.Networks {
				if _, err := p.db.get("network", n); err != nil {
					return err
				}
			}
			return nil
		}()
		p.mu.Unlock()
		if err != nil {
			writeFault(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, map[string]string{})
	case "prepare":
		var req struct {
			SR         string   `json:"sr"`
			Size       int64    `json:"size"`
			Name       string   `json:"name_label"`
			Desc       string   `json:"name_description"`
			ContentIDs []string `json:"content_ids"`
		}
		if err := json.NewDecoder(io.LimitReader(body, maxRequestBody)).Decode(&req); err != nil {
			writeFault(w, http.StatusBadRequest, err)
			return
		}
		ref, uuid, base, err := p.prepareVDI(req.SR, req.Size, req.Name, req.Desc, req.ContentIDs)
		if err != nil {
			writeFault(w, http.StatusInternalServerError, err)
			return
		}
		writeJSON(w, map[string]string{"vdi": ref, "uuid": uuid, "base": base})
	case "write":
		uuid := q.Get("vdi")
		off, err := strconv.ParseInt(q.Get("offset"), 10, 64)
		if err != nil || r.ContentLength < 0 || !p.hasVDI(uuid) {
			writeFault(w, http.StatusBadRequest, Errorf(ErrInvalidValue, "write", r.URL.RawQuery))
			return
		}
		buf := make([]byte, min(r.ContentLength, 1<<20))
		left := r.ContentLength
		for left > 0 {
			n, rerr := io.ReadFull(body, buf[:min(int64(len(buf)), left)])
			if n > 0 {
				var werr error
				if isZero(buf[:n]) {
					werr = s.ZeroVDI(uuid, off, int64(n))
				} else {
					werr = s.WriteVDI(uuid, off, buf[:n])
				}
				if werr != nil {
					writeFault(w, http.StatusInternalServerError, werr)
					return
				}
				off += int64(n)
				left -= int64(n)
			}
			if rerr != nil && left > 0 {
				writeFault(w, http.StatusBadRequest, rerr)
				return
			}
		}
		writeJSON(w, map[string]string{})
	case "destroy":
		p.mu.Lock()
		if o, err := p.db.byUUID("VDI", q.Get("vdi")); err == nil && !p.vdiAttached(o) {
			p.destroyVDI(o)
		}
		p.mu.Unlock()
		writeJSON(w, map[string]string{})
	default:
		http.NotFound(w, r)
	}
}

func (p *Pool) hasVDI(uuid string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, err := p.db.byUUID("VDI", uuid)
	return err == nil
}

// prepareVDI finds, on sr, a VDI of the same size whose content_id is the
// first of contentIDs that matches (nearest snapshot first) and clones it,
// or creates an empty VDI. base is the matched content_id ("" if none).
func (p *Pool) prepareVDI(sr string, size int64, name, desc string, contentIDs []string) (ref, uuid, base string, err error) {
	p.mu.Lock()
	if _, err := p.db.get("SR", sr); err != nil {
		p.mu.Unlock()
		return "", "", "", err
	}
	var match *object
	for _, cid := range contentIDs {
		for _, v := range p.db.find("VDI", "SR", sr) {
			if cid != "" && v.strMap("other_config")["content_id"] == cid && v.str("type") != "cbt_metadata" &&
				v.int("virtual_size") == size {
				match = v
				break
			}
		}
		if match != nil {
			base = cid
			break
		}
	}
	if match == nil {
		ref, err = p.CreateVDI(sr, size, map[string]any{"name_label": name, "name_description": desc, "type": "user"})
		if err == nil {
			o, _ := p.db.get("VDI", ref)
			uuid = o.str("uuid")
		}
		p.mu.Unlock()
		return ref, uuid, "", err
	}
	matchRef := match.Ref
	p.mu.Unlock()
	ref, err = p.copyVDI(matchRef, copyClone, "", "")
	if err != nil {
		return "", "", "", err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	o, err := p.db.get("VDI", ref)
	if err != nil {
		return "", "", "", err
	}
	o.Fields["name_label"], o.Fields["name_description"] = name, desc
	p.db.touch(o)
	return ref, o.str("uuid"), base, nil
}

// importReq is the VM metadata sent to /services/xenops/import.
type importReq struct {
	UUID        string            `json:"uuid"`
	NameLabel   string            `json:"name_label"`
	NameDesc    string            `json:"name_description"`
	Memory      int64             `json:"memory_static_max"`
	MemoryMin   int64             `json:"memory_static_min"`
	MemoryDyn   int64             `json:"memory_dynamic_max"`
	MemoryDMin  int64             `json:"memory_dynamic_min"`
	VCPUsMax    int64             `json:"VCPUs_max"`
	VCPUsStart  int64             `json:"VCPUs_at_startup"`
	HVMBoot     string            `json:"HVM_boot_policy"`
	Domarch     string            `json:"domarch"`
	Platform    map[string]string `json:"platform"`
	OtherConfig map[string]string `json:"other_config"`
	Host        string            `json:"host"`
	VBDs        []importVBD       `json:"vbds"`
	VIFs        []importVIF       `json:"vifs"`
	// GuestMetrics is absent for a VM without guest metrics.
	GuestMetrics *guestMetricsImport `json:"guest_metrics,omitempty"`
	// Metrics is absent from older simulators' requests.
	Metrics *vmMetricsImport `json:"metrics,omitempty"`
}

type importVBD struct {
	VDI        string `json:"vdi"`
	Userdevice string `json:"userdevice"`
	Bootable   bool   `json:"bootable"`
	Mode       string `json:"mode"`
	Type       string `json:"type"`
}

type importVIF struct {
	Network string `json:"network"`
	Device  string `json:"device"`
	MAC     string `json:"MAC"`
	MTU     int64  `json:"MTU"`
}

func (s *Sim) memPath(vmRef string) string {
	return filepath.Join(s.cfg.StateDir, "xenops", strings.TrimPrefix(vmRef, "OpaqueRef:")+".mem")
}

func (s *Sim) serveXenops(h *Host, w http.ResponseWriter, r *http.Request) {
	body := countingReader{r: r.Body, n: &s.ext().xenopsBytes}
	if !s.serviceAuth(h, w, r) {
		return
	}
	op := strings.TrimPrefix(r.URL.Path, "/services/xenops/")
	p := h.pool
	vmRef := r.URL.Query().Get("vm")
	switch op {
	case "import":
		var req importReq
		if err := json.NewDecoder(io.LimitReader(body, maxRequestBody)).Decode(&req); err != nil {
			writeFault(w, http.StatusBadRequest, err)
			return
		}
		ref, err := p.importVM(req)
		if err == nil {
			err = s.newMemFile(ref, req.Memory)
		}
		if err != nil {
			writeFault(w, http.StatusInternalServerError, err)
			return
		}
		writeJSON(w, map[string]string{"vm": ref})
	case "receive":
		p.mu.Lock()
		o, err := p.db.get("VM", vmRef)
		var size int64
		if err == nil {
			size = o.int("memory_static_max")
		}
		p.mu.Unlock()
		if err == nil {
			err = s.newMemFile(vmRef, size)
		}
		if err != nil {
			writeFault(w, http.StatusNotFound, err)
			return
		}
		writeJSON(w, map[string]string{})
	case "memory":
		if err := s.receivePages(vmRef, body); err != nil {
			writeFault(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, map[string]string{})
	case "finish":
		var req struct {
			State string `json:"state"`
			Host  string `json:"host"`
			Move  bool   `json:"move"`
		}
		if err := json.NewDecoder(io.LimitReader(body, maxRequestBody)).Decode(&req); err != nil {
			writeFault(w, http.StatusBadRequest, err)
			return
		}
		uuid, domid, err := p.finishVM(vmRef, req.State, req.Host, req.Move)
		if err != nil {
			writeFault(w, http.StatusInternalServerError, err)
			return
		}
		hookErr := ""
		if req.State == Running {
			if err := migrateHook(r.Context(), s, p.hostByRef(req.Host, h), "vm-post-migrate", uuid, "destination", domid); err != nil {
				hookErr = err.Error()
				b, _ := json.Marshal(asFault(err))
				hookErr = string(b)
			}
		}
		writeJSON(w, map[string]string{"hook_error": hookErr})
	case "verify":
		var req struct {
			Digest      string            `json:"digest"`
			OtherConfig map[string]string `json:"other_config"`
		}
		if err := json.NewDecoder(io.LimitReader(body, maxRequestBody)).Decode(&req); err != nil {
			writeFault(w, http.StatusBadRequest, err)
			return
		}
		ok := false
		if req.Digest != "" {
			d, err := fileDigest(s.memPath(vmRef))
			ok = err == nil && d == req.Digest
		}
		_ = os.Remove(s.memPath(vmRef))
		p.mu.Lock()
		if o, err := p.db.get("VM", vmRef); err == nil && len(req.OtherConfig) > 0 {
			oc := o.strMap("other_config")
			for k, v := range req.OtherConfig {
				oc[k] = v
			}
			p.db.touch(o)
		}
		p.mu.Unlock()
		writeJSON(w, map[string]bool{"ok": ok})
	case "status":
		state := "absent"
		p.mu.Lock()
		if o, err := p.db.get("VM", vmRef); err == nil {
			state = o.str("power_state")
		}
		p.mu.Unlock()
		writeJSON(w, map[string]string{"state": state})
	case "abort":
		_ = os.Remove(s.memPath(vmRef))
		if r.URL.Query().Get("keep") != "true" {
			p.mu.Lock()
			// Until the source confirms (verify), it owns the VM: a VM
			// started here by a finish whose answer was lost goes too.
			if o, err := p.db.get("VM", vmRef); err == nil {
				if o.str("power_state") != Halted {
					p.setPowerState(o, Halted, "")
				}
				p.destroyVMRecord(o)
			}
			p.mu.Unlock()
		}
		writeJSON(w, map[string]string{})
	default:
		http.NotFound(w, r)
	}
}

func (p *Pool) hostByRef(ref string, def *Host) *Host {
	for _, h := range p.hosts {
		if h.Ref == ref {
			return h
		}
	}
	return def
}

func (s *Sim) newMemFile(vmRef string, size int64) error {
	path := s.memPath(vmRef)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("memory image: %w", err)
	}
	return createVDIFile(path, (size+PageSize-1)/PageSize*PageSize)
}

// receivePages writes a stream of [u64 page index][page] records into the
// VM's memory image file.
func (s *Sim) receivePages(vmRef string, r io.Reader) error {
	f, err := os.OpenFile(s.memPath(vmRef), os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("memory image: %w", err)
	}
	defer func() { _ = f.Close() }()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	rec := make([]byte, 8+PageSize)
	for {
		if _, err := io.ReadFull(r, rec); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("memory stream: %w", err)
		}
		u := binary.LittleEndian.Uint64(rec)
		if u >= uint64(st.Size()/PageSize) {
			return fmt.Errorf("memory stream: page %d outside the image", u)
		}
		i := int64(u)
		if _, err := f.WriteAt(rec[8:], i*PageSize); err != nil {
			return fmt.Errorf("memory image: %w", err)
		}
	}
}

func fileDigest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer func() { _ = f.Close() }()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// importVM creates a halted VM with its VBDs and VIFs from a migration's
// metadata (the VDIs and networks are this pool's refs).
func (p *Pool) importVM(req importReq) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.db.get("host", req.Host); err != nil {
		return "", err
	}
	for _, b := range req.VBDs {
		if _, err := p.db.get("VDI", b.VDI); err != nil {
			return "", err
		}
	}
	for _, v := range req.VIFs {
		if _, err := p.db.get("network", v.Network); err != nil {
			return "", err
		}
	}
	uuid := req.UUID
	if uuid == "" {
		uuid = NewUUID()
	}
	if _, err := p.db.byUUID("VM", uuid); err == nil {
		return "", Errorf("DUPLICATE_VM", uuid)
	}
	oc := req.OtherConfig
	if oc == nil {
		oc = map[string]string{}
	}
	vm := p.db.create("VM", map[string]any{
		"uuid": uuid, "name_label": req.NameLabel, "name_description": req.NameDesc,
		"memory_static_max": req.Memory, "memory_static_min": req.MemoryMin, "memory_dynamic_max": req.MemoryDyn,
		"memory_dynamic_min": req.MemoryDMin, "memory_target": req.MemoryDyn,
		"VCPUs_max": req.VCPUsMax, "VCPUs_at_startup": req.VCPUsStart, "HVM_boot_policy": req.HVMBoot,
		"domarch": req.Domarch, "platform": req.Platform, "other_config": oc,
		"allowed_operations": allowedVMOps(Halted),
		"guest_metrics":      p.db.importGuestMetrics(req.GuestMetrics),
		"metrics":            p.db.importVMMetrics(req.Metrics),
	})
	for _, b := range req.VBDs {
		p.db.create("VBD", map[string]any{"VM": vm.Ref, "VDI": b.VDI, "userdevice": b.Userdevice,
			"bootable": b.Bootable, "mode": b.Mode, "type": b.Type})
	}
	for _, v := range req.VIFs {
		p.db.create("VIF", map[string]any{"VM": vm.Ref, "network": v.Network, "device": v.Device,
			"MAC": v.MAC, "MTU": v.MTU})
	}
	return vm.Ref, nil
}

// finishVM puts an imported VM into its final state on host, or (move,
// pool_migrate) moves a running VM of this pool to host.
func (p *Pool) finishVM(vmRef, state, host string, move bool) (uuid string, domid int64, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	o, err := p.db.get("VM", vmRef)
	if err != nil {
		return "", 0, err
	}
	if _, err := p.db.get("host", host); err != nil {
		return "", 0, err
	}
	if move {
		p.setDomain(o, host, p.nextDomid())
		p.db.touch(o)
	} else if state != Halted {
		// The domain arrives with the vCPU count it had at the source
		// (xenopsd migrates its own VM config), not VCPUs_at_startup.
		live := p.db.liveVCPUs(o)
		p.setPowerState(o, state, host)
		if live >= 1 && (state == Running || state == Paused) {
			p.db.setLiveVCPUs(o, live)
		}
	}
	return o.str("uuid"), o.int("domid"), nil
}

// destroyVMRecord removes a VM with its VBDs and VIFs (not its VDIs).
func (p *Pool) destroyVMRecord(o *object) {
	p.setDomain(o, NullRef, -1) // a domain of its own goes with it
	for _, vbd := range p.db.find("VBD", "VM", o.Ref) {
		p.db.destroy(vbd)
	}
	for _, vif := range p.db.find("VIF", "VM", o.Ref) {
		p.db.destroy(vif)
	}
	p.db.destroyGuestMetrics(o)
	p.db.destroyVMMetrics(o)
	p.db.destroy(o)
}
