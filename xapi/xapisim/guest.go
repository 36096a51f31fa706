package xapisim

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Guest write patterns.
const (
	PatternSequential = "sequential"
	PatternRandom     = "random"
	PatternHotSet     = "hot-set"
)

// GuestConfig sets a simulated guest workload.
type GuestConfig struct {
	// Rate is the disk write rate in bytes per second (0: no disk writes).
	Rate int64
	// Pattern is sequential, random or hot-set (default random).
	Pattern string
	// BlockSize is the size of each write (default 64 KiB, 4 KiB aligned).
	BlockSize int64
	// HotSet is the size of the region at the start of each disk that
	// hot-set writes go to (90% of them; default 1/16 of the disk).
	HotSet int64
	// Seed makes the offsets and data reproducible (default 1).
	Seed uint64
	// DirtyRate is the memory page-dirty rate in bytes per second.
	DirtyRate int64
}

// GuestStats describes a guest workload.
type GuestStats struct {
	Running      bool   `json:"running"`
	Pattern      string `json:"pattern"`
	Rate         int64  `json:"rate"`
	DirtyRate    int64  `json:"dirty_rate"`
	Writes       int64  `json:"writes"`
	BytesWritten int64  `json:"bytes_written"`
	WriteErrors  int64  `json:"write_errors"`
	PagesDirtied int64  `json:"pages_dirtied"`
	// MirroredWrites counts writes that were also sent to a migration's
	// destination before being acknowledged.
	MirroredWrites int64  `json:"mirrored_writes"`
	LastError      string `json:"last_error,omitempty"`
	// Cap is the Xen scheduler cap of the VM's domain as the host's xl
	// stand-in holds it (percent of one CPU, 0 = none) and VCPUs the vCPU
	// count it is measured against; EffectiveRate and EffectiveDirtyRate
	// are Rate and DirtyRate scaled by min(1, Cap/(100*VCPUs)) when Cap > 0.
	// They are refreshed at most every 250 ms.
	Cap                int64 `json:"cap"`
	VCPUs              int64 `json:"vcpus"`
	EffectiveRate      int64 `json:"effective_rate"`
	EffectiveDirtyRate int64 `json:"effective_dirty_rate"`
}

// GuestVerify is the result of comparing a VM's disks with the guest's
// shadow copies.
type GuestVerify struct {
	OK bool `json:"ok"`
	// Disk is the userdevice of the first mismatching disk.
	Disk string `json:"disk,omitempty"`
	// MismatchOffset is the first differing byte (-1 when OK).
	MismatchOffset int64 `json:"mismatch_offset"`
	// Disks is how many disks were compared.
	Disks int `json:"disks"`
}

// ErrNoGuest is returned for a VM without a guest workload.
var ErrNoGuest = errors.New("no guest workload on this VM")

// guest is one VM's workload. The writer goroutine does each write (and
// each memory-dirtying step) under mu, releasing it between writes, so freeze
// (taking mu) waits for at most the one write in flight and then holds the
// guest still.
type guest struct {
	e   *simExt
	vm  string
	cfg GuestConfig
	dir string

	mu      sync.Mutex
	frozen  int
	rng     *rand.Rand
	seqOff  int64
	shadows map[string]*os.File // by VBD userdevice
	stats   GuestStats

	stop     chan struct{}
	stopOnce sync.Once
	done     chan struct{}

	thr guestThrottle // used by the writer goroutine only
}

// capPoll is how often the guest re-reads its domain's scheduler cap.
const capPoll = 250 * time.Millisecond

// guestThrottle caches the scheduler cap of the guest's domain.
type guestThrottle struct {
	next   time.Time // when to read again
	path   string    // sched file last read
	cap    int64
	factor float64
}

