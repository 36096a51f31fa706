package xapisim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"
)

const stateFileName = "state.json"
const stateVersion = 1

type stateFile struct {
	Version int         `json:"version"`
	Pools   []poolState `json:"pools"`
}

type poolState struct {
	Name string `json:"name"`
	Gen  int64  `json:"gen"`
	// LostBefore: deletions before this generation are not kept across a
	// restart, so older event tokens get EVENTS_LOST.
	LostBefore int64                `json:"lost_before"`
	Objects    []objState           `json:"objects"`
	VDIs       map[string]*vdiState `json:"vdis"`
}

type objState struct {
	Class    string                     `json:"class"`
	Ref      string                     `json:"ref"`
	Created  int64                      `json:"created"`
	Modified int64                      `json:"modified"`
	Fields   map[string]json.RawMessage `json:"fields"`
}

// Save writes the object database atomically (temp file, fsync, rename).
// It runs automatically shortly after changes and on Close.
func (s *Sim) Save() error {
	s.saveMu.Lock()
	defer s.saveMu.Unlock()
	st := stateFile{Version: stateVersion}
	for _, p := range s.pools {
		p.mu.Lock()
		p.refreshUsage()
		ps := poolState{Name: p.Name, Gen: p.db.gen, LostBefore: p.db.gen, VDIs: map[string]*vdiState{}}
		for _, o := range p.db.objs {
			if Classes[o.Class].NoPersist {
				continue
			}
			os := objState{Class: o.Class, Ref: o.Ref, Created: o.Created, Modified: o.Modified, Fields: map[string]json.RawMessage{}}
			for k, v := range o.Fields {
				if t, ok := v.(time.Time); ok {
					v = FormatDate(t)
				}
				b, err := json.Marshal(v)
				if err != nil {
					p.mu.Unlock()
					return fmt.Errorf("encode %s.%s: %w", o.Class, k, err)
				}
				os.Fields[k] = b
			}
			ps.Objects = append(ps.Objects, os)
		}
		for k, v := range p.vdis {
			c := v.snapshotForSave()
			ps.VDIs[k] = &c
		}
		p.mu.Unlock()
		sort.Slice(ps.Objects, func(i, j int) bool { return ps.Objects[i].Created < ps.Objects[j].Created })
		st.Pools = append(st.Pools, ps)
	}
	b, err := json.MarshalIndent(st, "", " ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	return writeFileAtomic(filepath.Join(s.cfg.StateDir, stateFileName), b)
}

func writeFileAtomic(path string, data []byte) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".state-*.tmp")
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	defer func() { _ = os.Remove(tmp.Name()) }()
	if err := tmp.Chmod(0o644); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if _, err := tmp.Write(data); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		_ = tmp.Close()
		return fmt.Errorf("save state: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if d, err := os.Open(filepath.Dir(path)); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// load restores the state; false if the directory holds none.
func (s *Sim) load() (bool, error) {
	b, err := os.ReadFile(filepath.Join(s.cfg.StateDir, stateFileName))
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read state: %w", err)
	}
	var st stateFile
	if err := json.Unmarshal(b, &st); err != nil {
		return false, fmt.Errorf("decode state: %w", err)
	}
	if st.Version != stateVersion {
		return false, fmt.Errorf("state version %d not supported", st.Version)
	}
	for _, ps := range st.Pools {
		p := newPool(s, ps.Name)
		p.db.gen = ps.Gen
		p.db.lostBefore = ps.LostBefore
		for _, os := range ps.Objects {
			c, ok := Classes[os.Class]
			if !ok {
				continue
			}
			o := &object{Class: os.Class, Ref: os.Ref, Created: os.Created, Modified: os.Modified, Fields: map[string]any{}}
			for _, f := range c.Fields {
				if f.Derived != "" {
					continue
				}
				raw, ok := os.Fields[f.Name]
				if !ok {
					o.Fields[f.Name] = f.zero()
					continue
				}
				v, err := decodeField(f, raw)
				if err != nil {
					return false, fmt.Errorf("decode %s.%s: %w", os.Class, f.Name, err)
				}
				o.Fields[f.Name] = v
			}
			p.db.objs[o.Ref] = o
			p.db.uuids[o.str("uuid")] = o
		}
		// State saved before VM_metrics existed: give every VM one, as
		// xapi's dbsync_master does for a VM without metrics.
		for _, vm := range p.db.all("VM") {
			p.db.ensureVMMetrics(vm)
		}
		for k, v := range ps.VDIs {
			p.vdis[k] = v
		}
		s.pools = append(s.pools, p)
	}
	return true, nil
}

func decodeField(f Field, raw json.RawMessage) (any, error) {
	switch f.Kind {
	case KInt:
		var n int64
		err := json.Unmarshal(raw, &n)
		return n, err
	case KBool:
		var b bool
		err := json.Unmarshal(raw, &b)
		return b, err
	case KFloat:
		var x float64
		err := json.Unmarshal(raw, &x)
		return x, err
	case KDate:
		var s string
		if err := json.Unmarshal(raw, &s); err != nil {
			return nil, err
		}
		return ParseDate(s)
	case KSet, KRefSet:
		var v []string
		err := json.Unmarshal(raw, &v)
		if v == nil {
			v = []string{}
		}
		return v, err
	case KMap:
		var v map[string]string
		err := json.Unmarshal(raw, &v)
		if v == nil {
			v = map[string]string{}
		}
		return v, err
	}
	var s string
	err := json.Unmarshal(raw, &s)
	return s, err
}
