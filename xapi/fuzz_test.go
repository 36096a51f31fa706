package xapi

import (
	"os"
	"path/filepath"
	"testing"
)

// FuzzDecodeResponse feeds arbitrary bytes through the whole response path
// (normalise, kolo, envelope, typed conversion). Nothing may panic.
func FuzzDecodeResponse(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join("testdata", "*.xml"))
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		v, err := decodeResponse("fuzz.method", body)
		if err != nil {
			return
		}
		var (
			vm    VMRecord
			vdi   VDIRecord
			task  TaskRecord
			ev    EventBatch
			hosts map[HostRef]HostRecord
			nbd   []VDINBDServerInfo
			strs  []string
			m     map[string]string
			i     int64
			s     string
		)
		for _, out := range []any{&vm, &vdi, &task, &ev, &hosts, &nbd, &strs, &m, &i, &s} {
			_ = fromWire("fuzz", v, out)
		}
		for _, e := range ev.Events {
			_ = e.Decode(&task)
		}
		_ = fillEmpty(v)
		_, _ = DecodeValueString(task.Result)
	})
}
