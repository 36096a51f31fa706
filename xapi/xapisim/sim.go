// Package xapisim is a wire-faithful simulator of xapi, the XenServer /
// XCP-ng toolstack, for tests and demos. It serves XML-RPC exactly as xapi
// writes it for several pools at once (each host on its own loopback
// listener), keeps VDIs as real sparse files with CBT tracking, and persists
// its object database in a state directory.
//
// Go use:
//
//	sim, err := xapisim.New(xapisim.Config{StateDir: dir, Pools: 2, Logger: log})
//	err = sim.Start(ctx, "127.0.0.1:0")
//	info := sim.Info() // URLs and credentials, as `wanmotion sim` prints
//	defer sim.Close()
//
// Code map:
//
//	xmlrpc.go    request parser and xapi-exact response writer (ParseRequest, EncodeValue, EncodeSuccess/Failure)
//	schema.go    the datamodel subset: classes, fields, kinds (add a field here: records, get_/set_, events, persistence follow)
//	db.go        a pool's object DB: create/get/set/destroy, generations for events, derived link sets
//	methods.go   the method table (Method, Param, Call), dispatch (counts, session, Async), generic per-class methods
//	api_core.go  session, task, event, network; the init that builds the table (registrars)
//	api_vm.go    VM power state machine (powerOps, SetPowerState, OnPowerChange), VM.snapshot, VBD/VIF
//	api_vdi.go   VDI create/destroy/snapshot/clone/copy, CBT, data_destroy, list_changed_blocks
//	vdi.go       VDI files, WriteVDI/NoteWrite (the one write path), CBT bitmaps, sparse copy
//	events.go    event.from / event.inject
//	http.go      per-host HTTP handler (RPC on any POST path), RegisterHTTP
//	jsonrpc.go   JSON-RPC on /jsonrpc (same dispatch)
//	http_raw.go  /import_raw_vdi, /export_raw_vdi, ZeroVDI
//	persist.go   state.json save/load (atomic)
//	content.go   default pools and demo-vm disk content
//	pool.go      Pool, sessions, tasks (createTask, completeTask, startAsync, TaskCancelled)
//	nbd_export.go VDI.get_nbd_info, per-host read-only NBD listeners (TLS/plain by network purpose), host certificates
//	plugins.go   host.call_plugin (argv protocol, output parsing), per-host etc dirs, inventory, local XML-RPC socket
//	guest.go     guest workload (StartGuest, VerifyGuest, shadow files), sim.guest_* methods live in migrate.go
//	guest_mem.go synthetic guest memory (pages, versions, dirty set), per-Sim extension state (simExt)
//	guest_metrics.go VM_guest_metrics (the guest agent's report: addresses per VIF), SetGuestNetworks
//	vm_metrics.go VM_metrics (every VM has one; VCPUs_number), VM.set_VCPUs_number_live, SetLiveVCPUs
//	guest_power.go VM.pool_migrate, VM.suspend/resume with a real memory image
//	migrate.go   host.migrate_receive, VM.assert_can_migrate/migrate_send (source side), sim.* methods, MigrationRecord
//	migrate_http.go /services/SM and /services/xenops (destination side of a migration)
//	migrate_track.go changed-block log since each content_id, write mirror, InjectFault, EndpointBytes
//	hooks.go     xenopsd hook runner (RunHooks) and the hooks wrapped around VM power operations (an init, after the table)
//	xl.go        dom0 xl stand-in per host (XLPath, SetXLScheduler), its domain registry (setDomain: the one place resident_on/domid change), the guest's cap lookup
//	xl_script.go the stand-in's POSIX sh script (xl info, xl sched-credit/sched-credit2)
//
// Extension points (for code added to this package):
//   - API methods: `var _ = addRegistrar(func() { Register(&Method{...}) })`
//     in a new api_*.go file. Handlers run under Pool.mu unless Unlocked;
//     set NoAsync for calls the datamodel flags `Session`.
//   - HTTP actions served by every host: RegisterHTTP (from an init).
//   - Per-host services (e.g. NBD listeners): RegisterStartHook.
//   - Guest or host writes to a VDI: (*Sim).WriteVDI / ZeroVDI / NoteWrite.
//   - VM power transitions: (*Pool).SetPowerState; hooks: (*Sim).OnPowerChange.
//   - Long handlers: poll (*Pool).TaskCancelled(c.Task), report
//     (*Pool).SetTaskProgress.
package xapisim

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config configures a simulator. Zero values get the documented defaults.
type Config struct {
	// StateDir holds the object database (state.json) and VDI files. A
	// second New on the same directory restores the saved state.
	StateDir string
	// Pools is the number of pools (default 2: site-a, site-b, site-c...).
	Pools int
	// HostsPerPool is the number of hosts per pool, coordinator included
	// (default 2).
	HostsPerPool int
	// DiskSize is the virtual size of demo-vm's disk (default 1 GiB).
	DiskSize int64
	// FillSize is how many bytes of demo-vm's disk hold data (default
	// DiskSize/4, capped at 256 MiB); the rest are holes.
	FillSize int64
	// MemorySize is demo-vm's memory_static_max (default 512 MiB).
	MemorySize int64
	// Username and Password are the credentials of every pool (default
	// "root" / "xenroot").
	Username, Password string
	// NoDemoVM skips creating demo-vm in the first pool.
	NoDemoVM bool
	// DemoIPv4 and DemoIPv6 are the addresses demo-vm's simulated guest
	// agent reports for VIF 0 in VM_guest_metrics.networks (defaults
	// DefaultDemoIPv4, DefaultDemoIPv6; "none" reports no address of
	// that family).
	DemoIPv4, DemoIPv6 string
	// EtcDir, when set, is the /etc that every host's plugins and hooks
	// come from (EtcDir/xapi.d/plugins, EtcDir/xapi.d/<hook>), e.g. an
	// install tree. By default each host has its own
	// <StateDir>/<host name>/etc (see HostEtcDir).
	EtcDir string
	// Logger receives the simulator's logs (default: discard).
	Logger hclog.Logger
}

