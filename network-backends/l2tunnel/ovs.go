package l2tunnel

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os/exec"
	"strconv"
	"strings"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// ovsPlane adds VXLAN ports to Open vSwitch bridges with ovs-vsctl. It
// uses a kernelPlane (in the host's namespace) for addresses and for
// sending announcements on the bridge's internal interface.
type ovsPlane struct {
	vsctl  string
	db     string
	noWait bool
	k      *kernelPlane
}

func newOVSPlane(c Config) (*ovsPlane, error) {
	k, err := newKernelPlane(c.Netns)
	if err != nil {
		return nil, err
	}
	return &ovsPlane{vsctl: c.OVSVsctl, db: c.OVSDB, noWait: c.OVSNoWait, k: k}, nil
}

func (o *ovsPlane) close() { o.k.close() }

// OVSGlobalArgs are the ovs-vsctl options before the command.
func OVSGlobalArgs(db string, noWait bool) []string {
	args := []string{"--timeout=10"}
	if db != "" {
		args = append(args, "--db="+db)
	}
	if noWait {
		args = append(args, "--no-wait")
	}
	return args
}

// OVSAddPortArgs is the ovs-vsctl command (without global options) that
// adds, or updates, the VXLAN port name on bridge: VNI as the tunnel key,
// the local and remote VTEP addresses and the UDP port. A nil remote gives
// remote_ip=flow (the port then sends nothing until a remote is set). The
// port is protected: the NORMAL action never forwards between two
// protected ports, so tunnels of several migrations on one bridge cannot
// form a loop. The interface's external_ids carry the marker m.
func OVSAddPortArgs(bridge, name string, vni int, local, remote net.IP, port int, m Marker) []string {
	r := "flow"
	if remote != nil {
		r = remote.String()
	}
	args := []string{
		"--may-exist", "add-port", bridge, name,
		"--", "set", "interface", name, "type=vxlan",
		"options:remote_ip=" + r,
		"options:local_ip=" + local.String(),
		"options:key=" + strconv.Itoa(vni),
		"options:dst_port=" + strconv.Itoa(port),
		"external_ids:wanmotion=l2tunnel",
	}
	args = append(args, m.ovsIDs()...)
	return append(args, "--", "set", "port", name, "protected=true")
}

// OVSMarkArgs rewrites the marker in an interface's external_ids.
func OVSMarkArgs(name string, m Marker) []string {
	return append([]string{"set", "interface", name, "external_ids:wanmotion=l2tunnel"}, m.ovsIDs()...)
}

// OVSGetMigrationArgs reads the migration an interface belongs to
// (nothing when the interface or the key does not exist).
func OVSGetMigrationArgs(name string) []string {
	return []string{"--if-exists", "get", "interface", name, "external_ids:" + ovsKeyMigration}
}

// OVSListArgs lists every VXLAN interface with its external_ids and
// options, as JSON.
func OVSListArgs() []string {
	return []string{"--format=json", "--columns=name,external_ids,options", "find", "interface", "type=vxlan"}
}

// OVSSetRemoteArgs points an existing VXLAN port at remote.
func OVSSetRemoteArgs(name string, remote net.IP) []string {
	return []string{"set", "interface", name, "options:remote_ip=" + remote.String()}
}

// OVSDelPortArgs removes the port name from whatever bridge has it.
func OVSDelPortArgs(name string) []string {
	return []string{"--if-exists", "del-port", name}
}

// OVSBridgeExistsArgs checks a bridge (exit status 2 when missing).
func OVSBridgeExistsArgs(bridge string) []string {
	return []string{"br-exists", bridge}
}

// OVSGetRemoteArgs reads a port's remote_ip option.
func OVSGetRemoteArgs(name string) []string {
	return []string{"--if-exists", "get", "interface", name, "options:remote_ip"}
}

func (o *ovsPlane) run(ctx context.Context, args []string) (string, int, error) {
	full := append(OVSGlobalArgs(o.db, o.noWait), args...)
	cmd := exec.CommandContext(ctx, o.vsctl, full...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			return "", -1, fmt.Errorf("%w: %v", contract.ErrCancelled, ctx.Err())
		}
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return out.String(), ee.ExitCode(), fmt.Errorf("ovs-vsctl %s: %s: %w", strings.Join(args, " "), strings.TrimSpace(errb.String()), contract.ErrInternal)
		}
		return "", -1, fmt.Errorf("run %s: %v: %w", o.vsctl, err, contract.ErrFailedPrecondition)
	}
	return out.String(), 0, nil
}

func (o *ovsPlane) ensure(ctx context.Context, t tunnel, p tunnelParams) error {
	_, code, err := o.run(ctx, OVSBridgeExistsArgs(t.Bridge))
	if code == 2 {
		return fmt.Errorf("open vswitch bridge %s does not exist: %w", t.Bridge, contract.ErrFailedPrecondition)
	}
	if err != nil {
		return err
	}
	out, _, err := o.run(ctx, OVSGetMigrationArgs(t.Name))
	if err != nil {
		return err
	}
	if m := unquoteOVS(out); m != "" && p.Marker.MigrationID != "" && m != p.Marker.MigrationID {
		return fmt.Errorf("open vswitch interface %s belongs to migration %s; remove it first if it is stale: %w", t.Name, m, contract.ErrFailedPrecondition)
	}
	_, _, err = o.run(ctx, OVSAddPortArgs(t.Bridge, t.Name, t.VNI, p.Local, p.Remote, p.Port, p.Marker))
	return err
}

