package xapisim

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// MaxStorageMigrates is how many storage migrations a pool runs at once
// (xapi's limit; the next gets TOO_MANY_STORAGE_MIGRATES ["3"]).
const MaxStorageMigrates = 3

// Pre-copy convergence, as Xen's migration stream: after the first round
// (every page), at most maxPrecopyRounds more rounds of the pages dirtied
// meanwhile, stopping early once at most precopyDirtyThreshold are dirty.
const (
	maxPrecopyRounds      = 5
	precopyDirtyThreshold = 50
)

// MigrationRecord describes the last migration (migrate_send,
// pool_migrate, suspend or resume) of a VM.
type MigrationRecord struct {
	VM         string `json:"vm"` // uuid
	Kind       string `json:"kind"`
	Result     string `json:"result"` // success | failure | cancelled
	Error      string `json:"error,omitempty"`
	SourceHost string `json:"source_host"`
	DestHost   string `json:"dest_host"`
	DestVM     string `json:"dest_vm,omitempty"`
	// SMBytes and XenopsBytes are the request bytes the source sent to the
	// SM and xenops URLs.
	SMBytes     int64 `json:"sm_bytes"`
	XenopsBytes int64 `json:"xenops_bytes"`
	// DiskBytes is the disk data copied in bulk; MirroredWrites and
	// MirrorBytes the guest writes mirrored while copying.
	DiskBytes      int64 `json:"disk_bytes"`
	MirroredWrites int64 `json:"mirrored_writes"`
	MirrorBytes    int64 `json:"mirror_bytes"`
	// Incremental: some disk was cloned from a destination VDI with a
	// matching content_id, and only the difference was copied.
	Incremental bool     `json:"incremental"`
	BaseVDIs    []string `json:"base_vdis,omitempty"`
	// Memory: bytes of pages sent, pre-copy rounds, pages in the final
	// stop-and-copy, and whether the destination image matched.
	MemoryBytes    int64 `json:"memory_bytes"`
	Rounds         int   `json:"rounds"`
	FinalPages     int   `json:"final_pages"`
	MemoryVerified bool  `json:"memory_verified"`
	// PauseMS is how long the guest was paused (the downtime users see).
	PauseMS  int64     `json:"pause_ms"`
	Started  time.Time `json:"started"`
	Finished time.Time `json:"finished"`
}

// Map returns the record as a string map (sim.last_migration).
func (r MigrationRecord) Map() map[string]string {
	return map[string]string{
		"vm": r.VM, "kind": r.Kind, "result": r.Result, "error": r.Error,
		"source_host": r.SourceHost, "dest_host": r.DestHost, "dest_vm": r.DestVM,
		"sm_bytes": itoa(r.SMBytes), "xenops_bytes": itoa(r.XenopsBytes), "disk_bytes": itoa(r.DiskBytes),
		"mirrored_writes": itoa(r.MirroredWrites), "mirror_bytes": itoa(r.MirrorBytes),
		"incremental": strconv.FormatBool(r.Incremental), "base_vdis": strings.Join(r.BaseVDIs, ","),
		"memory_bytes": itoa(r.MemoryBytes), "rounds": strconv.Itoa(r.Rounds), "final_pages": strconv.Itoa(r.FinalPages),
		"memory_verified": strconv.FormatBool(r.MemoryVerified), "pause_ms": itoa(r.PauseMS),
		"started": FormatDate(r.Started), "finished": FormatDate(r.Finished),
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }

// LastMigration returns the record of the VM's last migration.
func (s *Sim) LastMigration(vmUUID string) (MigrationRecord, bool) {
	e := s.ext()
	e.mu.Lock()
	defer e.mu.Unlock()
	r, ok := e.records[vmUUID]
	return r, ok
}

func (e *simExt) setRecord(r MigrationRecord) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.records[r.VM] = r
}

var _ = addRegistrar(registerMigrate)

