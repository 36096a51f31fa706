package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

// backendSlot holds the one backend of a kind an agent runs, and what it
// needs to bring a crashed backend back: its name and config, and the
// latest Handle (with State) of every handle it has handed out.
type backendSlot struct {
	kind contract.Kind

	mu      sync.Mutex
	name    string
	config  []byte
	inst    *host.Instance
	crashed bool // the instance exited; relaunch and recover on the next call
	handles map[string]*known
}

// known is what the agent remembers of a handle to recover it after a
// backend crash.
type known struct {
	h    contract.Handle
	xapi contract.XAPIAccess
	peer contract.Endpoint
}

func (s *backendSlot) currentName() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.name
}

func (s *backendSlot) close() {
	s.mu.Lock()
	inst := s.inst
	s.inst = nil
	s.mu.Unlock()
	if inst != nil {
		inst.Close()
	}
}

func (s *backendSlot) launchLocked(ctx context.Context, a *Agent) error {
	var (
		inst *host.Instance
		err  error
	)
	dir := a.cfg.StateDir
	if s.kind == contract.KindStorage {
		inst, err = a.host.LaunchStorage(ctx, s.name, s.config, dir)
	} else {
		inst, err = a.host.LaunchNetwork(ctx, s.name, s.config, dir)
	}
	if err != nil {
		return fmt.Errorf("launch %s backend %s: %w", s.kind, s.name, err)
	}
	s.inst, s.crashed = inst, false
	a.log.Info("backend launched", "kind", string(s.kind), "backend", s.name, "pid", inst.Pid())
	return nil
}

// launch starts the backend (idempotent for the same name).
func (s *backendSlot) launch(ctx context.Context, a *Agent, req LaunchRequest) (LaunchResponse, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if req.Name == "" {
		return LaunchResponse{}, fmt.Errorf("backend name required: %w", contract.ErrInvalidArgument)
	}
	if s.name != "" && s.name != req.Name {
		return LaunchResponse{}, fmt.Errorf("this agent already runs %s backend %s, not %s: %w", s.kind, s.name, req.Name, contract.ErrAlreadyExists)
	}
	existing := s.inst != nil && !s.inst.Exited()
	if !existing {
		if s.inst != nil {
			s.inst.Close()
			s.inst = nil
		}
		s.name, s.config = req.Name, req.Config
		if s.handles == nil {
			s.handles = map[string]*known{}
		}
		if err := s.launchLocked(ctx, a); err != nil {
			s.name = ""
			return LaunchResponse{}, err
		}
		if err := s.recoverAllLocked(ctx, a); err != nil {
			s.crashed = true // relaunch and recover again on the next call
			return LaunchResponse{}, err
		}
	}
	return LaunchResponse{Info: s.inst.Info, APIVersion: s.inst.APIVersion, PID: s.inst.Pid(), Existing: existing, Warnings: s.inst.Warnings}, nil
}

// ErrNoBackend: no backend of that kind was launched in this agent.
var ErrNoBackend = fmt.Errorf("no backend launched: %w", contract.ErrFailedPrecondition)

// get returns the running instance, relaunching a crashed backend and
// re-binding its known handles (Recover with their latest state) first.
func (s *backendSlot) get(ctx context.Context, a *Agent) (*host.Instance, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.name == "" {
		return nil, fmt.Errorf("%s: %w", s.kind, ErrNoBackend)
	}
	if s.inst != nil && !s.inst.Exited() && !s.crashed {
		return s.inst, nil
	}
	if s.inst != nil {
		s.inst.Close()
		s.inst = nil
	}
	a.log.Warn("relaunching backend", "kind", string(s.kind), "backend", s.name)
	if err := s.launchLocked(ctx, a); err != nil {
		return nil, err
	}
	if err := s.recoverAllLocked(ctx, a); err != nil {
		// A backend missing some of its handles must not serve calls:
		// relaunch and recover again on the next call.
		s.crashed = true
		return nil, err
	}
	return s.inst, nil
}

func (s *backendSlot) recoverAllLocked(ctx context.Context, a *Agent) error {
	for id, k := range s.handles {
		var err error
		if s.kind == contract.KindStorage {
			var resp contract.RecoverResponse
			resp, err = s.inst.Storage().Recover(ctx, contract.RecoverRequest{Handle: k.h, XAPI: k.xapi, Peer: k.peer})
			if err == nil {
				k.h = resp.Handle
			}
		} else {
			var resp contract.NetRecoverResponse
			resp, err = s.inst.Network().Recover(ctx, contract.NetRecoverRequest{Handle: k.h, XAPI: k.xapi, Peer: k.peer})
			if err == nil {
				k.h = resp.Handle
			}
		}
		if err != nil {
			return fmt.Errorf("recover handle %s in the relaunched %s backend %s: %w", id, s.kind, s.name, err)
		}
		a.log.Info("handle recovered after backend relaunch", "handle", id)
	}
	return nil
}

// failed classifies a backend error: when the process is gone the next
// call relaunches it, and the error says so plainly.
func (s *backendSlot) failed(inst *host.Instance, err error) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, contract.ErrPluginExited) || inst.Exited() {
		s.mu.Lock()
		if s.inst == inst {
			s.crashed = true
		}
		name := s.name
		s.mu.Unlock()
		if !errors.Is(err, contract.ErrPluginExited) {
			err = fmt.Errorf("%w: %w", contract.ErrPluginExited, err)
		}
		return fmt.Errorf("%s backend %s (pid %d) exited; it will be relaunched and its handles recovered on the next call: %w",
			s.kind, name, inst.Pid(), err)
	}
	return err
}

// remember records the latest handle (and the credentials and peer to
// recover it with).
func (s *backendSlot) remember(h contract.Handle, xapi *contract.XAPIAccess, peer *contract.Endpoint) {
	if h.ID == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.handles == nil {
		s.handles = map[string]*known{}
	}
	k, ok := s.handles[h.ID]
	if !ok {
		k = &known{}
		s.handles[h.ID] = k
	}
	k.h = h
	if xapi != nil {
		k.xapi = *xapi
	}
	if peer != nil {
		k.peer = *peer
	}
}

// setState updates the state of a known handle.
func (s *backendSlot) setState(id string, st contract.State) {
	if st.Data == nil && st.Version == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if k, ok := s.handles[id]; ok {
		k.h.State = st
	}
}

func (s *backendSlot) forget(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.handles, id)
}