// throttle returns the share of its configured rates the guest may use
// now: min(1, cap/(100*vCPUs)) with a cap set on its domain through the
// xl stand-in, else 1. The sched file is read at most every capPoll; a
// change is published in the stats.
func (g *guest) throttle(now time.Time) float64 {
	t := &g.thr
	if now.Before(t.next) {
		return t.factor
	}
	t.next = now.Add(capPoll)
	path, vcpus := g.e.s.vmDomainSched(g.vm)
	capv := int64(0)
	if path != "" {
		b, err := os.ReadFile(path)
		if err == nil {
			c, ok := parseSchedCap(b)
			switch {
			case ok:
				capv = c
			case path == t.path:
				capv = t.cap // being rewritten: keep the last value
			}
		}
	}
	t.path, t.cap = path, capv
	t.factor = 1
	if capv > 0 {
		t.factor = min(1, float64(capv)/float64(100*vcpus))
	}
	g.mu.Lock()
	g.stats.Cap, g.stats.VCPUs = capv, vcpus
	g.stats.EffectiveRate = int64(float64(g.cfg.Rate) * t.factor)
	g.stats.EffectiveDirtyRate = int64(float64(g.cfg.DirtyRate) * t.factor)
	g.mu.Unlock()
	return t.factor
}

// ParseByteRate parses a rate like "2MiB/s", "512KiB", "100000" (bytes per
// second).
func ParseByteRate(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(t, "/s")
	mult := int64(1)
	for _, u := range []struct {
		suf string
		m   int64
	}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}, {"G", 1 << 30}, {"M", 1 << 20}, {"K", 1 << 10}, {"B", 1}} {
		if strings.HasSuffix(t, u.suf) {
			t, mult = strings.TrimSuffix(t, u.suf), u.m
			break
		}
	}
	n, err := strconv.ParseInt(strings.TrimSpace(t), 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("bad rate %q", s)
	}
	return n * mult, nil
}

// GuestConfigFromMap reads the options map of sim.guest_start: rate,
// pattern, block_size, hot_set, seed, dirty_rate.
func GuestConfigFromMap(m map[string]string) (GuestConfig, error) {
	var c GuestConfig
	var err error
	for k, v := range m {
		switch k {
		case "rate":
			c.Rate, err = ParseByteRate(v)
		case "dirty_rate":
			c.DirtyRate, err = ParseByteRate(v)
		case "block_size":
			c.BlockSize, err = ParseByteRate(v)
		case "hot_set":
			c.HotSet, err = ParseByteRate(v)
		case "seed":
			c.Seed, err = strconv.ParseUint(v, 10, 64)
		case "pattern":
			c.Pattern = normalizePattern(v)
			if c.Pattern != PatternSequential && c.Pattern != PatternRandom && c.Pattern != PatternHotSet {
				err = fmt.Errorf("pattern %q is not sequential, random or hot-set", v)
			}
		default:
			return c, fmt.Errorf("unknown guest option %q", k)
		}
		if err != nil {
			return c, fmt.Errorf("guest option %s: %w", k, err)
		}
	}
	return c, nil
}

// guestDisk is one disk of the VM where it currently is.
type guestDisk struct {
	dev  string
	vdi  string // uuid
	size int64
}

// locateVM finds the VM with this uuid: the pool where it is Running or
// Paused, else any pool that has it. It returns the pool, VM ref, power
// state and disks.
func (s *Sim) locateVM(uuid string) (p *Pool, ref, state string, disks []guestDisk, err error) {
	for _, pass := range []bool{true, false} {
		for _, pl := range s.pools {
			pl.mu.Lock()
			o, gerr := pl.db.byUUID("VM", uuid)
			if gerr == nil {
				ps := o.str("power_state")
				if !pass || ps == Running || ps == Paused {
					for _, vbd := range pl.db.find("VBD", "VM", o.Ref) {
						if vbd.str("type") != "Disk" {
							continue
						}
						if vdi, err := pl.db.get("VDI", vbd.str("VDI")); err == nil {
							disks = append(disks, guestDisk{dev: vbd.str("userdevice"), vdi: vdi.str("uuid"), size: vdi.int("virtual_size")})
						}
					}
					pl.mu.Unlock()
					sort.Slice(disks, func(i, j int) bool { return disks[i].dev < disks[j].dev })
					return pl, o.Ref, ps, disks, nil
				}
			}
			pl.mu.Unlock()
		}
	}
	return nil, "", "", nil, Errorf(ErrUUIDInvalid, "VM", uuid)
}