func registerMigrate() {
	Register(&Method{Name: "host.migrate_receive", Params: []Param{p("host", KRef), p("network", KRef), p("options", KMap)},
		Handler: hostMigrateReceive})
	sendParams := []Param{p("vm", KRef), p("dest", KMap), p("live", KBool), p("vdi_map", KMap), p("vif_map", KMap),
		p("options", KMap), pd("vgpu_map", KMap, map[string]string{})}
	Register(&Method{Name: "VM.migrate_send", Unlocked: true, Params: sendParams,
		Handler: func(c *Call) (any, error) { return c.Sim.migrateSend(c) }})
	Register(&Method{Name: "VM.assert_can_migrate", Unlocked: true, Params: sendParams,
		Handler: func(c *Call) (any, error) {
			plan, err := c.Sim.planMigration(c)
			if err != nil {
				return nil, err
			}
			defer plan.close()
			return "", plan.check(c.Ctx)
		}})
	Register(&Method{Name: "VM.pool_migrate", Unlocked: true, Params: []Param{p("vm", KRef), p("host", KRef), p("options", KMap)},
		Handler: func(c *Call) (any, error) { return "", c.Sim.poolMigrate(c) }})

	// Simulator-only controls.
	Register(&Method{Name: "sim.guest_start", Unlocked: true, Params: []Param{p("vm", KRef), pd("options", KMap, map[string]string{})},
		Handler: func(c *Call) (any, error) {
			uuid, err := c.vmUUID(0)
			if err != nil {
				return nil, err
			}
			cfg, err := GuestConfigFromMap(c.Map(1))
			if err != nil {
				return nil, Errorf(ErrInvalidValue, "options", err.Error())
			}
			return "", c.Sim.StartGuest(uuid, cfg)
		}})
	Register(&Method{Name: "sim.guest_stop", Unlocked: true, Params: []Param{p("vm", KRef)},
		Handler: func(c *Call) (any, error) {
			uuid, err := c.vmUUID(0)
			if err != nil {
				return nil, err
			}
			if err := c.Sim.StopGuest(uuid); err != nil && !errors.Is(err, ErrNoGuest) {
				return nil, err
			}
			return "", nil
		}})
	Register(&Method{Name: "sim.guest_stats", Unlocked: true, Params: []Param{p("vm", KRef)},
		Handler: func(c *Call) (any, error) {
			uuid, err := c.vmUUID(0)
			if err != nil {
				return nil, err
			}
			st, err := c.Sim.GuestStats(uuid)
			if err != nil {
				return map[string]string{"running": "false"}, nil
			}
			return map[string]string{"running": strconv.FormatBool(st.Running), "pattern": st.Pattern,
				"rate": itoa(st.Rate), "dirty_rate": itoa(st.DirtyRate), "writes": itoa(st.Writes),
				"bytes_written": itoa(st.BytesWritten), "write_errors": itoa(st.WriteErrors),
				"pages_dirtied": itoa(st.PagesDirtied), "mirrored_writes": itoa(st.MirroredWrites),
				"last_error": st.LastError, "cap": itoa(st.Cap), "vcpus": itoa(st.VCPUs),
				"effective_rate": itoa(st.EffectiveRate), "effective_dirty_rate": itoa(st.EffectiveDirtyRate)}, nil
		}})
	Register(&Method{Name: "sim.guest_verify", Unlocked: true, Params: []Param{p("vm", KRef)},
		Handler: func(c *Call) (any, error) {
			uuid, err := c.vmUUID(0)
			if err != nil {
				return nil, err
			}
			v, err := c.Sim.VerifyGuest(uuid)
			if err != nil {
				return nil, Errorf(ErrInternal, err.Error())
			}
			return map[string]string{"ok": strconv.FormatBool(v.OK), "disk": v.Disk,
				"mismatch_offset": itoa(v.MismatchOffset), "disks": strconv.Itoa(v.Disks)}, nil
		}})
	Register(&Method{Name: "sim.last_migration", Unlocked: true, Params: []Param{p("vm", KString)},
		Handler: func(c *Call) (any, error) {
			uuid, err := c.vmUUID(0)
			if err != nil {
				uuid = c.Str(0) // a VM that left this pool: by uuid
			}
			r, ok := c.Sim.LastMigration(uuid)
			if !ok {
				return map[string]string{}, nil
			}
			return r.Map(), nil
		}})
	Register(&Method{Name: "sim.inject_fault", Params: []Param{p("point", KString)},
		Handler: func(c *Call) (any, error) { return "", c.Sim.InjectFault(c.Str(0)) }})
	Register(&Method{Name: "sim.endpoint_bytes", Params: []Param{},
		Handler: func(c *Call) (any, error) {
			sm, xo := c.Sim.EndpointBytes()
			return map[string]string{"SM": itoa(sm), "xenops": itoa(xo)}, nil
		}})
}

// vmUUID resolves argument i (a VM ref of the call's pool, or a uuid).
func (c *Call) vmUUID(i int) (string, error) {
	c.Pool.mu.Lock()
	defer c.Pool.mu.Unlock()
	if o, err := c.Pool.db.get("VM", c.Str(i)); err == nil {
		return o.str("uuid"), nil
	}
	if o, err := c.Pool.db.byUUID("VM", c.Str(i)); err == nil {
		return o.str("uuid"), nil
	}
	return "", Errorf(ErrHandleInvalid, "VM", c.Str(i))
}

// hostMigrateReceive builds the dest map as Xapi_host.migrate_receive.
func hostMigrateReceive(c *Call) (any, error) {
	d := c.db()
	host, err := d.get("host", c.Str(0))
	if err != nil {
		return nil, err
	}
	nw, err := d.get("network", c.Str(1))
	if err != nil {
		return nil, err
	}
	var pif *object
	for _, o := range d.find("PIF", "network", nw.Ref) {
		if o.str("host") == host.Ref {
			pif = o
			break
		}
	}
	if pif == nil {
		return nil, Errorf("HOST_CANNOT_ATTACH_NETWORK", host.Ref, nw.Ref)
	}
	ip := pif.str("IP")
	if ip == "" {
		v6s, _ := pif.Fields["IPv6"].([]string)
		for _, v6 := range v6s {
			if a, _, _ := strings.Cut(v6, "/"); a != "" && !strings.HasPrefix(strings.ToLower(a), "fe80") {
				ip = a
				break
			}
		}
	}
	if ip == "" {
		if pif.str("ip_configuration_mode") == "None" && pif.str("ipv6_configuration_mode") == "None" {
			return nil, Errorf("PIF_HAS_NO_NETWORK_CONFIGURATION", pif.Ref)
		}
		return nil, Errorf("INTERFACE_HAS_NO_IP", pif.Ref)
	}
	h := c.Pool.hostByRef(host.Ref, c.Host)
	port := "80"
	if u, err := url.Parse(h.url); err == nil && u.Port() != "" {
		port = u.Port()
	}
	hostPort := net.JoinHostPort(ip, port)
	sess := c.Pool.newSession(host.Ref, c.Sim.cfg.Username, "migrate_receive")
	coord := c.Pool.Coordinator()
	master := "http://" + hostPort + "/"
	if u, err := url.Parse(coord.url); err == nil {
		master = "http://" + u.Host + "/"
	}
	q := url.Values{"session_id": {sess}}.Encode()
	return map[string]string{
		"SM":         "http://" + hostPort + "/services/SM?" + q,
		"xenops":     "http://" + hostPort + "/services/xenops?" + q,
		"host":       host.Ref,
		"session_id": sess,
		"master":     master,
	}, nil
}