// ErrClosed is returned by Start after Close.
var ErrClosed = errors.New("simulator closed")

// Sim is a running simulator.
type Sim struct {
	cfg   Config
	log   hclog.Logger
	pools []*Pool

	powerHooks []PowerHook

	saveMu sync.Mutex
	dirty  chan struct{}

	stops []func() // from start hooks

	mu      sync.Mutex
	started bool
	closed  bool
	done    chan struct{}
	// closeDone is closed when Close has finished; closeErr is its result.
	closeDone chan struct{}
	closeErr  error
	wg        sync.WaitGroup
}

// Host is one simulated host: a DB object plus its HTTP listener.
type Host struct {
	pool   *Pool
	Ref    string
	Name   string
	ln     net.Listener
	srv    *http.Server
	url    string
	master bool
	ip     string
	// portInAddress: hosts share one IP, so Address includes the port.
	portInAddress bool
}

// URL returns the host's base URL (http://127.0.0.1:port/).
func (h *Host) URL() string { return h.url }

// Pool returns the host's pool.
func (h *Host) Pool() *Pool { return h.pool }

// New creates a simulator, restoring state from cfg.StateDir when it
// holds one, else building the default content.
func New(cfg Config) (*Sim, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("xapisim: StateDir is required")
	}
	if cfg.Pools <= 0 {
		cfg.Pools = 2
	}
	if cfg.HostsPerPool <= 0 {
		cfg.HostsPerPool = 2
	}
	if cfg.DiskSize <= 0 {
		cfg.DiskSize = 1 << 30
	}
	if cfg.FillSize <= 0 {
		cfg.FillSize = min(cfg.DiskSize/4, 256<<20)
	}
	cfg.FillSize = min(cfg.FillSize, cfg.DiskSize)
	if cfg.MemorySize <= 0 {
		cfg.MemorySize = 512 << 20
	}
	if cfg.DemoIPv4 == "" {
		cfg.DemoIPv4 = DefaultDemoIPv4
	}
	if cfg.DemoIPv6 == "" {
		cfg.DemoIPv6 = DefaultDemoIPv6
	}
	if cfg.Username == "" {
		cfg.Username = "root"
	}
	if cfg.Password == "" {
		cfg.Password = "xenroot"
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if err := os.MkdirAll(cfg.StateDir, 0o755); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	s := &Sim{cfg: cfg, log: cfg.Logger, done: make(chan struct{}), closeDone: make(chan struct{}), dirty: make(chan struct{}, 1)}
	loaded, err := s.load()
	if err != nil {
		return nil, err
	}
	if loaded {
		// Pools, hosts, sizes come from the saved state, not cfg.
		s.log.Info("state restored", "pools", len(s.pools), "state_dir", cfg.StateDir)
	} else if err := s.buildDefault(); err != nil {
		return nil, fmt.Errorf("build default content: %w", err)
	}
	for _, p := range s.pools {
		p.attachHosts()
	}
	if err := s.Save(); err != nil {
		return nil, err
	}
	return s, nil
}

// Pools returns the simulated pools in order.
func (s *Sim) Pools() []*Pool { return s.pools }

// PoolByName returns a pool by its name_label.
func (s *Sim) PoolByName(name string) (*Pool, bool) {
	for _, p := range s.pools {
		if p.Name == name {
			return p, true
		}
	}
	return nil, false
}

