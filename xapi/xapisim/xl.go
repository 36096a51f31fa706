package xapisim

// The dom0 xl stand-in (notes: throttle-wire.md). With the per-host layout
// (Config.EtcDir == "") every host has <root>/usr/sbin/xl, root being the
// host's directory (the parent of its etc), and its state under
// <root>/var/lib/xl-sim:
//
//	domains/<domid>  one file per domain running on the host (the VM uuid),
//	                 kept in step with the DB by setDomain
//	sched/<domid>    "weight cap" set through `xl sched-credit -d D -w W -c C`
//	scheduler        credit | credit2 (absent: credit, both subcommands work)
//
// The guest workload reads sched/<domid> of its VM's domain and slows its
// disk writes and page dirtying to the cap (guestThrottle).

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Xen schedulers the xl stand-in reports (`xl info`: xen_scheduler).
const (
	XLSchedCredit  = "credit"
	XLSchedCredit2 = "credit2"
)

// XLPath returns the host's xl stand-in, <root>/usr/sbin/xl with root =
// filepath.Dir(HostEtcDir(hostRef)); hostRef may be a ref, name_label or
// uuid. It is "" with a shared Config.EtcDir (no per-host layout) or for
// an unknown host. The script exists once the simulator has started.
func (s *Sim) XLPath(hostRef string) string {
	root := s.xlRoot(hostRef)
	if root == "" {
		return ""
	}
	return filepath.Join(root, "usr", "sbin", "xl")
}

// XLStateDir returns the host's xl stand-in state directory,
// <root>/var/lib/xl-sim ("" as for XLPath).
func (s *Sim) XLStateDir(hostRef string) string {
	root := s.xlRoot(hostRef)
	if root == "" {
		return ""
	}
	return xlStateDir(root)
}

func (s *Sim) xlRoot(host string) string {
	if s.cfg.EtcDir != "" {
		return ""
	}
	etc := s.HostEtcDir(host)
	if etc == "" {
		return ""
	}
	return filepath.Dir(etc)
}

func xlStateDir(root string) string { return filepath.Join(root, "var", "lib", "xl-sim") }

// SetXLScheduler sets the scheduler the host's xl stand-in reports
// (XLSchedCredit or XLSchedCredit2). Once set, only the matching
// sched-credit / sched-credit2 subcommand works, as with a real xl.
func (s *Sim) SetXLScheduler(hostRef, sched string) error {
	if sched != XLSchedCredit && sched != XLSchedCredit2 {
		return fmt.Errorf("xl scheduler %q: want credit or credit2", sched)
	}
	dir := s.XLStateDir(hostRef)
	if dir == "" {
		return fmt.Errorf("xl scheduler on %s: no per-host layout or no such host", hostRef)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("xl scheduler: %w", err)
	}
	return xlWriteFile(filepath.Join(dir, "scheduler"), []byte(sched+"\n"), 0o644)
}

// hostRootByRef is the root of host ref of p without taking any lock
// (p.hosts does not change after New); "" without the per-host layout.
func (p *Pool) hostRootByRef(ref string) string {
	if p.sim.cfg.EtcDir != "" || ref == "" || ref == NullRef {
		return ""
	}
	for _, h := range p.hosts {
		if h.Ref == ref {
			return p.sim.HostDir(h)
		}
	}
	return ""
}

// setDomain is the one place a VM's domain changes (p.mu held): it sets
// resident_on and domid (NullRef, -1: no domain) and keeps the xl
// stand-in's domain registry in step: the old domain's files go, the new
// domain's file is written (with no scheduler parameters left over from an
// earlier domain of that id).
func (p *Pool) setDomain(o *object, host string, domid int64) {
	oldHost, oldDomid := o.str("resident_on"), o.int("domid")
	o.Fields["resident_on"] = host
	o.Fields["domid"] = domid
	if oldHost == host && oldDomid == domid {
		return
	}
	uuid := o.str("uuid")
	if root := p.hostRootByRef(oldHost); root != "" && oldDomid >= 0 {
		if err := xlDomainGone(root, oldDomid, uuid); err != nil {
			p.sim.log.Warn("xl stand-in: removing domain failed", "vm", uuid, "domid", oldDomid, "error", err)
		}
	}
	if root := p.hostRootByRef(host); root != "" && domid >= 0 {
		if err := xlDomainUp(root, domid, uuid); err != nil {
			p.sim.log.Warn("xl stand-in: adding domain failed", "vm", uuid, "domid", domid, "error", err)
		}
	}
}