// parseBoolOption is xapi's get_bool_option (compress).
func parseBoolOption(v string) (bool, bool) {
	switch strings.ToLower(v) {
	case "true", "on", "1":
		return true, true
	case "false", "off", "0":
		return false, true
	}
	return false, false
}

// remote is one destination endpoint (SM or xenops URL of a dest map).
type remote struct {
	client  *http.Client
	base    *url.URL
	session string
	sent    atomic.Int64
}

func newRemote(client *http.Client, raw, session string) (*remote, error) {
	u, err := url.Parse(raw)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("bad URL %q", raw)
	}
	if session == "" {
		session = u.Query().Get("session_id")
	}
	return &remote{client: client, base: u, session: session}, nil
}

// errNoAnswer marks a request whose outcome is unknown (connection lost
// before the answer), as opposed to one the destination refused.
var errNoAnswer = errors.New("no answer from the destination")

// do sends one request; out (if not nil) receives the JSON answer.
func (r *remote) do(ctx context.Context, method, op string, q url.Values, body []byte, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	return r.send(ctx, method, op, q, bytes.NewReader(body), int64(len(body)), out)
}

// stream sends a body of n bytes read from body. It has no overall time
// limit but fails when no byte moved for a minute.
func (r *remote) stream(ctx context.Context, method, op string, q url.Values, body io.Reader, n int64) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	go func() {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				if time.Since(time.Unix(0, last.Load())) > time.Minute {
					cancel()
					return
				}
			}
		}
	}()
	return r.send(ctx, method, op, q, progressReader{r: body, last: &last}, n, nil)
}

type progressReader struct {
	r    io.Reader
	last *atomic.Int64
}

func (p progressReader) Read(b []byte) (int, error) {
	n, err := p.r.Read(b)
	if n > 0 {
		p.last.Store(time.Now().UnixNano())
	}
	return n, err
}

func (r *remote) send(ctx context.Context, method, op string, q url.Values, body io.Reader, length int64, out any) error {
	u := *r.base
	u.Path = strings.TrimSuffix(u.Path, "/") + "/" + op
	vals := u.Query()
	for k, v := range q {
		vals[k] = v
	}
	vals.Set("session_id", r.session)
	u.RawQuery = vals.Encode()
	req, err := http.NewRequestWithContext(ctx, method, u.String(), io.NopCloser(body))
	if err != nil {
		return err
	}
	req.ContentLength = length
	r.sent.Add(length)
	resp, err := r.client.Do(req)
	if err != nil {
		return fmt.Errorf("%s %s: %w: %w", method, op, errNoAnswer, err)
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %w: %w", method, op, errNoAnswer, err)
	}
	if resp.StatusCode/100 != 2 {
		var f struct {
			Error []string `json:"error"`
		}
		if json.Unmarshal(b, &f) == nil && len(f.Error) > 0 {
			return Errorf(f.Error[0], f.Error[1:]...)
		}
		return fmt.Errorf("%s %s: HTTP %d %s", method, op, resp.StatusCode, strings.TrimSpace(string(b)))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s %s: %w", method, op, err)
		}
	}
	return nil
}

func (r *remote) json(ctx context.Context, op string, q url.Values, in, out any) error {
	b, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return r.do(ctx, http.MethodPost, op, q, b, out)
}

// migDisk is one disk to move.
type migDisk struct {
	vdiRef, vdiUUID string
	size            int64
	sr              string // destination SR
	name, desc      string
	contentID       string
	snapCIDs        []string // snapshots' content_ids, nearest first
	vbd             importVBD

	destRef, destUUID, base string
	mirror                  *mirror
}

// migPlan is a validated migrate_send.
type migPlan struct {
	s                 *Sim
	c                 *Call
	vmRef, vmUUID     string
	srcHost, destHost string
	state             string
	domid             int64
	copy              bool
	disks             []*migDisk
	vifs              []importVIF
	meta              importReq
	sm, xo            *remote
	client            *http.Client
	storage           bool // counted in the concurrency limit
}

func (pl *migPlan) close() {
	pl.client.CloseIdleConnections()
	if pl.storage {
		e := pl.s.ext()
		e.mu.Lock()
		e.active[pl.c.Pool]--
		e.mu.Unlock()
	}
}

