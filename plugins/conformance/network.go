package conformance

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// NetworkSetup is what a backend's test hands the network suite.
type NetworkSetup struct {
	// Source and Destination are configured backends for the two sites.
	Source, Destination contract.Network
	// NewVM returns a fresh VM scenario; i distinguishes VMs within a test.
	NewVM func(t *testing.T, i int) *VM
	// Restart, optional: stops the backends and returns new ones (same
	// state directories and config), for the recovery test.
	Restart func(t *testing.T) (source, destination contract.Network)
}

// VM is one VM scenario of a backend's test fixture.
type VM struct {
	// Prepare returns the prepare request for a site; peer is the other
	// site's endpoint when it is already prepared (the destination is
	// prepared first).
	Prepare func(role contract.Role, peer contract.Endpoint) contract.NetPrepareRequest
	// CheckActive, optional, fails the test unless the VM's addresses are
	// served at the destination after Activate.
	CheckActive func(t *testing.T)
}

// NetworkFactory builds a fresh setup for one subtest.
type NetworkFactory func(t *testing.T) NetworkSetup

type netPair struct {
	src, dst contract.Network
	srcH     contract.Handle
	dstH     contract.Handle
	dstEP    contract.Endpoint
}

func netPrepare(t *testing.T, s NetworkSetup, vm *VM) *netPair {
	t.Helper()
	ctx := ctxT(t)
	d, err := s.Destination.Prepare(ctx, vm.Prepare(contract.RoleDestination, contract.Endpoint{}))
	require.NoError(t, err, "Prepare destination")
	require.NotEmpty(t, d.Handle.ID)
	assert.Equal(t, contract.RoleDestination, d.Handle.Role)
	sr, err := s.Source.Prepare(ctx, vm.Prepare(contract.RoleSource, d.Endpoint))
	require.NoError(t, err, "Prepare source")
	require.NotEmpty(t, sr.Handle.ID)
	assert.Equal(t, contract.RoleSource, sr.Handle.Role)
	p := &netPair{src: s.Source, dst: s.Destination, srcH: sr.Handle, dstH: d.Handle, dstEP: d.Endpoint}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		_, _ = p.src.Cleanup(ctx, contract.NetCleanupRequest{Handle: p.srcH})
		_, _ = p.dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: p.dstH})
	})
	return p
}

