package xapiadapt

import (
	"context"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/engine"
	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// VMVIFs fills each VIF's addresses from the VM's guest metrics, for the
// VIF's own device, parsed leniently; without guest metrics the VIFs have
// no addresses and there is no error.
func TestVMVIFsGuestAddresses(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t)
	vm := e.demoVM(t)
	pool, ok := e.sim.PoolByName(xapisim.PoolName(0))
	require.True(t, ok)

	tests := []struct {
		name     string
		networks map[string]string // nil: no guest metrics (null ref)
		v4, v6   []string
	}{
		{name: "demo defaults", networks: map[string]string{"0/ip": xapisim.DefaultDemoIPv4,
			"0/ipv4/0": xapisim.DefaultDemoIPv4, "0/ipv6/0": xapisim.DefaultDemoIPv6},
			v4: []string{xapisim.DefaultDemoIPv4}, v6: []string{xapisim.DefaultDemoIPv6}},
		{name: "several, unsorted, duplicated, with garbage and another device",
			networks: map[string]string{"0/ip": "10.0.0.9", "0/ipv4/0": "10.0.0.9", "0/ipv4/1": "10.0.0.10",
				"0/ipv4/2": "nonsense", "0/ipv6/0": "fe80::1", "0/ipv6/1": "2001:db8::9", "0/ipv6/2": "::1",
				"1/ip": "192.0.2.1", "0/ipv6/x/addr": "2001:db8::99"},
			v4: []string{"10.0.0.9", "10.0.0.10"}, v6: []string{"2001:db8::9", "fe80::1"}},
		{name: "old agent", networks: map[string]string{"0/ip": "172.16.0.3"}, v4: []string{"172.16.0.3"}},
		{name: "agent reports nothing", networks: map[string]string{}},
		{name: "only another device", networks: map[string]string{"3/ipv4/0": "10.3.3.3"}},
		{name: "no guest agent", networks: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, pool.SetGuestNetworks(vm.UUID, tt.networks))
			vifs, err := e.sp.VMVIFs(ctx, vm.Ref)
			require.NoError(t, err)
			require.Len(t, vifs, 1)
			assert.Equal(t, "0", vifs[0].Device)
			assert.NotEmpty(t, vifs[0].MAC)
			assert.Equal(t, tt.v4, vifs[0].IPv4)
			assert.Equal(t, tt.v6, vifs[0].IPv6)
		})
	}
}

// A guest metrics ref that cannot be read (the object vanished between
// the two reads, or any other failure) gives VIFs without addresses, not
// an error; a cancelled context is still an error.
func TestVMVIFsUnreadableGuestMetrics(t *testing.T) {
	var gmCalls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		req, err := xapisim.ParseRequest(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "text/xml")
		switch req.Method {
		case "session.login_with_password":
			_, _ = w.Write(xapisim.EncodeSuccess("OpaqueRef:s1"))
		case "session.logout":
			_, _ = w.Write(xapisim.EncodeSuccess(""))
		case "VM.get_record":
			_, _ = w.Write(xapisim.EncodeSuccess(map[string]any{"uuid": "vm-1", "VIFs": []string{"OpaqueRef:vif0"},
				"guest_metrics": "OpaqueRef:gone"}))
		case "VIF.get_record":
			_, _ = w.Write(xapisim.EncodeSuccess(map[string]any{"device": "0", "MAC": "aa:bb:cc:dd:ee:ff",
				"network": "OpaqueRef:net"}))
		case "VM_guest_metrics.get_networks":
			gmCalls.Add(1)
			_, _ = w.Write(xapisim.EncodeFailure(xapisim.ErrHandleInvalid, []string{"VM_guest_metrics", "OpaqueRef:gone"}))
		default:
			_, _ = w.Write(xapisim.EncodeFailure(xapisim.ErrMethodUnknown, []string{req.Method}))
		}
	}))
	defer srv.Close()
	ctx := context.Background()
	c, err := xapi.New(xapi.Config{URL: srv.URL, Username: "root", Password: "x", DisableMemberDiscovery: true,
		Logger: testutil.Logger(t)})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	defer func() { _ = c.Close(context.Background()) }()
	p := NewPool(c, testutil.Logger(t))
	vifs, err := p.VMVIFs(ctx, "OpaqueRef:vm-1")
	require.NoError(t, err)
	assert.Equal(t, []engine.VIF{{Ref: "OpaqueRef:vif0", Device: "0", MAC: "aa:bb:cc:dd:ee:ff", NetworkRef: "OpaqueRef:net"}}, vifs)
	assert.Equal(t, int32(1), gmCalls.Load())

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, err = p.guestAddresses(cctx, "OpaqueRef:vm-1", "OpaqueRef:gone")
	require.ErrorIs(t, err, context.Canceled)
}