// planMigration validates a migrate_send / assert_can_migrate call.
func (s *Sim) planMigration(c *Call) (*migPlan, error) {
	p := c.Pool
	dest, vdiMap, vifMap, opts := c.Map(1), c.Map(3), c.Map(4), c.Map(5)
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err := p.db.get("VM", c.Str(0))
	if err != nil {
		return nil, err
	}
	if vm.bool("is_control_domain") {
		return nil, Errorf(ErrOperationNotAllowed, "This operation is not allowed on a control domain")
	}
	if vm.bool("is_a_snapshot") || vm.bool("is_a_template") {
		return nil, Errorf(ErrOperationNotAllowed, "This operation is not allowed on a snapshot or template")
	}
	ps := vm.str("power_state")
	if ps != Halted && ps != Suspended && ps != Running {
		return nil, badPowerState(vm.Ref, ps, Halted, Suspended, Running)
	}
	for _, k := range []string{"SM", "xenops", "host", "session_id", "master"} {
		if _, ok := dest[k]; !ok {
			return nil, Errorf(ErrInternal, "Not_found: dest map has no "+k)
		}
	}
	pl := &migPlan{s: s, c: c, vmRef: vm.Ref, vmUUID: vm.str("uuid"), state: ps, domid: vm.int("domid"),
		destHost: dest["host"], copy: opts["copy"] == "true"}
	if _, ok := opts["compress"]; ok {
		if _, valid := parseBoolOption(opts["compress"]); !valid {
			return nil, Errorf(ErrInvalidValue, "compress", opts["compress"])
		}
	}
	pl.srcHost = vm.str("resident_on")
	if pl.srcHost == "" || pl.srcHost == NullRef {
		pl.srcHost = p.Coordinator().Ref
	}
	pl.client = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4, DisableCompression: true}}
	if pl.sm, err = newRemote(pl.client, dest["SM"], dest["session_id"]); err != nil {
		return nil, Errorf(ErrInternal, "dest SM: "+err.Error())
	}
	if pl.xo, err = newRemote(pl.client, dest["xenops"], dest["session_id"]); err != nil {
		return nil, Errorf(ErrInternal, "dest xenops: "+err.Error())
	}
	for _, vbd := range p.db.find("VBD", "VM", vm.Ref) {
		vdi, err := p.db.get("VDI", vbd.str("VDI"))
		if err != nil {
			continue // empty CD
		}
		sr, ok := vdiMap[vdi.Ref]
		if !ok {
			return nil, Errorf("VDI_NOT_IN_MAP", vdi.Ref)
		}
		if vdi.bool("cbt_enabled") {
			return nil, Errorf(ErrVDICBTEnabled, vdi.Ref)
		}
		d := &migDisk{vdiRef: vdi.Ref, vdiUUID: vdi.str("uuid"), size: vdi.int("virtual_size"), sr: sr,
			name: vdi.str("name_label"), desc: vdi.str("name_description"),
			contentID: vdi.strMap("other_config")["content_id"],
			vbd:       importVBD{Userdevice: vbd.str("userdevice"), Bootable: vbd.bool("bootable"), Mode: vbd.str("mode"), Type: vbd.str("type")}}
		snaps := p.db.find("VDI", "snapshot_of", vdi.Ref)
		slices.SortStableFunc(snaps, func(a, b *object) int {
			ta, _ := a.Fields["snapshot_time"].(time.Time)
			tb, _ := b.Fields["snapshot_time"].(time.Time)
			if c := tb.Compare(ta); c != 0 {
				return c
			}
			return int(b.Created - a.Created)
		})
		for _, sn := range snaps {
			if cid := sn.strMap("other_config")["content_id"]; cid != "" {
				d.snapCIDs = append(d.snapCIDs, cid)
			}
		}
		pl.disks = append(pl.disks, d)
	}
	for _, vif := range p.db.find("VIF", "VM", vm.Ref) {
		nw, ok := vifMap[vif.Ref]
		if !ok {
			return nil, Errorf("VIF_NOT_IN_MAP", vif.Ref)
		}
		pl.vifs = append(pl.vifs, importVIF{Network: nw, Device: vif.str("device"), MAC: vif.str("MAC"), MTU: vif.int("MTU")})
	}
	oc := maps2(vm.strMap("other_config"))
	pl.meta = importReq{UUID: pl.vmUUID, NameLabel: vm.str("name_label"), NameDesc: vm.str("name_description"),
		Memory: vm.int("memory_static_max"), MemoryMin: vm.int("memory_static_min"), MemoryDyn: vm.int("memory_dynamic_max"),
		MemoryDMin: vm.int("memory_dynamic_min"), VCPUsMax: vm.int("VCPUs_max"), VCPUsStart: vm.int("VCPUs_at_startup"),
		HVMBoot: vm.str("HVM_boot_policy"), Domarch: vm.str("domarch"), Platform: maps2(vm.strMap("platform")),
		OtherConfig: oc, Host: pl.destHost, VIFs: pl.vifs, GuestMetrics: p.db.exportGuestMetrics(vm),
		Metrics: p.db.exportVMMetrics(vm)}
	if pl.copy {
		pl.meta.UUID = ""
	}
	return pl, nil
}

// check asks the destination whether the SRs, networks and host exist.
func (pl *migPlan) check(ctx context.Context) error {
	srs, nws := []string{}, []string{}
	for _, d := range pl.disks {
		srs = append(srs, d.sr)
	}
	for _, v := range pl.vifs {
		nws = append(nws, v.Network)
	}
	req := map[string]any{"host": pl.destHost, "srs": srs, "networks": nws}
	if err := pl.sm.json(ctx, "check", nil, req, nil); err != nil {
		// The destination's own errors (HANDLE_INVALID of an SR...) are
		// passed on; a refused session is not the caller's session, so it
		// is reported as a migration failure (SESSION_INVALID would make
		// clients log in again).
		var f *Fault
		if errors.As(err, &f) && f.Code != ErrSessionInvalid {
			return f
		}
		return pl.failed(err)
	}
	return nil
}