// xlDomainUp registers domain domid (VM uuid) on the host at root.
func xlDomainUp(root string, domid int64, uuid string) error {
	st := xlStateDir(root)
	id := strconv.FormatInt(domid, 10)
	if err := os.Remove(filepath.Join(st, "sched", id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	dir := filepath.Join(st, "domains")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return xlWriteFile(filepath.Join(dir, id), []byte(uuid+"\n"), 0o644)
}

// xlDomainGone removes domain domid of VM uuid from the host at root (a
// file naming another VM is left alone).
func xlDomainGone(root string, domid int64, uuid string) error {
	st := xlStateDir(root)
	id := strconv.FormatInt(domid, 10)
	path := filepath.Join(st, "domains", id)
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err == nil && strings.TrimSpace(string(b)) != uuid {
		return nil
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.Remove(filepath.Join(st, "sched", id)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// startXL writes host h's xl stand-in and makes its domain registry match
// the DB: every VM resident on h with a domid has its file, nothing else
// does, and scheduler parameters of domains that are gone are dropped.
// Parameters of domains that still run (a simulator restart) are kept.
func (s *Sim) startXL(h *Host) error {
	root := s.HostDir(h)
	xl := filepath.Join(root, "usr", "sbin", "xl")
	if err := os.MkdirAll(filepath.Dir(xl), 0o755); err != nil {
		return fmt.Errorf("host %s xl: %w", h.Name, err)
	}
	script := []byte(renderXLScript(root, h.Name))
	if old, err := os.ReadFile(xl); err != nil || !bytes.Equal(old, script) {
		if err := xlWriteFile(xl, script, 0o755); err != nil {
			return fmt.Errorf("host %s xl: %w", h.Name, err)
		}
	}
	st := xlStateDir(root)
	for _, d := range []string{"domains", "sched"} {
		if err := os.MkdirAll(filepath.Join(st, d), 0o755); err != nil {
			return fmt.Errorf("host %s xl state: %w", h.Name, err)
		}
	}
	p := h.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	want := map[string]string{} // domid -> VM uuid
	for _, o := range p.db.find("VM", "resident_on", h.Ref) {
		if d := o.int("domid"); d >= 0 {
			want[strconv.FormatInt(d, 10)] = o.str("uuid")
		}
	}
	have, err := os.ReadDir(filepath.Join(st, "domains"))
	if err != nil {
		return fmt.Errorf("host %s xl domains: %w", h.Name, err)
	}
	for _, e := range have {
		path := filepath.Join(st, "domains", e.Name())
		b, rerr := os.ReadFile(path)
		if uuid, ok := want[e.Name()]; ok && rerr == nil && strings.TrimSpace(string(b)) == uuid {
			delete(want, e.Name()) // already right
			continue
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("host %s xl domains: %w", h.Name, err)
		}
	}
	for id, uuid := range want {
		if err := xlWriteFile(filepath.Join(st, "domains", id), []byte(uuid+"\n"), 0o644); err != nil {
			return fmt.Errorf("host %s xl domains: %w", h.Name, err)
		}
	}
	scheds, err := os.ReadDir(filepath.Join(st, "sched"))
	if err != nil {
		return fmt.Errorf("host %s xl sched: %w", h.Name, err)
	}
	for _, e := range scheds {
		if _, err := os.Stat(filepath.Join(st, "domains", e.Name())); errors.Is(err, os.ErrNotExist) {
			_ = os.Remove(filepath.Join(st, "sched", e.Name()))
		}
	}
	return nil
}

// xlWriteFile writes path through a dot-file in the same directory and a
// rename, so a reader (or a glob over the directory) never sees it half
// written.
func xlWriteFile(path string, data []byte, perm os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-*.tmp")
	if err != nil {
		return err
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Chmod(perm); err != nil {
		_ = tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// vmDomainSched returns the sched file of the domain the VM with this uuid
// runs in (Running or Paused, with a domid, on a host with the per-host
// layout; "" otherwise) and its vCPU count (VM_metrics.VCPUs_number, else
// VCPUs_at_startup, else VCPUs_max, at least 1).
func (s *Sim) vmDomainSched(uuid string) (path string, vcpus int64) {
	vcpus = 1
	for _, p := range s.pools {
		p.mu.Lock()
		o, err := p.db.byUUID("VM", uuid)
		if err != nil {
			p.mu.Unlock()
			continue
		}
		ps, host, domid := o.str("power_state"), o.str("resident_on"), o.int("domid")
		n := p.db.liveVCPUs(o)
		if n <= 0 {
			n = o.int("VCPUs_at_startup")
		}
		if n <= 0 {
			n = o.int("VCPUs_max")
		}
		p.mu.Unlock()
		if (ps != Running && ps != Paused) || domid < 0 {
			continue
		}
		root := p.hostRootByRef(host)
		if root == "" {
			continue
		}
		return filepath.Join(xlStateDir(root), "sched", strconv.FormatInt(domid, 10)), max(1, n)
	}
	return "", vcpus
}

// parseSchedCap reads the cap from a sched file's content "weight cap".
func parseSchedCap(b []byte) (int64, bool) {
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0, false
	}
	c, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || c < 0 {
		return 0, false
	}
	return c, true
}