// Start opens one loopback HTTP listener per host and serves until Close
// (or ctx is done). addr is the first host's address; with port 0 every
// host gets a free port, with port N host i gets port N+i.
func (s *Sim) Start(ctx context.Context, addr string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if s.started {
		return errors.New("xapisim: already started")
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listen address %q: %w", addr, err)
	}
	port, err := strconv.Atoi(portStr)
	if err != nil {
		return fmt.Errorf("listen port %q: %w", portStr, err)
	}
	base := net.ParseIP(host).To4()
	perHostIP := base != nil && base.IsLoopback()
	if perHostIP {
		// Some sandboxes only have 127.0.0.1; then fall back to one IP.
		var lc net.ListenConfig
		probe, err := lc.Listen(ctx, "tcp", net.JoinHostPort(addIP(base, 1).String(), "0"))
		if err != nil {
			s.log.Warn("extra loopback addresses unusable, hosts share one IP", "error", err)
			perHostIP = false
		} else {
			_ = probe.Close()
		}
	}
	next := 0
	for pi, p := range s.pools {
		ips := make([]string, len(p.hosts))
		for i := range p.hosts {
			if perHostIP {
				ips[i] = addIP(base, next).String()
				next++
			} else {
				ips[i] = host
			}
		}
		fixed := 0
		if port != 0 {
			fixed = port + pi
		}
		if err := s.listenPool(ctx, p, ips, perHostIP, fixed); err != nil {
			s.closeListeners()
			return err
		}
		p.mu.Lock()
		for _, h := range p.hosts {
			if o, err := p.db.get("host", h.Ref); err == nil {
				p.db.set(o, "address", h.Address())
			}
			for _, pif := range p.db.find("PIF", "host", h.Ref) {
				if pif.str("IP") != h.ip {
					p.db.set(pif, "IP", h.ip)
				}
			}
		}
		p.mu.Unlock()
	}
	for _, hook := range startHooks {
		stop, err := hook(ctx, s)
		if err != nil {
			s.closeListeners()
			for _, st := range s.stops {
				st()
			}
			return fmt.Errorf("start hook: %w", err)
		}
		if stop != nil {
			s.stops = append(s.stops, stop)
		}
	}
	for _, p := range s.pools {
		for _, h := range p.hosts {
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				if err := h.srv.Serve(h.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
					s.log.Error("serve failed", "host", h.Name, "error", err)
				}
			}()
		}
	}
	// The ctx watcher is not in wg: Close waits for wg and may be called
	// by this very goroutine.
	go func() {
		select {
		case <-ctx.Done():
			_ = s.Close()
		case <-s.done:
		}
	}()
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		s.saver()
	}()
	s.started = true
	s.log.Info("simulator started", "pools", len(s.pools), "state_dir", s.cfg.StateDir)
	return nil
}

// listenPool opens the listeners of one pool's hosts. With perHostIP every
// host has its own loopback IP and all share one port (so a client told
// HOST_IS_SLAVE [ip] reconnects on the same port, as with real xapi);
// otherwise each host gets its own port on the one IP.
func (s *Sim) listenPool(ctx context.Context, p *Pool, ips []string, perHostIP bool, fixed int) error {
	var lc net.ListenConfig
	for attempt := 0; ; attempt++ {
		port := fixed
		var lns []net.Listener
		var err error
		for i, ip := range ips {
			var ln net.Listener
			ln, err = lc.Listen(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(port)))
			if err != nil {
				break
			}
			lns = append(lns, ln)
			if perHostIP && i == 0 {
				port = ln.Addr().(*net.TCPAddr).Port
			}
			if !perHostIP && fixed != 0 {
				port++
			}
		}
		if err == nil {
			for i, h := range p.hosts {
				h.ln = lns[i]
				h.ip = ips[i]
				h.portInAddress = !perHostIP
				h.url = "http://" + lns[i].Addr().String() + "/"
				h.srv = &http.Server{Handler: s.handler(h), ReadHeaderTimeout: 30 * time.Second}
			}
			return nil
		}
		for _, ln := range lns {
			_ = ln.Close()
		}
		if fixed != 0 || attempt >= 20 {
			return fmt.Errorf("listen for pool %s: %w", p.Name, err)
		}
	}
}