func (pl *migPlan) failed(err error) error {
	var f *Fault
	if errors.As(err, &f) && (f.Code == ErrTaskCancelled || f.Code == "VM_MIGRATE_FAILED" || f.Code == ErrHookFailed) {
		return f
	}
	return Errorf("VM_MIGRATE_FAILED", pl.vmRef, pl.srcHost, pl.destHost, err.Error())
}

// cancelled reports a pending task.cancel as TASK_CANCELLED.
func cancelled(c *Call) error {
	if c.Task == "" {
		return nil
	}
	c.Pool.mu.Lock()
	defer c.Pool.mu.Unlock()
	if c.Pool.TaskCancelled(c.Task) {
		return Errorf(ErrTaskCancelled, c.Task)
	}
	return nil
}

func progress01(c *Call, f float64) {
	if c.Task == "" {
		return
	}
	c.Pool.mu.Lock()
	defer c.Pool.mu.Unlock()
	// Progress only rises (memory rounds restart their own count).
	if o, err := c.Pool.db.get("task", c.Task); err == nil {
		if cur, _ := o.Fields["progress"].(float64); cur >= min(f, 0.99) {
			return
		}
	}
	c.Pool.SetTaskProgress(c.Task, min(f, 0.99))
}

// migrateSend implements VM.migrate_send.
func (s *Sim) migrateSend(c *Call) (any, error) {
	pl, err := s.planMigration(c)
	if err != nil {
		return nil, err
	}
	defer pl.close()
	e := s.ext()
	if len(pl.disks) > 0 {
		e.mu.Lock()
		if e.active[c.Pool] >= MaxStorageMigrates {
			e.mu.Unlock()
			return nil, Errorf("TOO_MANY_STORAGE_MIGRATES", strconv.Itoa(MaxStorageMigrates))
		}
		e.active[c.Pool]++
		pl.storage = true
		e.mu.Unlock()
	}
	opRef, err := pl.beginOperation()
	if err != nil {
		return nil, err
	}
	defer pl.endOperation(opRef)
	if err := pl.check(c.Ctx); err != nil {
		return nil, err
	}
	rec := MigrationRecord{VM: pl.vmUUID, Kind: "migrate_send", SourceHost: pl.srcHost, DestHost: pl.destHost, Started: time.Now().UTC()}
	ref, err := pl.run(&rec)
	rec.SMBytes, rec.XenopsBytes = pl.sm.sent.Load(), pl.xo.sent.Load()
	rec.Finished = time.Now().UTC()
	rec.Result = "success"
	if err != nil {
		rec.Result, rec.Error = "failure", err.Error()
		if errors.Is(err, Errorf(ErrTaskCancelled)) {
			rec.Result = "cancelled"
		}
	}
	e.setRecord(rec)
	if err != nil {
		s.log.Warn("migrate_send failed", "vm", pl.vmUUID, "error", err)
		return nil, err
	}
	s.log.Info("migrate_send done", "vm", pl.vmUUID, "pause_ms", rec.PauseMS, "sm_bytes", rec.SMBytes,
		"xenops_bytes", rec.XenopsBytes, "incremental", rec.Incremental)
	return ref, nil
}

// beginOperation records migrate_send in the VM's current_operations (as
// xapi does, so clients see it), refusing a VM already busy with another
// operation.
func (pl *migPlan) beginOperation() (string, error) {
	p := pl.c.Pool
	p.mu.Lock()
	defer p.mu.Unlock()
	vm, err := p.db.get("VM", pl.vmRef)
	if err != nil {
		return "", err
	}
	ops := vm.strMap("current_operations")
	for ref, op := range ops {
		// xapi_vm_lifecycle: [class, object, operation, operation ref].
		return "", Errorf("OTHER_OPERATION_IN_PROGRESS", "VM", vm.Ref, op, ref)
	}
	op := pl.c.Task
	if op == "" {
		op = NewRef()
	}
	ops[op] = "migrate_send"
	p.db.touch(vm)
	return op, nil
}

func (pl *migPlan) endOperation(op string) {
	p := pl.c.Pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if vm, err := p.db.get("VM", pl.vmRef); err == nil {
		delete(vm.strMap("current_operations"), op)
		p.db.touch(vm)
	}
}

