package l2tunnel

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// TestTAPStreamReconnects cuts the tap stream (as a WAN gateway blip
// would) and checks that the source dials again and traffic resumes.
func TestTAPStreamReconnects(t *testing.T) {
	l := newLab(t)
	vmNS, clientNS := l.addNS("vm"), l.addNS("cl")
	l.attach(vmNS, l.siteB, "vmq", vmMAC, vmIP+"/24")
	l.attach(clientNS, l.siteA, "clp", "02:00:5e:00:00:20", clientIP+"/24")
	tap := map[string]any{"mode": ModeTAP, "bridges": bridges}
	src, dst := siteBackend(t, l.siteA, l.ulA, tap), siteBackend(t, l.siteB, l.ulB, tap)
	s, d := prepareBoth(t, src, dst, "tap-reconnect")
	ctx := context.Background()
	_, err := dst.Activate(ctx, contract.ActivateRequest{Handle: d.Handle.ID})
	require.NoError(t, err)

	flow := startFlow(t, clientNS, vmNS)
	waitFor(t, "the stream through the tap tunnel", func() bool { _, r, e := flow.countsAfter(time.Time{}); return r > 5 && e > 5 })

	h, err := src.get(s.Handle.ID)
	require.NoError(t, err)
	h.mu.Lock()
	link := h.link
	h.mu.Unlock()
	link.mu.Lock()
	c, gen := link.conn, link.connGen
	link.mu.Unlock()
	require.NotNil(t, c)
	cut := time.Now()
	require.NoError(t, c.Close())
	waitFor(t, "a new stream", func() bool {
		link.mu.Lock()
		defer link.mu.Unlock()
		return link.connGen > gen && link.conn != nil
	})
	t.Logf("reconnected after %v", time.Since(cut))
	waitFor(t, "traffic after the cut", func() bool { _, r, e := flow.countsAfter(cut.Add(50 * time.Millisecond)); return r > 5 && e > 5 })
	gap, lost := flow.gap(cut.Add(-200*time.Millisecond), time.Now().Add(-100*time.Millisecond))
	t.Logf("stream cut: longest gap at the VM %v, %d datagrams lost", gap.Round(time.Millisecond), lost)
	st, err := dst.Status(ctx, contract.NetStatusRequest{Handle: d.Handle.ID})
	require.NoError(t, err)
	assert.Contains(t, st.Detail, "stream connected")

	for _, x := range []struct {
		b *Backend
		h contract.Handle
	}{{src, s.Handle}, {dst, d.Handle}} {
		_, err := x.b.Cleanup(ctx, contract.NetCleanupRequest{Handle: x.h})
		require.NoError(t, err)
	}
	assert.Empty(t, tunnelLinks(t, handleIn(t, l.siteA), "wm"))
	assert.Empty(t, tunnelLinks(t, handleIn(t, l.siteB), "wm"))
}