// addIP returns ip + n (IPv4).
func addIP(ip net.IP, n int) net.IP {
	v := uint32(ip[0])<<24 | uint32(ip[1])<<16 | uint32(ip[2])<<8 | uint32(ip[3])
	v += uint32(n)
	return net.IPv4(byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

// startHooks run at the end of Start (e.g. per-host NBD listeners).
var startHooks []func(ctx context.Context, s *Sim) (stop func(), err error)

// RegisterStartHook adds a function run at the end of every Start; its
// stop function runs in Close before the state is saved. Call it from an
// init function in this package.
func RegisterStartHook(h func(ctx context.Context, s *Sim) (stop func(), err error)) {
	startHooks = append(startHooks, h)
}

// StateDir returns the simulator's state directory.
func (s *Sim) StateDir() string { return s.cfg.StateDir }

func (s *Sim) closeListeners() {
	for _, p := range s.pools {
		for _, h := range p.hosts {
			if h.ln != nil {
				_ = h.ln.Close()
			}
		}
	}
}

// Address is the host's address as the simulator reports it in
// host.address and HOST_IS_SLAVE. Normally (a loopback --listen address)
// every host has its own loopback IP and the hosts of a pool share one
// port, so this is a bare IP, as xapi reports. When all hosts must share
// one non-loopback IP it is "ip:port", the only way to tell them apart.
func (h *Host) Address() string {
	if h.url == "" {
		return "127.0.0.1"
	}
	u, err := url.Parse(h.url)
	if err != nil {
		return "127.0.0.1"
	}
	if h.portInAddress {
		return u.Host
	}
	return u.Hostname()
}

// IP returns the host's IP (also its PIFs' IP).
func (h *Host) IP() string { return h.ip }

// Close stops every listener, waits for handlers and saves the state.
func (s *Sim) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.closeDone // a concurrent Close finishes first
		return s.closeErr
	}
	s.closed = true
	close(s.done)
	s.mu.Unlock()
	defer close(s.closeDone)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	for _, p := range s.pools {
		for _, h := range p.hosts {
			if h.srv != nil {
				_ = h.srv.Shutdown(ctx)
			}
		}
	}
	s.wg.Wait()
	for _, p := range s.pools {
		p.tasks.Wait()
	}
	for i := len(s.stops) - 1; i >= 0; i-- {
		s.stops[i]()
	}
	s.closeErr = s.Save()
	return s.closeErr
}

// Done is closed when the simulator is closed.
func (s *Sim) Done() <-chan struct{} { return s.done }

// markDirty schedules a save.
func (s *Sim) markDirty() {
	select {
	case s.dirty <- struct{}{}:
	default:
	}
}

// saver writes the state at most every 200 ms while changes happen.
func (s *Sim) saver() {
	for {
		select {
		case <-s.done:
			return
		case <-s.dirty:
		}
		select {
		case <-s.done:
			return
		case <-time.After(200 * time.Millisecond):
		}
		if err := s.Save(); err != nil {
			s.log.Error("save state failed", "error", err)
		}
	}
}

// Info describes how to reach the simulator (what `wanmotion sim` prints).
type Info struct {
	Pools []PoolInfo `json:"pools"`
}

// PoolInfo describes one pool.
type PoolInfo struct {
	Name     string     `json:"name"`
	URL      string     `json:"url"`
	Username string     `json:"username"`
	Password string     `json:"password"`
	Hosts    []HostInfo `json:"hosts"`
}

// HostInfo describes one host (the first is the coordinator).
type HostInfo struct {
	Name string `json:"name"`
	URL  string `json:"url"`
}

// Info returns the pools' URLs and credentials (valid after Start).
func (s *Sim) Info() Info {
	var info Info
	for _, p := range s.pools {
		pi := PoolInfo{Name: p.Name, Username: s.cfg.Username, Password: s.cfg.Password, Hosts: []HostInfo{}}
		for _, h := range p.hosts {
			if h.master {
				pi.URL = h.url
			}
			pi.Hosts = append(pi.Hosts, HostInfo{Name: h.Name, URL: h.url})
		}
		info.Pools = append(info.Pools, pi)
	}
	return info
}

// VDIPath returns the backing file of the VDI with this uuid.
func (s *Sim) VDIPath(uuid string) (string, error) {
	p, o, err := s.findVDI(uuid)
	if err != nil {
		return "", err
	}
	defer p.mu.Unlock()
	return p.vdiPath(o), nil
}

// findVDI returns the pool (locked) and VDI object for a uuid.
func (s *Sim) findVDI(uuid string) (*Pool, *object, error) {
	for _, p := range s.pools {
		p.mu.Lock()
		if o, err := p.db.byUUID("VDI", uuid); err == nil {
			return p, o, nil
		}
		p.mu.Unlock()
	}
	return nil, nil, Errorf(ErrUUIDInvalid, "VDI", uuid)
}

func (s *Sim) srDir(srUUID string) string {
	return filepath.Join(s.cfg.StateDir, "sr", srUUID)
}