// run moves the VM; before the destination VM runs, any failure rolls
// back (VM intact at the source, destination objects removed).
func (pl *migPlan) run(rec *MigrationRecord) (string, error) {
	s, c, e := pl.s, pl.c, pl.s.ext()
	ctx := c.Ctx
	destVM := ""
	var mem *memImage
	unfreeze := func() {}
	rollback := func(cause error) error {
		unfreeze()
		for _, d := range pl.disks {
			e.removeMirror(d)
		}
		if mem != nil {
			mem.stopTracking()
		}
		bg := context.WithoutCancel(ctx)
		if destVM != "" {
			_ = pl.xo.do(bg, http.MethodPost, "abort", url.Values{"vm": {destVM}}, nil, nil)
		}
		for _, d := range pl.disks {
			if d.destUUID != "" {
				_ = pl.sm.do(bg, http.MethodPost, "destroy", url.Values{"vdi": {d.destUUID}}, nil, nil)
			}
		}
		return pl.failed(cause)
	}

	// Storage: prepare each disk, mirror new writes, copy the difference.
	var total, done int64
	plans := make([][]byte, len(pl.disks))
	for i, d := range pl.disks {
		if err := cancelled(c); err != nil {
			return "", rollback(err)
		}
		var out struct{ VDI, UUID, Base string }
		err := pl.sm.json(ctx, "prepare", nil, map[string]any{"sr": d.sr, "size": d.size, "name_label": d.name,
			"name_description": d.desc, "content_ids": append([]string{}, d.snapCIDs...)}, &out)
		if err != nil {
			return "", rollback(err)
		}
		d.destRef, d.destUUID, d.base = out.VDI, out.UUID, out.Base
		d.vbd.VDI = d.destRef
		if d.base != "" {
			rec.Incremental = true
			rec.BaseVDIs = append(rec.BaseVDIs, d.destRef)
		}
		bm, err := e.startMirror(pl, d)
		if err != nil {
			return "", rollback(err)
		}
		plans[i] = bm
		total += int64(popcount(bm)) * CBTBlockSize
	}
	for i, d := range pl.disks {
		n, err := pl.copyBlocks(d, plans[i], func(k int64) {
			done += k
			if total > 0 {
				progress01(c, 0.6*float64(done)/float64(total))
			}
		}, total/2-done)
		rec.DiskBytes += n
		if err != nil {
			return "", rollback(err)
		}
	}

	// The VM's metadata and devices at the destination.
	meta := pl.meta
	for _, d := range pl.disks {
		meta.VBDs = append(meta.VBDs, d.vbd)
	}
	var imp struct{ VM string }
	if err := pl.xo.json(ctx, "import", nil, meta, &imp); err != nil {
		return "", rollback(err)
	}
	destVM = imp.VM
	rec.DestVM = destVM

	// Memory: pre-copy rounds, then stop-and-copy.
	final := Halted
	var vers []uint32
	var pauseStart time.Time
	if !pl.copy && (pl.state == Running || pl.state == Suspended) {
		final = pl.state
		mem = e.memFor(pl.vmUUID, pl.meta.Memory)
		if pl.state == Running {
			src := s.hostOf(c.Pool, pl.srcHost)
			if err := migrateHook(ctx, s, src, "vm-pre-migrate", pl.vmUUID, "source", pl.domid); err != nil {
				return "", rollback(err)
			}
		}
		var err error
		unfreeze, vers, pauseStart, err = pl.streamMemory(ctx, pl.xo, destVM, mem, rec, pl.state == Running)
		if err != nil {
			return "", rollback(err)
		}
	}
	for _, d := range pl.disks {
		if err := e.removeMirror(d); err != nil {
			return "", rollback(err)
		}
		rec.MirroredWrites += d.mirror.writes.Load()
		rec.MirrorBytes += d.mirror.bytes.Load()
	}
	if e.takeFault("before_start") {
		return "", rollback(errors.New("injected fault before the destination VM starts"))
	}
	var fin struct {
		HookError string `json:"hook_error"`
	}
	err := pl.xo.json(ctx, "finish", url.Values{"vm": {destVM}}, map[string]any{"state": final, "host": pl.destHost}, &fin)
	if err == nil && e.takeFault("finish_answer") {
		err = fmt.Errorf("finish: %w: injected fault: answer lost", errNoAnswer)
	}
	if err != nil {
		// Without an answer the destination may already run the VM: ask
		// (the guest stays paused meanwhile) before resuming here, so the
		// VM never runs in two places.
		if !errors.Is(err, errNoAnswer) || !pl.destStarted(ctx, destVM, final) {
			return "", rollback(err)
		}
		s.log.Warn("finish answer lost but the destination runs the VM; going on", "vm", pl.vmUUID, "error", err)
	}
	// The VM runs at the destination: from here on, forward only.
	if !pl.copy && pl.state != Halted {
		c.Pool.mu.Lock()
		if o, err := c.Pool.db.get("VM", pl.vmRef); err == nil {
			c.Pool.setPowerState(o, Halted, "")
		}
		c.Pool.mu.Unlock()
	}
	unfreeze()
	if !pauseStart.IsZero() {
		rec.PauseMS = time.Since(pauseStart).Milliseconds()
	}
	if mem != nil {
		mem.stopTracking()
	}
	bg := context.WithoutCancel(ctx)
	oc := map[string]string{"sim:migration_pause_ms": itoa(rec.PauseMS)}
	var ver struct{ OK bool }
	digest := ""
	if vers != nil {
		d := mem.digest(vers)
		digest = hex.EncodeToString(d[:])
	}
	if err := pl.xo.json(bg, "verify", url.Values{"vm": {destVM}}, map[string]any{"digest": digest, "other_config": oc}, &ver); err != nil {
		s.log.Warn("memory verification failed", "vm", pl.vmUUID, "error", err)
	}
	rec.MemoryVerified = ver.OK
	if !pl.copy {
		pl.removeSource()
	}
	progress01(c, 1)
	if fin.HookError != "" {
		return "", decodeHookError(fin.HookError)
	}
	return destVM, nil
}