// StartGuest starts (or restarts with a new config) the guest workload of
// the VM with this uuid. The guest's shadow copies start as the disks'
// current content. It writes only while the VM runs, wherever it runs.
func (s *Sim) StartGuest(vmUUID string, cfg GuestConfig) error {
	if cfg.Pattern == "" {
		cfg.Pattern = PatternRandom
	}
	cfg.Pattern = normalizePattern(cfg.Pattern)
	switch cfg.Pattern {
	case PatternSequential, PatternRandom, PatternHotSet:
	default:
		return Errorf(ErrInvalidValue, "pattern", cfg.Pattern)
	}
	if cfg.BlockSize <= 0 {
		cfg.BlockSize = 64 << 10
	}
	cfg.BlockSize = max(4096, cfg.BlockSize/4096*4096)
	if cfg.Seed == 0 {
		cfg.Seed = 1
	}
	e := s.ext()
	e.lifecycle.Lock()
	defer e.lifecycle.Unlock()
	_ = s.stopGuest(vmUUID)
	pool, ref, _, disks, err := s.locateVM(vmUUID)
	if err != nil {
		return err
	}
	pool.mu.Lock()
	vm, err := pool.db.get("VM", ref)
	var memSize int64
	if err == nil {
		memSize = vm.int("memory_static_max")
		if vm.bool("is_control_domain") {
			err = Errorf(ErrOperationNotAllowed, "This operation is not allowed on a control domain")
		}
	}
	pool.mu.Unlock()
	if err != nil {
		return err
	}
	g := &guest{e: e, vm: vmUUID, cfg: cfg, dir: filepath.Join(s.cfg.StateDir, "guest", vmUUID),
		rng: rand.New(rand.NewPCG(cfg.Seed, 0x67756573)), shadows: map[string]*os.File{},
		stop: make(chan struct{}), done: make(chan struct{})}
	g.stats.Pattern, g.stats.Rate, g.stats.DirtyRate = cfg.Pattern, cfg.Rate, cfg.DirtyRate
	g.stats.EffectiveRate, g.stats.EffectiveDirtyRate, g.stats.VCPUs = cfg.Rate, cfg.DirtyRate, 1
	g.thr.factor = 1
	if err := os.MkdirAll(g.dir, 0o755); err != nil {
		return fmt.Errorf("guest shadow dir: %w", err)
	}
	for _, d := range disks {
		f, err := s.snapshotToShadow(d, filepath.Join(g.dir, d.dev+".shadow"))
		if err != nil {
			g.closeShadows()
			return err
		}
		g.shadows[d.dev] = f
	}
	e.memFor(vmUUID, memSize)
	g.throttle(time.Now()) // the stats show the cap from the start
	e.mu.Lock()
	e.guests[vmUUID] = g
	e.mu.Unlock()
	go g.run()
	s.log.Info("guest started", "vm", vmUUID, "pattern", cfg.Pattern, "rate", cfg.Rate, "dirty_rate", cfg.DirtyRate)
	return nil
}

// snapshotToShadow copies a disk into a new shadow file while writes to
// the disk are held off.
func (s *Sim) snapshotToShadow(d guestDisk, path string) (*os.File, error) {
	p, _, err := s.findVDI(d.vdi)
	if err != nil {
		return nil, err
	}
	st := p.state(d.vdi)
	p.mu.Unlock()
	st.data.Lock()
	defer st.data.Unlock()
	src, err := s.VDIPath(d.vdi)
	if err != nil {
		return nil, err
	}
	if err := copyFile(path, src, d.size, d.size); err != nil {
		return nil, fmt.Errorf("guest shadow: %w", err)
	}
	return os.OpenFile(path, os.O_RDWR, 0)
}

// StopGuest stops the VM's guest workload (its shadow files are removed).
func (s *Sim) StopGuest(vmUUID string) error {
	e := s.ext()
	e.lifecycle.Lock()
	defer e.lifecycle.Unlock()
	return s.stopGuest(vmUUID)
}

func (s *Sim) stopGuest(vmUUID string) error {
	e := s.ext()
	e.mu.Lock()
	g, ok := e.guests[vmUUID]
	delete(e.guests, vmUUID)
	e.mu.Unlock()
	if !ok {
		return ErrNoGuest
	}
	g.stopWriter()
	_ = os.RemoveAll(g.dir)
	return nil
}