// RunNetworkSuite runs the network conformance suite against the backend
// the factory builds.
func RunNetworkSuite(t *testing.T, factory NetworkFactory) {
	t.Run("Info", func(t *testing.T) {
		s := factory(t)
		in, err := s.Source.Info(ctxT(t))
		require.NoError(t, err)
		assert.Equal(t, contract.KindNetwork, in.Kind)
		assert.NotEmpty(t, in.Name)
		assert.NotEmpty(t, in.Version)
		_, err = contract.SelectAPIVersion(contract.HostAPIVersions, in.APIVersions)
		assert.NoError(t, err)
		_, err = s.Source.Configure(ctxT(t), contract.ConfigureRequest{APIVersion: "999.0"})
		assert.ErrorIs(t, err, contract.ErrUnsupported)
	})

	t.Run("UnknownHandleIsNotFound", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		const h = "no-such-handle"
		_, err := s.Source.Status(ctx, contract.NetStatusRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Status")
		_, err = s.Destination.Activate(ctx, contract.ActivateRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Activate")
		_, err = s.Source.Release(ctx, contract.ReleaseRequest{Handle: h})
		assert.ErrorIs(t, err, contract.ErrNotFound, "Release")
		_, err = s.Source.Cleanup(ctx, contract.NetCleanupRequest{Handle: contract.Handle{ID: h, Role: contract.RoleSource}})
		assert.NoError(t, err, "Cleanup of an unknown handle is a no-op")
	})

	t.Run("PrepareTwice", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		vm := s.NewVM(t, 0)
		p := netPrepare(t, s, vm)
		again, err := s.Destination.Prepare(ctx, vm.Prepare(contract.RoleDestination, contract.Endpoint{}))
		require.NoError(t, err)
		assert.True(t, again.Existing)
		assert.Equal(t, p.dstH.ID, again.Handle.ID)
		diff := vm.Prepare(contract.RoleDestination, contract.Endpoint{})
		diff.VIFs = append(diff.VIFs, contract.VIFInfo{Device: "99", MAC: "02:00:00:00:00:99"})
		_, err = s.Destination.Prepare(ctx, diff)
		assert.ErrorIs(t, err, contract.ErrAlreadyExists)
		bad := vm.Prepare(contract.RoleDestination, contract.Endpoint{})
		bad.MigrationID = ""
		_, err = s.Destination.Prepare(ctx, bad)
		assert.ErrorIs(t, err, contract.ErrInvalidArgument)
	})

	t.Run("Lifecycle", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		vm := s.NewVM(t, 0)
		p := netPrepare(t, s, vm)
		_, err := p.src.Activate(ctx, contract.ActivateRequest{Handle: p.srcH.ID})
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "Activate on the source")
		_, err = p.dst.Release(ctx, contract.ReleaseRequest{Handle: p.dstH.ID})
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, "Release on the destination")

		for i := 0; i < 2; i++ {
			a, err := p.dst.Activate(ctx, contract.ActivateRequest{Handle: p.dstH.ID, DomID: 7})
			require.NoError(t, err, "Activate #%d", i+1)
			p.dstH.State = a.State
		}
		if vm.CheckActive != nil {
			vm.CheckActive(t)
		}
		st, err := p.dst.Status(ctx, contract.NetStatusRequest{Handle: p.dstH.ID})
		require.NoError(t, err)
		assert.Equal(t, contract.StateActive, st.State)
		for i := 0; i < 2; i++ {
			r, err := p.src.Release(ctx, contract.ReleaseRequest{Handle: p.srcH.ID})
			require.NoError(t, err, "Release #%d", i+1)
			p.srcH.State = r.State
		}
		st, err = p.src.Status(ctx, contract.NetStatusRequest{Handle: p.srcH.ID})
		require.NoError(t, err)
		assert.Equal(t, contract.StateReleased, st.State)
		for i := 0; i < 2; i++ {
			_, err = p.src.Cleanup(ctx, contract.NetCleanupRequest{Handle: p.srcH})
			require.NoError(t, err)
			_, err = p.dst.Cleanup(ctx, contract.NetCleanupRequest{Handle: p.dstH})
			require.NoError(t, err)
		}
		_, err = p.dst.Status(ctx, contract.NetStatusRequest{Handle: p.dstH.ID})
		assert.ErrorIs(t, err, contract.ErrNotFound)
	})

	t.Run("ConcurrentStatus", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		p := netPrepare(t, s, s.NewVM(t, 0))
		var wg sync.WaitGroup
		errs := make(chan error, 16)
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for j := 0; j < 25; j++ {
					st, err := p.dst.Status(ctx, contract.NetStatusRequest{Handle: p.dstH.ID})
					if err == nil && st.Handle != p.dstH.ID {
						err = fmt.Errorf("status of %q, want %q", st.Handle, p.dstH.ID)
					}
					if err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		_, err := p.dst.Activate(ctx, contract.ActivateRequest{Handle: p.dstH.ID})
		wg.Wait()
		close(errs)
		require.NoError(t, err)
		for err := range errs {
			t.Error(err)
		}
	})

	t.Run("Cancelled", func(t *testing.T) {
		s := factory(t)
		vm := s.NewVM(t, 0)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := s.Destination.Prepare(ctx, vm.Prepare(contract.RoleDestination, contract.Endpoint{}))
		require.ErrorIs(t, err, contract.ErrCancelled)
	})

	t.Run("RecoverFromState", func(t *testing.T) {
		s := factory(t)
		ctx := ctxT(t)
		in, err := s.Source.Info(ctx)
		require.NoError(t, err)
		vm := s.NewVM(t, 0)
		p := netPrepare(t, s, vm)
		if !in.Capabilities.Has(contract.CapResume) {
			_, err := p.dst.Recover(ctx, contract.NetRecoverRequest{Handle: p.dstH})
			require.ErrorIs(t, err, contract.ErrUnsupported)
			return
		}
		src, dst := p.src, p.dst
		if s.Restart != nil {
			src, dst = s.Restart(t)
		}
		rd, err := dst.Recover(ctx, contract.NetRecoverRequest{Handle: p.dstH})
		require.NoError(t, err)
		assert.Equal(t, p.dstH.ID, rd.Handle.ID)
		ep := p.dstEP
		if rd.Endpoint.Address != "" {
			ep = rd.Endpoint
		}
		rs, err := src.Recover(ctx, contract.NetRecoverRequest{Handle: p.srcH, Peer: ep})
		require.NoError(t, err)
		assert.Equal(t, p.srcH.ID, rs.Handle.ID)
		p.src, p.dst, p.srcH, p.dstH = src, dst, rs.Handle, rd.Handle
		_, err = dst.Activate(ctx, contract.ActivateRequest{Handle: rd.Handle.ID})
		require.NoError(t, err, "Activate after recovery")
		_, err = src.Release(ctx, contract.ReleaseRequest{Handle: rs.Handle.ID})
		require.NoError(t, err, "Release after recovery")
	})
}