// decodeHookError turns the destination's vm-post-migrate failure back
// into its Fault (the VM has moved; the call only reports the failure).
func decodeHookError(s string) error {
	var f Fault
	if json.Unmarshal([]byte(s), &f) == nil && f.Code != "" {
		return &f
	}
	return Errorf(ErrInternal, s)
}

// finishResolveTime bounds how long a source whose finish request got no
// answer keeps asking the destination whether the VM runs there.
var finishResolveTime = 2 * time.Minute

// destStarted asks the destination (retrying while it is unreachable, up
// to finishResolveTime) whether the imported VM reached state final.
func (pl *migPlan) destStarted(ctx context.Context, destVM, final string) bool {
	deadline := time.Now().Add(finishResolveTime)
	for {
		var st struct{ State string }
		err := pl.xo.json(context.WithoutCancel(ctx), "status", url.Values{"vm": {destVM}}, map[string]string{}, &st)
		if err == nil {
			return st.State == final && final != Halted
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(500 * time.Millisecond)
	}
}

func (s *Sim) hostOf(p *Pool, ref string) *Host {
	return p.hostByRef(ref, p.Coordinator())
}

// removeSource deletes the migrated VM and its disks from the source pool.
func (pl *migPlan) removeSource() {
	p := pl.c.Pool
	p.mu.Lock()
	defer p.mu.Unlock()
	o, err := p.db.get("VM", pl.vmRef)
	if err != nil {
		return
	}
	if sv, err := p.db.get("VDI", o.str("suspend_VDI")); err == nil && !p.vdiAttached(sv) {
		p.destroyVDI(sv)
	}
	p.destroyVMRecord(o)
	for _, d := range pl.disks {
		if v, err := p.db.get("VDI", d.vdiRef); err == nil && !p.vdiAttached(v) {
			p.destroyVDI(v)
		}
	}
}

func popcount(bm []byte) int {
	n := 0
	for _, b := range bm {
		for ; b != 0; b &= b - 1 {
			n++
		}
	}
	return n
}

// startMirror registers the write mirror of a disk and returns the blocks
// to copy: those changed since the matched base, or the allocated ones
// for a new VDI. Both happen under the VDI's data lock, so every write is
// either in the returned set or mirrored.
func (e *simExt) startMirror(pl *migPlan, d *migDisk) ([]byte, error) {
	s := e.s
	p, _, err := s.findVDI(d.vdiUUID)
	if err != nil {
		return nil, err
	}
	st := p.state(d.vdiUUID)
	p.mu.Unlock()
	st.data.Lock()
	defer st.data.Unlock()
	bm := make([]byte, bitmapLen(d.size))
	all := func() {
		for i := int64(0); i < d.size; i += CBTBlockSize {
			markBlocks(bm, i, 1)
		}
	}
	switch {
	case d.base != "":
		p.mu.Lock()
		cur := ""
		if o, err := p.db.byUUID("VDI", d.vdiUUID); err == nil {
			cur = o.strMap("other_config")["content_id"]
		}
		p.mu.Unlock()
		if cur != d.base {
			if changed, ok := e.changedSince(d.vdiUUID, d.base); ok {
				bm = changed
			} else {
				all() // unknown history (e.g. after a restart): everything
			}
		}
	default:
		path, err := s.VDIPath(d.vdiUUID)
		if err != nil {
			return nil, err
		}
		if err := markAllocated(bm, path, d.size); err != nil {
			all()
		}
	}
	dest := d.destUUID
	d.mirror = &mirror{send: func(off int64, data []byte) error {
		if e.takeFault("mirror") {
			return errors.New("injected mirror fault")
		}
		return pl.sm.do(context.WithoutCancel(pl.c.Ctx), http.MethodPut, "write",
			url.Values{"vdi": {dest}, "offset": {itoa(off)}}, data, nil)
	}}
	e.mu.Lock()
	e.mirrors[d.vdiUUID] = d.mirror
	e.mu.Unlock()
	return bm, nil
}

// removeMirror stops a disk's mirror and returns its failure, if any.
func (e *simExt) removeMirror(d *migDisk) error {
	if d.mirror == nil {
		return nil
	}
	e.mu.Lock()
	if e.mirrors[d.vdiUUID] == d.mirror {
		delete(e.mirrors, d.vdiUUID)
	}
	e.mu.Unlock()
	if err := d.mirror.failed(); err != nil {
		return fmt.Errorf("mirror of VDI %s: %w", d.vdiUUID, err)
	}
	return nil
}

// markAllocated sets the blocks holding data (SEEK_DATA/SEEK_HOLE).
func markAllocated(bm []byte, path string, size int64) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer func() { _ = f.Close() }()
	var off int64
	for off < size {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if err != nil {
			if errors.Is(err, unix.ENXIO) {
				return nil
			}
			return err
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			hole = size
		}
		hole = min(hole, size)
		markBlocks(bm, data, hole-data)
		off = hole
	}
	return nil
}

