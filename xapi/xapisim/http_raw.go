package xapisim

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ZeroVDI zeroes [off, off+n) of a VDI by punching a hole, recording it as
// a write (CBT, content_id) like WriteVDI.
func (s *Sim) ZeroVDI(uuid string, off, n int64) error {
	p, _, err := s.findVDI(uuid)
	if err != nil {
		return err
	}
	st := p.state(uuid)
	p.mu.Unlock()
	st.data.RLock()
	defer st.data.RUnlock()
	p.mu.Lock()
	o, err := p.db.byUUID("VDI", uuid)
	if err != nil {
		p.mu.Unlock()
		return err
	}
	if off < 0 || n < 0 || off+n > o.int("virtual_size") || o.str("type") == "cbt_metadata" {
		p.mu.Unlock()
		return fmt.Errorf("%w: offset %d length %d", ErrVDIRange, off, n)
	}
	path := p.vdiPath(o)
	p.noteWrite(o, st, off, n)
	p.mu.Unlock()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("zero VDI %s: %w", uuid, err)
	}
	defer func() { _ = f.Close() }()
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n); err != nil {
		if _, werr := f.WriteAt(make([]byte, n), off); werr != nil {
			return fmt.Errorf("zero VDI %s: %w", uuid, werr)
		}
	}
	s.ext().mirrorZero(uuid, off, n)
	return nil
}

// httpAuth checks session_id (query or cookie) or HTTP Basic credentials,
// as Xapi_http.assert_credentials_ok.
func (s *Sim) httpAuth(h *Host, r *http.Request) bool {
	sess := r.URL.Query().Get("session_id")
	if sess == "" {
		if c, err := r.Cookie("session_id"); err == nil {
			sess = c.Value
		}
	}
	if sess != "" {
		return h.pool.validSession(sess)
	}
	if u, pw, ok := r.BasicAuth(); ok {
		return u == s.cfg.Username && pw == s.cfg.Password
	}
	return false
}

// rawTarget resolves the vdi query parameter (ref or uuid) and format.
func (s *Sim) rawTarget(h *Host, r *http.Request) (uuid string, size int64, status int, msg string) {
	q := r.URL.Query()
	if f := strings.ToLower(q.Get("format")); f != "" && f != "raw" {
		return "", 0, http.StatusBadRequest, "format " + f + " is not supported by the simulator (raw only)"
	}
	v := q.Get("vdi")
	p := h.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	o, err := p.db.get("VDI", v)
	if err != nil {
		if o, err = p.db.byUUID("VDI", v); err != nil {
			return "", 0, http.StatusNotFound, "VDI not found: " + v
		}
	}
	if o.str("type") == "cbt_metadata" {
		return "", 0, http.StatusBadRequest, "VDI has no data (cbt_metadata)"
	}
	return o.str("uuid"), o.int("virtual_size"), 0, ""
}

// httpTask returns the task a transfer reports to: the task_id query
// parameter when it names a task, else a new task, as xapi attaches
// progress to the caller's task or creates its own.
func (s *Sim) httpTask(h *Host, r *http.Request, label string) string {
	p := h.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if id := r.URL.Query().Get("task_id"); id != "" {
		if _, err := p.db.get("task", id); err == nil {
			return id
		}
	}
	return p.createTask(label, "", h.Ref).Ref
}

// finishTask completes a transfer's task (success with an empty result, or
// failure with INTERNAL_ERROR [msg]).
func (s *Sim) finishTask(h *Host, task string, err error) {
	p := h.pool
	p.mu.Lock()
	defer p.mu.Unlock()
	if o, gerr := p.db.get("task", task); gerr == nil && o.str("status") == "pending" {
		p.completeTask(task, "", err)
	}
}

// progress reports a transfer's progress every 5%.
type progress struct {
	s     *Sim
	h     *Host
	task  string
	total int64
	last  float64
}