// unquoteOVS turns ovs-vsctl's printed string ("a b" or a) into its value.
func unquoteOVS(s string) string {
	s = strings.TrimSpace(s)
	if u, err := strconv.Unquote(s); err == nil {
		return u
	}
	return s
}

func (o *ovsPlane) setRemote(ctx context.Context, t tunnel, p tunnelParams) error {
	_, _, err := o.run(ctx, OVSSetRemoteArgs(t.Name, p.Remote))
	return err
}

func (o *ovsPlane) remote(ctx context.Context, t tunnel) (net.IP, error) {
	out, _, err := o.run(ctx, OVSGetRemoteArgs(t.Name))
	if err != nil {
		return nil, err
	}
	return net.ParseIP(unquoteOVS(out)), nil
}

func (o *ovsPlane) remove(ctx context.Context, t tunnel) error {
	_, _, err := o.run(ctx, OVSDelPortArgs(t.Name))
	return err
}

func (o *ovsPlane) list(ctx context.Context) ([]FoundTunnel, error) {
	out, _, err := o.run(ctx, OVSListArgs())
	if err != nil {
		return nil, err
	}
	rows, err := parseOVSList([]byte(out))
	if err != nil {
		return nil, err
	}
	var found []FoundTunnel
	for _, r := range rows {
		m, marked := markerFromOVS(r.ids)
		if !marked && !strings.HasPrefix(r.name, "wm") {
			continue
		}
		f := FoundTunnel{Name: r.name, Marker: m, Marked: marked, Remote: r.options["remote_ip"]}
		f.VNI, _ = strconv.Atoi(r.options["key"])
		found = append(found, f)
	}
	return found, nil
}

type ovsRow struct {
	name         string
	ids, options map[string]string
}

// parseOVSList reads the JSON of OVSListArgs: {"headings": [...],
// "data": [[name, ["map", [[k, v], ...]], ["map", ...]], ...]}.
func parseOVSList(b []byte) ([]ovsRow, error) {
	var doc struct {
		Headings []string            `json:"headings"`
		Data     [][]json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("ovs-vsctl find output: %v: %w", err, contract.ErrInternal)
	}
	col := map[string]int{}
	for i, h := range doc.Headings {
		col[h] = i
	}
	var rows []ovsRow
	for _, d := range doc.Data {
		var r ovsRow
		for _, c := range []struct {
			name string
			into func(json.RawMessage) error
		}{
			{"name", func(m json.RawMessage) error { return json.Unmarshal(m, &r.name) }},
			{"external_ids", func(m json.RawMessage) (err error) { r.ids, err = ovsMap(m); return }},
			{"options", func(m json.RawMessage) (err error) { r.options, err = ovsMap(m); return }},
		} {
			i, ok := col[c.name]
			if !ok || i >= len(d) {
				return nil, fmt.Errorf("ovs-vsctl find output: no column %s: %w", c.name, contract.ErrInternal)
			}
			if err := c.into(d[i]); err != nil {
				return nil, fmt.Errorf("ovs-vsctl find output: column %s: %v: %w", c.name, err, contract.ErrInternal)
			}
		}
		rows = append(rows, r)
	}
	return rows, nil
}

// ovsMap decodes an OVSDB JSON map: ["map", [["k", "v"], ...]].
func ovsMap(m json.RawMessage) (map[string]string, error) {
	var v []json.RawMessage
	if err := json.Unmarshal(m, &v); err != nil {
		return nil, err
	}
	var tag string
	if len(v) != 2 || json.Unmarshal(v[0], &tag) != nil || tag != "map" {
		return nil, fmt.Errorf("not an ovsdb map: %.60s", m)
	}
	var pairs [][2]string
	if err := json.Unmarshal(v[1], &pairs); err != nil {
		return nil, err
	}
	out := make(map[string]string, len(pairs))
	for _, p := range pairs {
		out[p[0]] = p[1]
	}
	return out, nil
}

func (o *ovsPlane) removeName(ctx context.Context, name string) error {
	_, _, err := o.run(ctx, OVSDelPortArgs(name))
	return err
}

func (o *ovsPlane) mark(ctx context.Context, t tunnel, m Marker) (bool, error) {
	out, _, err := o.run(ctx, []string{"--if-exists", "get", "interface", t.Name, "type"})
	if err != nil {
		return false, err
	}
	if strings.TrimSpace(out) == "" {
		return false, nil
	}
	_, _, err = o.run(ctx, OVSMarkArgs(t.Name, m))
	return err == nil, err
}

func (o *ovsPlane) describe(ctx context.Context, t tunnel) string {
	r, err := o.remote(ctx, t)
	if err != nil {
		return fmt.Sprintf("%s: %v", t.Name, err)
	}
	remote := "flow"
	if r != nil {
		remote = r.String()
	}
	return fmt.Sprintf("%s: ovs vxlan key %d remote %s on %s", t.Name, t.VNI, remote, t.Bridge)
}

func (o *ovsPlane) localAddress(ctx context.Context, ifname string) (net.IP, error) {
	return o.k.localAddress(ctx, ifname)
}

func (o *ovsPlane) send(ctx context.Context, ifname string, frames [][]byte) error {
	return o.k.send(ctx, ifname, frames)
}