// copyBlocks sends the marked blocks of a disk in runs of up to 1 MiB,
// each read and sent under the VDI's data lock (ordered with mirrored
// writes). faultAt: bytes after which an armed "sm_copy" fault fires.
func (pl *migPlan) copyBlocks(d *migDisk, bm []byte, onProgress func(int64), faultAt int64) (int64, error) {
	s, e := pl.s, pl.s.ext()
	path, err := s.VDIPath(d.vdiUUID)
	if err != nil {
		return 0, err
	}
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("read VDI: %w", err)
	}
	defer func() { _ = f.Close() }()
	p, _, err := s.findVDI(d.vdiUUID)
	if err != nil {
		return 0, err
	}
	st := p.state(d.vdiUUID)
	p.mu.Unlock()
	blocks := d.size / CBTBlockSize
	if d.size%CBTBlockSize != 0 {
		blocks++
	}
	isSet := func(b int64) bool { return bm[b/8]&(0x80>>(b%8)) != 0 }
	const maxRun = 16 // 1 MiB
	var sent int64
	buf := make([]byte, maxRun*CBTBlockSize)
	for b := int64(0); b < blocks; {
		if !isSet(b) {
			b++
			continue
		}
		start := b
		for b < blocks && isSet(b) && b-start < maxRun {
			b++
		}
		if err := cancelled(pl.c); err != nil {
			return sent, err
		}
		if err := d.mirror.failed(); err != nil {
			return sent, err
		}
		if sent >= faultAt && e.takeFault("sm_copy") {
			return sent, errors.New("injected fault: destination SM connection lost mid-copy")
		}
		off := start * CBTBlockSize
		n := min((b-start)*CBTBlockSize, d.size-off)
		err := func() error {
			st.data.Lock()
			defer st.data.Unlock()
			if _, err := f.ReadAt(buf[:n], off); err != nil && !errors.Is(err, io.EOF) {
				return fmt.Errorf("read VDI: %w", err)
			}
			return pl.sm.do(pl.c.Ctx, http.MethodPut, "write", url.Values{"vdi": {d.destUUID}, "offset": {itoa(off)}}, buf[:n], nil)
		}()
		if err != nil {
			return sent, err
		}
		sent += n
		onProgress(n)
	}
	return sent, nil
}

// streamMemory sends the memory image in pre-copy rounds to a xenops
// endpoint, then (live) freezes the guest and sends the last dirty pages.
// It returns the unfreeze function (the caller unfreezes once the VM runs
// at the destination), the final page versions and when the pause began.
func (pl *migPlan) streamMemory(ctx context.Context, xo *remote, destVM string, mem *memImage, rec *MigrationRecord, live bool) (func(), []uint32, time.Time, error) {
	return streamMemory(ctx, pl.c, pl.s.ext(), xo, destVM, pl.vmUUID, mem, rec, live)
}

func streamMemory(ctx context.Context, c *Call, e *simExt, xo *remote, destVM, vmUUID string, mem *memImage, rec *MigrationRecord, live bool) (func(), []uint32, time.Time, error) {
	mem.startTracking()
	all := make([]int64, mem.pages())
	for i := range all {
		all[i] = int64(i)
	}
	// Each round is one streamed request, as xenopsd streams memory over
	// one connection (no round trip per batch).
	send := func(idx []int64, round int) error {
		pr, pw := io.Pipe()
		done := make(chan error, 1) // the generator's own failure (nil if none)
		go func() {
			const batch = 256
			rb := make([]byte, 0, batch*(8+PageSize))
			for i := 0; i < len(idx); i += batch {
				if err := cancelled(c); err != nil {
					_ = pw.CloseWithError(err)
					done <- err
					return
				}
				if round == 1 && i >= len(idx)/2 && i-batch < len(idx)/2 && e.takeFault("memory") {
					err := errors.New("injected fault: xenops connection lost mid-stream")
					_ = pw.CloseWithError(err)
					done <- err
					return
				}
				rb = rb[:0]
				mem.mu.Lock()
				for _, pg := range idx[i:min(i+batch, len(idx))] {
					var hdr [8]byte
					binary.LittleEndian.PutUint64(hdr[:], uint64(pg))
					rb = append(rb, hdr[:]...)
					n := len(rb)
					rb = rb[:n+PageSize]
					mem.fillPage(rb[n:], pg, mem.ver[pg])
				}
				mem.mu.Unlock()
				if _, err := pw.Write(rb); err != nil {
					done <- nil // the request failed; stream reports it
					return
				}
				rec.MemoryBytes += int64(len(rb) / (8 + PageSize) * PageSize)
				progress01(c, 0.6+0.35*float64(i)/float64(max(1, len(idx)))/float64(round))
			}
			_ = pw.Close()
			done <- nil
		}()
		err := xo.stream(ctx, http.MethodPut, "memory", url.Values{"vm": {destVM}}, pr, int64(len(idx))*(8+PageSize))
		_ = pr.CloseWithError(io.ErrClosedPipe) // stops the generator if the request ended early
		if gerr := <-done; gerr != nil {
			return gerr
		}
		return err
	}
	if err := send(all, 1); err != nil {
		return func() {}, nil, time.Time{}, err
	}
	rec.Rounds = 1
	for live && rec.Rounds <= maxPrecopyRounds && mem.dirtyCount() > precopyDirtyThreshold {
		idx, _ := mem.takeDirty()
		rec.Rounds++
		if err := send(idx, rec.Rounds); err != nil {
			return func() {}, nil, time.Time{}, err
		}
	}
	pauseStart := time.Now()
	unfreeze := e.freeze(vmUUID)
	idx, _ := mem.takeDirty()
	rec.FinalPages = len(idx)
	if err := send(idx, rec.Rounds+1); err != nil {
		unfreeze()
		return func() {}, nil, time.Time{}, err
	}
	return unfreeze, mem.versions(), pauseStart, nil
}
