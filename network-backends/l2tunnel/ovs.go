package l2tunnel

import (
	"bytes"
	"context"
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
// form a loop.
func OVSAddPortArgs(bridge, name string, vni int, local, remote net.IP, port int) []string {
	r := "flow"
	if remote != nil {
		r = remote.String()
	}
	return []string{
		"--may-exist", "add-port", bridge, name,
		"--", "set", "interface", name, "type=vxlan",
		"options:remote_ip=" + r,
		"options:local_ip=" + local.String(),
		"options:key=" + strconv.Itoa(vni),
		"options:dst_port=" + strconv.Itoa(port),
		"external_ids:wanmotion=l2tunnel",
		"--", "set", "port", name, "protected=true",
	}
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

// OVSListTunnelsArgs lists the names of every VXLAN interface.
func OVSListTunnelsArgs() []string {
	return []string{"--bare", "--columns=name", "find", "interface", "type=vxlan"}
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
	_, _, err = o.run(ctx, OVSAddPortArgs(t.Bridge, t.Name, t.VNI, p.Local, p.Remote, p.Port))
	return err
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
	return net.ParseIP(strings.Trim(strings.TrimSpace(out), `"`)), nil
}

func (o *ovsPlane) remove(ctx context.Context, t tunnel) error {
	_, _, err := o.run(ctx, OVSDelPortArgs(t.Name))
	return err
}

func (o *ovsPlane) sweep(ctx context.Context, prefix string) ([]string, error) {
	out, _, err := o.run(ctx, OVSListTunnelsArgs())
	if err != nil {
		return nil, err
	}
	var gone []string
	var errs []error
	for _, n := range strings.Fields(out) {
		if !strings.HasPrefix(n, prefix) {
			continue
		}
		if _, _, err := o.run(ctx, OVSDelPortArgs(n)); err != nil {
			errs = append(errs, err)
			continue
		}
		gone = append(gone, n)
	}
	return gone, errors.Join(errs...)
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