func (g *guest) stopWriter() {
	g.stopOnce.Do(func() { close(g.stop) })
	<-g.done
	g.mu.Lock()
	g.closeShadows()
	g.mu.Unlock()
}

func (g *guest) closeShadows() {
	for _, f := range g.shadows {
		_ = f.Close()
	}
	g.shadows = map[string]*os.File{}
}

// GuestStats returns the VM's guest workload counters.
func (s *Sim) GuestStats(vmUUID string) (GuestStats, error) {
	g := s.ext().guest(vmUUID)
	if g == nil {
		return GuestStats{}, ErrNoGuest
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	st := g.stats
	select {
	case <-g.done:
		st.Running = false
	default:
		st.Running = true
	}
	return st, nil
}

func (e *simExt) guest(vmUUID string) *guest {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.guests[vmUUID]
}

// freeze holds the VM's guest still (no disk write or page dirtying in
// flight or started) until the returned function is called. A VM without
// a guest needs nothing.
func (e *simExt) freeze(vmUUID string) func() {
	g := e.guest(vmUUID)
	if g == nil {
		return func() {}
	}
	g.mu.Lock()
	g.frozen++
	g.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			g.mu.Lock()
			g.frozen--
			g.mu.Unlock()
		})
	}
}

// VerifyGuest pauses the guest briefly and compares each of the VM's disks
// (wherever the VM is now) with the guest's shadow copy: every write the
// guest made, in order, over the disk's content when the guest started.
func (s *Sim) VerifyGuest(vmUUID string) (GuestVerify, error) {
	g := s.ext().guest(vmUUID)
	if g == nil {
		return GuestVerify{}, ErrNoGuest
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	_, _, _, disks, err := s.locateVM(vmUUID)
	if err != nil {
		return GuestVerify{}, err
	}
	res := GuestVerify{OK: true, MismatchOffset: -1}
	for _, d := range disks {
		sh, ok := g.shadows[d.dev]
		if !ok {
			continue
		}
		res.Disks++
		path, err := s.VDIPath(d.vdi)
		if err != nil {
			return res, err
		}
		off, err := firstDiff(path, sh, d.size)
		if err != nil {
			return res, err
		}
		if off >= 0 {
			res.OK, res.Disk, res.MismatchOffset = false, d.dev, off
			return res, nil
		}
	}
	return res, nil
}

// firstDiff returns the first offset where the file at path and f differ
// over size bytes, or -1.
func firstDiff(path string, f *os.File, size int64) (int64, error) {
	a, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("verify: %w", err)
	}
	defer func() { _ = a.Close() }()
	ba, bb := make([]byte, 1<<20), make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(ba)) {
		n := min(int64(len(ba)), size-off)
		if _, err := a.ReadAt(ba[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("verify: %w", err)
		}
		if _, err := f.ReadAt(bb[:n], off); err != nil && !errors.Is(err, io.EOF) {
			return 0, fmt.Errorf("verify: %w", err)
		}
		if !bytes.Equal(ba[:n], bb[:n]) {
			for i := range n {
				if ba[i] != bb[i] {
					return off + i, nil
				}
			}
		}
	}
	return -1, nil
}

// run is the writer loop: every tick it spends the rate's byte budget on
// writes and dirties pages, while the VM is running and not frozen. Both
// rates are scaled by the domain's scheduler cap (throttle).
func (g *guest) run() {
	defer close(g.done)
	const tick = 10 * time.Millisecond
	t := time.NewTicker(tick)
	defer t.Stop()
	last := time.Now()
	var budget, pageBudget float64
	for {
		select {
		case <-g.stop:
			return
		case now := <-t.C:
			dt := now.Sub(last).Seconds()
			last = now
			f := g.throttle(now)
			rate, dirty := float64(g.cfg.Rate)*f, float64(g.cfg.DirtyRate)*f
			budget = min(budget+dt*rate, max(rate, float64(g.cfg.BlockSize)))
			pageBudget = min(pageBudget+dt*dirty/PageSize, max(dirty/PageSize, 1))
			g.step(&budget, &pageBudget)
		}
	}
}

