// Package hostplugin is what the wanmotion binary needs when xapi runs it
// on a host (as the host plugin /etc/xapi.d/plugins/wanmotion or as a
// xenopsd hook): finding the host's etc, inventory, xapi and its own
// configuration from nothing but argv[0] (xapi gives plugins only PATH),
// and PluginLauncher, which starts site agents on other hosts through
// host.call_plugin.
package hostplugin

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/xapi"
)

// PluginName is the plugin's file name in /etc/xapi.d/plugins.
const PluginName = "wanmotion"

// Inventory keys.
const (
	InvHostUUID = "INSTALLATION_UUID"
	// Simulator-only keys (docs/simulator.md).
	InvSim       = "WANMOTION_SIM"
	InvSimSocket = "WANMOTION_SIM_XAPI_SOCKET"
	InvSimURL    = "WANMOTION_SIM_XAPI_URL"
	InvSimPool   = "WANMOTION_SIM_POOL_URL"
)

// ErrNoXapi: neither the simulator's keys nor the local socket give a way
// to reach xapi.
var ErrNoXapi = errors.New("no way to reach xapi")

// Env is where a plugin or hook process runs.
type Env struct {
	// EtcDir is the host's /etc: three directories above argv[0]
	// (<etc>/xapi.d/plugins/wanmotion, <etc>/xapi.d/<hook>/<script>).
	EtcDir string
	// Inventory is <etc>/xensource-inventory (empty when missing).
	Inventory map[string]string
	// Sim is true on the simulator.
	Sim bool
	// Socket is xapi's local socket (xapi.LocalSocket on a real host).
	Socket string
	// HostURL and PoolURL are the simulator's HTTP URLs of this host and of
	// its pool coordinator ("" on a real host).
	HostURL, PoolURL string
	// HostUUID is this host's uuid (inventory INSTALLATION_UUID).
	HostUUID string
}

// EtcFromScript returns the etc directory of an executable installed as
// <etc>/xapi.d/<dir>/<name>: path is used as given (not resolved), so a
// symlink in a simulated host's etc names that host.
func EtcFromScript(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		abs = path
	}
	return filepath.Dir(filepath.Dir(filepath.Dir(abs)))
}

// Discover reads the environment of a process installed at scriptPath
// (argv[0] for the plugin; the hook script's $0 for hooks).
func Discover(scriptPath string) (Env, error) {
	e := Env{EtcDir: EtcFromScript(scriptPath)}
	inv, err := ReadInventory(filepath.Join(e.EtcDir, "xensource-inventory"))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return e, err
	}
	if inv == nil {
		inv = map[string]string{}
	}
	e.Inventory = inv
	e.HostUUID = inv[InvHostUUID]
	if inv[InvSim] == "true" {
		e.Sim = true
		e.Socket = inv[InvSimSocket]
		e.HostURL = inv[InvSimURL]
		e.PoolURL = inv[InvSimPool]
		return e, nil
	}
	e.Socket = xapi.LocalSocket
	return e, nil
}

// ReadInventory parses a xensource-inventory file (KEY='value' lines).
func ReadInventory(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	defer f.Close()
	out := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		if len(v) >= 2 && (v[0] == '\'' || v[0] == '"') && v[len(v)-1] == v[0] {
			v = v[1 : len(v)-1]
		}
		out[strings.TrimSpace(k)] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("inventory: %w", err)
	}
	return out, nil
}

// Client returns a client for this host's pool that uses session (the
// caller's session, borrowed: call Forget before Close). On the simulator it
// talks to the coordinator's URL (or the host's socket); on a host, to the
// local socket (xapi forwards to the coordinator).
func (e Env) Client(session string, log hclog.Logger) (*xapi.Client, error) {
	c, err := e.newClient(log)
	if err != nil {
		return nil, err
	}
	c.UseSession(xapi.SessionRef(session))
	return c, nil
}

func (e Env) newClient(log hclog.Logger) (*xapi.Client, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	switch {
	case e.Sim && e.PoolURL != "":
		return xapi.New(xapi.Config{URL: e.PoolURL, Logger: log, DisableMemberDiscovery: true})
	case e.Sim && e.HostURL != "":
		return xapi.New(xapi.Config{URL: e.HostURL, Logger: log, DisableMemberDiscovery: true})
	case e.Socket != "":
		return xapi.NewLocal(e.Socket, xapi.Config{Logger: log})
	}
	return nil, ErrNoXapi
}

// LocalLogin opens a session of this process's own for this host's pool
// (hooks get no session; a detached controller should not depend on its
// caller's). On a host it logs in as root over the local socket, where xapi
// accepts the local superuser (password normally empty; xapi forwards to
// the coordinator). On the simulator it logs in to the coordinator's URL
// with password (the simulator has no local superuser).
func (e Env) LocalLogin(ctx context.Context, password string, log hclog.Logger) (*xapi.Client, error) {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	var c *xapi.Client
	var err error
	switch {
	case e.Sim && e.PoolURL != "":
		c, err = xapi.New(xapi.Config{URL: e.PoolURL, Username: "root", Password: password, Logger: log, DisableMemberDiscovery: true})
	case !e.Sim && e.Socket != "":
		c, err = xapi.NewLocal(e.Socket, xapi.Config{Username: "root", Password: password, Logger: log})
	default:
		return nil, fmt.Errorf("local login: %w", ErrNoXapi)
	}
	if err != nil {
		return nil, err
	}
	if err := c.Login(ctx); err != nil {
		return nil, fmt.Errorf("local login: %w", err)
	}
	return c, nil
}
