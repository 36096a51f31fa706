package xapisim

import (
	"sync"
	"sync/atomic"
)

// trackWrite keeps, per live VDI, one 64 KiB-block bitmap of the writes
// made since each content_id it carried: the first write after a snapshot
// (st.Clean) starts a bitmap for the content_id the snapshot shares. So
// migrate_send knows the blocks changed since any snapshot, CBT or not.
// Called with the VDI's pool lock held; takes only e.mu.
func (e *simExt) trackWrite(vdiUUID, contentID string, clean bool, size, off, n int64) {
	if n <= 0 {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	t := e.tracks[vdiUUID]
	if t == nil {
		t = map[string][]byte{}
		e.tracks[vdiUUID] = t
	}
	if clean && contentID != "" {
		t[contentID] = make([]byte, bitmapLen(size))
	}
	for _, bm := range t {
		markBlocks(bm, off, n)
	}
}

// changedSince returns the blocks of the live VDI written since it had
// contentID, and whether that is known.
func (e *simExt) changedSince(vdiUUID, contentID string) ([]byte, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	bm, ok := e.tracks[vdiUUID][contentID]
	if !ok {
		return nil, false
	}
	return append([]byte(nil), bm...), true
}

// mirror sends every write to a source VDI to the destination while a
// storage migration copies it (xapi's synchronous mirror): the writer's
// call returns only after the destination acknowledged.
type mirror struct {
	send func(off int64, data []byte) error

	mu     sync.Mutex
	err    error
	writes atomic.Int64
	bytes  atomic.Int64
}

func (m *mirror) write(off int64, data []byte) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.err != nil {
		return
	}
	if err := m.send(off, data); err != nil {
		m.err = err
		return
	}
	m.writes.Add(1)
	m.bytes.Add(int64(len(data)))
}

func (m *mirror) failed() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

func (e *simExt) mirrorFor(vdiUUID string) *mirror {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.mirrors[vdiUUID]
}

// mirrorWrite is called by WriteVDI after the local write, with the VDI's
// data lock held.
func (e *simExt) mirrorWrite(vdiUUID string, off int64, data []byte) {
	if m := e.mirrorFor(vdiUUID); m != nil {
		m.write(off, data)
	}
}

// mirrorZero mirrors a ZeroVDI.
func (e *simExt) mirrorZero(vdiUUID string, off, n int64) {
	if m := e.mirrorFor(vdiUUID); m != nil {
		for n > 0 {
			k := min(n, 1<<20)
			m.write(off, make([]byte, k))
			off += k
			n -= k
		}
	}
}

// mirrorNote counts a guest write that a mirror will carry.
func (e *simExt) mirrorNote(vdiUUID string, counter *int64) {
	if e.mirrorFor(vdiUUID) != nil {
		*counter++
	}
}

// FaultPoints are the places InjectFault can break a migration before
// the destination VM runs (each makes it roll back).
var FaultPoints = []string{"sm_copy", "mirror", "memory", "before_start"}

// FaultFinishAnswer loses the answer to the destination's "VM runs now"
// (the VM did start there): the source must find out and go forward.
const FaultFinishAnswer = "finish_answer"

// InjectFault arms a one-shot failure at point (see FaultPoints): the next
// migration that reaches it fails there as if the destination had gone.
func (s *Sim) InjectFault(point string) error {
	ok := point == FaultFinishAnswer
	for _, f := range FaultPoints {
		ok = ok || f == point
	}
	if !ok {
		return Errorf(ErrInvalidValue, "point", point)
	}
	e := s.ext()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.faults[point]++
	return nil
}

// takeFault consumes an armed fault.
func (e *simExt) takeFault(point string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.faults[point] > 0 {
		e.faults[point]--
		return true
	}
	return false
}

// EndpointBytes returns the request-body bytes received on every host's
// /services/SM and /services/xenops endpoints since the simulator started.
func (s *Sim) EndpointBytes() (sm, xenops int64) {
	e := s.ext()
	return e.smBytes.Load(), e.xenopsBytes.Load()
}
