package l2tunnel

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/sdk"
)

// TestMain runs the test binary as the real backend when started through a
// symlink named like the backend (go-plugin's helper-process pattern).
func TestMain(m *testing.M) {
	if filepath.Base(os.Args[0]) == "wanmotion-network-"+Name {
		// As cmd/wanmotion-network-l2tunnel does.
		if len(os.Args) > 1 {
			os.Exit(RunCLI(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
		}
		sdk.ServeNetwork(New(sdk.Logger(Name)))
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// nsPrefix names every namespace the tests create; leftovers are found by it.
const nsPrefix = "wml2t-"

// lab is a set of network namespaces: two sites, each with a Linux
// bridges br0 and br1, joined by a veth underlay (10.250.N.1/30 — 10.250.N.2/30,
// addresses that exist only inside the namespaces).
type lab struct {
	t      *testing.T
	id     string
	siteA  string
	siteB  string
	ulA    string
	ulB    string
	extras []string
}

var labSeq struct {
	sync.Mutex
	n int
}

func ipCmd(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	require.NoError(t, err, "ip %s: %s", strings.Join(args, " "), out)
}

// ipBatch runs ip commands through "ip -batch", one process per run of
// commands in the same namespace (a command may start with "-n NS ").
func ipBatch(t testing.TB, cmds ...string) {
	t.Helper()
	run := func(ns string, group []string) {
		args := []string{"-batch", "-"}
		if ns != "" {
			args = append([]string{"-n", ns}, args...)
		}
		c := exec.Command("ip", args...)
		c.Stdin = strings.NewReader(strings.Join(group, "\n") + "\n")
		out, err := c.CombinedOutput()
		require.NoError(t, err, "ip %s:\n%s\n%s", strings.Join(args, " "), strings.Join(group, "\n"), out)
	}
	cur, group := "", []string(nil)
	for _, c := range cmds {
		ns := ""
		if rest, ok := strings.CutPrefix(c, "-n "); ok {
			ns, c, _ = strings.Cut(rest, " ")
		}
		if ns != cur && len(group) > 0 {
			run(cur, group)
			group = nil
		}
		cur = ns
		group = append(group, c)
	}
	if len(group) > 0 {
		run(cur, group)
	}
}

func requireLab(t testing.TB) {
	t.Helper()
	testutil.RequireRoot(t)
	testutil.RequireTool(t, "ip", "iproute2")
}

// newLab builds the two sites and removes them (checking nothing is left)
// when the test ends.
func newLab(t *testing.T) *lab {
	t.Helper()
	requireLab(t)
	labSeq.Lock()
	labSeq.n++
	n := labSeq.n
	labSeq.Unlock()
	r := make([]byte, 3)
	_, _ = rand.Read(r)
	id := hex.EncodeToString(r)
	l := &lab{t: t, id: id, siteA: nsPrefix + id + "-a", siteB: nsPrefix + id + "-b",
		ulA: fmt.Sprintf("10.250.%d.1", n%250), ulB: fmt.Sprintf("10.250.%d.2", n%250)}
	t.Cleanup(l.destroy)
	for _, ns := range []string{l.siteA, l.siteB} {
		ipCmd(t, "netns", "add", ns)
	}
	ipBatch(t,
		fmt.Sprintf("link add ul netns %s type veth peer name ul netns %s", l.siteA, l.siteB),
		fmt.Sprintf("-n %s addr add %s/30 dev ul", l.siteA, l.ulA),
		fmt.Sprintf("-n %s addr add %s/30 dev ul", l.siteB, l.ulB),
		fmt.Sprintf("-n %s link set ul up", l.siteA),
		fmt.Sprintf("-n %s link set ul up", l.siteB),
		fmt.Sprintf("-n %s link set lo up", l.siteA),
		fmt.Sprintf("-n %s link set lo up", l.siteB),
		fmt.Sprintf("-n %s link add br0 type bridge", l.siteA),
		fmt.Sprintf("-n %s link add br0 type bridge", l.siteB),
		fmt.Sprintf("-n %s link set br0 up", l.siteA),
		fmt.Sprintf("-n %s link add br1 type bridge", l.siteA),
		fmt.Sprintf("-n %s link set br1 up", l.siteA),
		fmt.Sprintf("-n %s link set br0 up", l.siteB),
		fmt.Sprintf("-n %s link add br1 type bridge", l.siteB),
		fmt.Sprintf("-n %s link set br1 up", l.siteB),
	)
	return l
}

// addNS adds an extra namespace (a VM or a client) removed with the lab.
func (l *lab) addNS(role string) string {
	ns := nsPrefix + l.id + "-" + role
	ipCmd(l.t, "netns", "add", ns)
	l.extras = append(l.extras, ns)
	return ns
}

// attach creates a veth pair: eth0 (with mac and addresses) in ns, its
// peer (named port) on site's br0.
func (l *lab) attach(ns, site, port, mac string, addrs ...string) {
	l.t.Helper()
	cmds := []string{
		fmt.Sprintf("link add %s netns %s type veth peer name eth0 netns %s address %s", port, site, ns, mac),
		fmt.Sprintf("-n %s link set lo up", ns),
	}
	for _, a := range addrs {
		extra := ""
		if strings.Contains(a, ":") {
			extra = " nodad"
		}
		cmds = append(cmds, fmt.Sprintf("-n %s addr add %s dev eth0%s", ns, a, extra))
	}
	cmds = append(cmds,
		fmt.Sprintf("-n %s link set eth0 up", ns),
		fmt.Sprintf("-n %s link set %s master br0", site, port),
		fmt.Sprintf("-n %s link set %s up", site, port))
	ipBatch(l.t, cmds...)
}

func (l *lab) namespaces() []string {
	return append([]string{l.siteA, l.siteB}, l.extras...)
}

func (l *lab) destroy() {
	for _, ns := range l.namespaces() {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
	requireNoLeftovers(l.t, l.id)
}

// requireNoLeftovers checks that no namespace of the lab remains and that
// the test's own namespace has no tunnel interface of ours.
func requireNoLeftovers(t testing.TB, id string) {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	require.NoError(t, err, "%s", out)
	require.NotContains(t, string(out), nsPrefix+id, "namespaces left behind")
	links, err := netlink.LinkList()
	require.NoError(t, err)
	for _, lk := range links {
		require.False(t, strings.HasPrefix(lk.Attrs().Name, "wm") && lk.Type() == "vxlan", "vxlan %s left in the test's namespace", lk.Attrs().Name)
	}
}

// handleIn opens a netlink handle in a named namespace.
func handleIn(t testing.TB, ns string) *netlink.Handle {
	t.Helper()
	nsh, err := netns.GetFromName(ns)
	require.NoError(t, err)
	defer nsh.Close()
	h, err := netlink.NewHandleAt(nsh)
	require.NoError(t, err)
	t.Cleanup(h.Close)
	return h
}

// inNS runs fn on a thread inside namespace ns; sockets fn opens stay
// there. The thread is thrown away afterwards.
func inNS(t testing.TB, ns string, fn func() error) {
	t.Helper()
	nsh, err := netns.GetFromName(ns)
	require.NoError(t, err)
	defer nsh.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		if err := netns.Set(nsh); err != nil {
			errc <- err
			return
		}
		errc <- fn()
	}()
	require.NoError(t, <-errc)
}

// sysctl writes a sysctl inside namespace ns.
func sysctl(t testing.TB, ns, key, value string) {
	t.Helper()
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	out, err := exec.Command("ip", "netns", "exec", ns, "sh", "-c", "echo "+value+" > "+path).CombinedOutput()
	require.NoError(t, err, "sysctl %s=%s in %s: %s", key, value, ns, out)
}

// vxlans lists the vxlan interfaces of a namespace by name.
func vxlans(t testing.TB, h *netlink.Handle) map[string]*netlink.Vxlan {
	t.Helper()
	links, err := h.LinkList()
	require.NoError(t, err)
	out := map[string]*netlink.Vxlan{}
	for _, lk := range links {
		if vx, ok := lk.(*netlink.Vxlan); ok {
			out[vx.Name] = vx
		}
	}
	return out
}

// siteBackend returns a configured in-process backend for a site.
func siteBackend(t testing.TB, ns, underlay string, extra map[string]any) *Backend {
	t.Helper()
	b := New(testutil.Logger(t).Named(ns))
	t.Cleanup(b.Close)
	cfg := map[string]any{"netns": ns, "underlay_address": underlay, "announce_interval_ms": 20}
	for k, v := range extra {
		cfg[k] = v
	}
	raw, err := contract.EncodeOpaque(cfg)
	require.NoError(t, err)
	_, err = b.Configure(context.Background(), contract.ConfigureRequest{APIVersion: contract.APIVersion10, Config: raw})
	require.NoError(t, err)
	return b
}

func mustMAC(t testing.TB, s string) net.HardwareAddr {
	t.Helper()
	m, err := net.ParseMAC(s)
	require.NoError(t, err)
	return m
}