func (pr *progress) add(done int64) {
	if pr.total <= 0 {
		return
	}
	f := float64(done) / float64(pr.total)
	if f-pr.last < 0.05 || f >= 1 {
		return
	}
	pr.last = f
	pr.h.pool.mu.Lock()
	pr.h.pool.SetTaskProgress(pr.task, f)
	pr.h.pool.mu.Unlock()
}

// importRawVDI serves PUT /import_raw_vdi?vdi=&format=raw&session_id=.
// Content-Length is required (xapi does not implement chunked encoding).
func (s *Sim) importRawVDI(h *Host, w http.ResponseWriter, r *http.Request) {
	if !s.httpAuth(h, r) {
		http.Error(w, "unauthorised", http.StatusUnauthorized)
		return
	}
	if r.ContentLength < 0 {
		http.Error(w, "Chunked encoding not yet implemented", http.StatusBadRequest)
		return
	}
	uuid, size, status, msg := s.rawTarget(h, r)
	if status != 0 {
		http.Error(w, msg, status)
		return
	}
	if r.ContentLength > size {
		http.Error(w, "content longer than the VDI", http.StatusBadRequest)
		return
	}
	task := s.httpTask(h, r, "VDI import")
	w.Header().Set("task-id", task)
	pr := &progress{s: s, h: h, task: task, total: r.ContentLength}
	buf := make([]byte, 1<<20)
	var off int64
	for off < r.ContentLength {
		n, err := io.ReadFull(r.Body, buf[:min(int64(len(buf)), r.ContentLength-off)])
		if n > 0 {
			var werr error
			if isZero(buf[:n]) {
				werr = s.ZeroVDI(uuid, off, int64(n))
			} else {
				werr = s.WriteVDI(uuid, off, buf[:n])
			}
			if werr != nil {
				s.finishTask(h, task, werr)
				http.Error(w, werr.Error(), http.StatusInternalServerError)
				return
			}
			off += int64(n)
			pr.add(off)
		}
		if err != nil {
			s.log.Warn("import_raw_vdi read failed", "error", err)
			s.finishTask(h, task, fmt.Errorf("import_raw_vdi: body ended after %d of %d bytes: %w", off, r.ContentLength, err))
			return
		}
	}
	s.finishTask(h, task, nil)
	w.WriteHeader(http.StatusOK)
}

func isZero(b []byte) bool {
	return len(bytes.TrimLeft(b, "\x00")) == 0
}

// exportRawVDI serves GET /export_raw_vdi?vdi=&format=raw&session_id=.
func (s *Sim) exportRawVDI(h *Host, w http.ResponseWriter, r *http.Request) {
	if !s.httpAuth(h, r) {
		http.Error(w, "unauthorised", http.StatusUnauthorized)
		return
	}
	uuid, size, status, msg := s.rawTarget(h, r)
	if status != 0 {
		http.Error(w, msg, status)
		return
	}
	path, err := s.VDIPath(uuid)
	if err != nil {
		http.Error(w, err.Error(), http.StatusNotFound)
		return
	}
	f, err := os.Open(path)
	if err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer func() { _ = f.Close() }()
	task := s.httpTask(h, r, "VDI export")
	w.Header().Set("task-id", task)
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Disposition", `attachment; filename="`+uuid+`.raw"`)
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.WriteHeader(http.StatusOK)
	if r.Method == http.MethodHead {
		s.finishTask(h, task, nil)
		return
	}
	pr := &progress{s: s, h: h, task: task, total: size}
	var done int64
	buf := make([]byte, 1<<20)
	src := io.NewSectionReader(f, 0, size)
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			if _, werr := w.Write(buf[:n]); werr != nil {
				s.finishTask(h, task, fmt.Errorf("export_raw_vdi: client went away: %w", werr))
				return
			}
			done += int64(n)
			pr.add(done)
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				s.finishTask(h, task, nil)
			} else {
				s.finishTask(h, task, rerr)
			}
			return
		}
	}
}