// step does one tick's work.
func (g *guest) step(budget, pageBudget *float64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	s := g.e.s
	if g.frozen > 0 {
		return
	}
	_, _, state, disks, err := s.locateVM(g.vm)
	if err != nil || state != Running {
		return
	}
	if m := g.e.mem(g.vm); m != nil && *pageBudget >= 1 {
		m.mu.Lock()
		for ; *pageBudget >= 1; *pageBudget-- {
			i := g.rng.Int64N(m.pages())
			m.dirtyPage(i)
			g.stats.PagesDirtied++
		}
		m.mu.Unlock()
	}
	if len(disks) == 0 {
		return
	}
	buf := make([]byte, g.cfg.BlockSize)
	for first := true; *budget >= float64(g.cfg.BlockSize); first = false {
		select {
		case <-g.stop:
			return
		default:
		}
		if !first {
			// Let a freeze (the pause of a migration's stop-and-copy) in
			// between writes: a real guest's writes in flight finish in
			// parallel, so a pause waits for at most one write, not for
			// the rest of this tick's batch (each mirrored write costs a
			// WAN round trip during migrate_send).
			g.mu.Unlock()
			g.mu.Lock()
			if g.frozen > 0 {
				return
			}
		}
		*budget -= float64(g.cfg.BlockSize)
		d := disks[g.rng.IntN(len(disks))]
		if d.size < g.cfg.BlockSize {
			continue
		}
		off := g.nextOffset(d.size)
		g.fill(buf, off)
		g.e.mirrorNote(d.vdi, &g.stats.MirroredWrites)
		if err := s.WriteVDI(d.vdi, off, buf); err != nil {
			g.stats.WriteErrors++
			g.stats.LastError = err.Error()
			continue
		}
		if sh, ok := g.shadows[d.dev]; ok {
			if _, err := sh.WriteAt(buf, off); err != nil {
				g.stats.WriteErrors++
				g.stats.LastError = err.Error()
				continue
			}
		}
		g.stats.Writes++
		g.stats.BytesWritten += int64(len(buf))
	}
}

func (g *guest) nextOffset(size int64) int64 {
	bs := g.cfg.BlockSize
	blocks := size / bs
	switch g.cfg.Pattern {
	case PatternSequential:
		off := g.seqOff
		if off+bs > size {
			off = 0
		}
		g.seqOff = off + bs
		return off
	case PatternHotSet:
		hot := g.cfg.HotSet
		if hot <= 0 {
			hot = size / 16
		}
		hb := max(1, min(blocks, hot/bs))
		if g.rng.IntN(10) < 9 {
			return g.rng.Int64N(hb) * bs
		}
	}
	return g.rng.Int64N(blocks) * bs
}

// fill makes a block's data: a small header (offset, sequence) and random
// bytes, so every write differs from the data it replaces.
func (g *guest) fill(buf []byte, off int64) {
	for i := 0; i+8 <= len(buf); i += 8 {
		v := g.rng.Uint64()
		for b := 0; b < 8; b++ {
			buf[i+b] = byte(v >> (8 * b))
		}
	}
	copy(buf, fmt.Sprintf("guest-write off=%d n=%d\n", off, g.stats.Writes))
}

func (e *simExt) mem(vmUUID string) *memImage {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.mems[vmUUID]
}

// VMUUIDByName returns the uuid of the (non-snapshot) VM named name in any
// pool, e.g. DemoVMName.
func (s *Sim) VMUUIDByName(name string) (string, error) {
	for _, p := range s.pools {
		p.mu.Lock()
		for _, o := range p.db.find("VM", "name_label", name) {
			if !o.bool("is_a_snapshot") && !o.bool("is_a_template") {
				p.mu.Unlock()
				return o.str("uuid"), nil
			}
		}
		p.mu.Unlock()
	}
	return "", Errorf(ErrUUIDInvalid, "VM", name)
}

func normalizePattern(p string) string {
	switch strings.ToLower(p) {
	case "hotset", "hot_set", "hot-set":
		return PatternHotSet
	}
	return strings.ToLower(p)
}
