// Package host finds, launches and talks to wanmotion backends.
//
// Backends are executables named wanmotion-<kind>-<name> (kind storage or
// network) in the install directory (default /opt/wanmotion/plugins,
// overridden by a --dir flag or $WANMOTION_PLUGIN_DIR) or next to the
// running wanmotion binary. Launch starts one as a go-plugin subprocess
// over net/rpc, checks its SHA-256, negotiates the wire protocol version
// (go-plugin handshake) and the API version (Info, then Configure), and
// returns an Instance whose Storage or Network is the contract interface.
//
// Reattach versus SecureConfig: go-plugin makes Reattach exclusive with
// SecureConfig. wanmotion chooses SecureConfig (the binary's SHA-256 is
// checked at every launch) plus AutoMTLS on the local socket, and does not
// reattach to backends after a restart of the agent. Backends are
// stateless across launches except for contract.Handle.State, which the
// engine checkpoints; after a restart the agent launches a fresh process
// and calls Recover with that state. A backend dies with its agent:
// clients are Managed (call CleanupAll on exit) and, on Linux, a backend
// gets SIGTERM when the agent dies, even by SIGKILL.
//
// The environment of a backend is not the agent's: SkipHostEnv is set and
// only PATH (plus Options.Env) is passed, so credentials in the agent's
// environment (WANMOTION_*_PASSWORD, sessions) never reach backends.
// Backend stderr (hclog JSON) is relayed into Options.Logger under the
// binary's name.
package host

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/go-plugin"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// DefaultStartTimeout bounds the handshake of a launching backend.
const DefaultStartTimeout = 15 * time.Second

// DefaultPath is the PATH given to backends when the agent has none.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Options tune Launch. The zero value is usable.
type Options struct {
	Logger       hclog.Logger
	StartTimeout time.Duration
	// Env is added to the backend's environment (after PATH). Never put
	// credentials here: pass them in requests.
	Env []string
	// ProtocolVersions are the wire versions offered (default
	// contract.AcceptedProtocolVersions).
	ProtocolVersions []int
	// APIVersions are the API versions offered (default contract.HostAPIVersions).
	APIVersions []string
	// Config is the backend's msgpack config passed to Configure.
	Config []byte
	// StateDir is passed to Configure.
	StateDir string
	// SkipConfigure stops after Info (used by `plugins list`).
	SkipConfigure bool
}

// Instance is a running backend.
type Instance struct {
	Binary          Binary
	Info            contract.Info
	APIVersion      string // negotiated ("" with SkipConfigure)
	ProtocolVersion int    // negotiated wire version
	Warnings        []string

	client  *plugin.Client
	storage contract.Storage
	network contract.Network
}

// Storage returns the storage interface (nil for a network backend).
func (i *Instance) Storage() contract.Storage { return i.storage }

// Network returns the network interface (nil for a storage backend).
func (i *Instance) Network() contract.Network { return i.network }

// Exited reports whether the backend process has exited.
func (i *Instance) Exited() bool { return i.client.Exited() }

// Pid is the backend's process id (0 if unknown).
func (i *Instance) Pid() int {
	if rc := i.client.ReattachConfig(); rc != nil {
		return rc.Pid
	}
	return 0
}

// Close stops the backend (gracefully, then by force). Idempotent.
func (i *Instance) Close() { i.client.Kill() }

// CleanupAll kills every backend launched by this process.
func CleanupAll() { plugin.CleanupClients() }

// Launch starts bin, negotiates and configures it.
func Launch(ctx context.Context, bin Binary, opts Options) (*Instance, error) {
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	if opts.StartTimeout <= 0 {
		opts.StartTimeout = DefaultStartTimeout
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("launch %s: %w (%w)", bin.ID(), contract.ErrCancelled, err)
	}
	// go-plugin's start cannot be interrupted: let a shorter ctx deadline
	// shorten the start timeout instead.
	if dl, ok := ctx.Deadline(); ok {
		if d := time.Until(dl); d < opts.StartTimeout {
			opts.StartTimeout = max(d, time.Millisecond)
		}
	}
	if opts.ProtocolVersions == nil {
		opts.ProtocolVersions = contract.AcceptedProtocolVersions
	}
	if opts.APIVersions == nil {
		opts.APIVersions = contract.HostAPIVersions
	}
	sum, err := hex.DecodeString(bin.SHA256)
	if err != nil || len(sum) != sha256.Size {
		return nil, fmt.Errorf("%s: no valid sha256 for %s: %w", bin.ID(), bin.Path, ErrChecksum)
	}

	cmd := exec.Command(bin.Path, bin.Args...)
	path := os.Getenv("PATH")
	if path == "" {
		path = DefaultPath
	}
	cmd.Env = append([]string{"PATH=" + path}, opts.Env...)
	setProcAttr(cmd)

	log := opts.Logger.Named("plugin")
	client := plugin.NewClient(&plugin.ClientConfig{
		HandshakeConfig:  contract.Handshake,
		VersionedPlugins: contract.HostPluginSets(opts.ProtocolVersions),
		Cmd:              cmd,
		SecureConfig:     &plugin.SecureConfig{Checksum: sum, Hash: sha256.New()},
		AllowedProtocols: []plugin.Protocol{plugin.ProtocolNetRPC},
		AutoMTLS:         true,
		Managed:          true,
		SkipHostEnv:      true,
		StartTimeout:     opts.StartTimeout,
		Logger:           log,
	})
	inst := &Instance{Binary: bin, client: client}
	ok := false
	defer func() {
		if !ok {
			client.Kill()
		}
	}()

	rpcClient, err := client.Client()
	if err != nil {
		return nil, fmt.Errorf("launch %s (%s): %w", bin.ID(), bin.Path, classifyStart(err))
	}
	inst.ProtocolVersion = client.NegotiatedVersion()
	raw, err := rpcClient.Dispense(string(bin.Kind))
	if err != nil {
		return nil, fmt.Errorf("launch %s: dispense %s: %v: %w", bin.ID(), bin.Kind, err, ErrHandshake)
	}
	var info contract.Info
	switch bin.Kind {
	case contract.KindStorage:
		inst.storage = raw.(contract.Storage)
		info, err = inst.storage.Info(ctx)
	case contract.KindNetwork:
		inst.network = raw.(contract.Network)
		info, err = inst.network.Info(ctx)
	default:
		return nil, fmt.Errorf("launch %s: kind %q: %w", bin.ID(), bin.Kind, contract.ErrInvalidArgument)
	}
	if err != nil {
		if errors.Is(err, contract.ErrUnsupported) {
			// The binary answered, but not as a backend of this kind.
			return nil, fmt.Errorf("launch %s: %w: %w", bin.ID(), ErrHandshake, err)
		}
		return nil, fmt.Errorf("launch %s: %w", bin.ID(), err)
	}
	if info.Kind != bin.Kind || info.Name != bin.Name {
		return nil, fmt.Errorf("launch %s: backend says it is %s/%s: %w", bin.ID(), info.Kind, info.Name, ErrHandshake)
	}
	inst.Info = info
	if !opts.SkipConfigure {
		v, err := contract.SelectAPIVersion(opts.APIVersions, info.APIVersions)
		if err != nil {
			return nil, fmt.Errorf("launch %s: %w", bin.ID(), err)
		}
		inst.APIVersion = v
		req := contract.ConfigureRequest{APIVersion: v, Config: opts.Config, StateDir: opts.StateDir}
		var resp contract.ConfigureResponse
		if inst.storage != nil {
			resp, err = inst.storage.Configure(ctx, req)
		} else {
			resp, err = inst.network.Configure(ctx, req)
		}
		if err != nil {
			return nil, fmt.Errorf("launch %s: %w", bin.ID(), err)
		}
		inst.Warnings = resp.Warnings
		for _, w := range resp.Warnings {
			log.Warn("backend configuration warning", "backend", bin.ID(), "warning", w)
		}
	}
	log.Debug("backend launched", "backend", bin.ID(), "version", info.Version,
		"protocol_version", inst.ProtocolVersion, "api_version", inst.APIVersion, "pid", inst.Pid())
	ok = true
	return inst, nil
}

func classifyStart(err error) error {
	msg := err.Error()
	switch {
	case errors.Is(err, plugin.ErrChecksumsDoNotMatch):
		return fmt.Errorf("%w: %v", ErrChecksum, err)
	case strings.Contains(msg, "timeout while waiting for plugin to start"):
		return fmt.Errorf("%w: %v", ErrStartTimeout, err)
	case strings.Contains(msg, "plugin exited before we could connect"):
		return fmt.Errorf("%w before the handshake (wrong protocol version, not a wanmotion backend, or it crashed; see its log): %w", contract.ErrPluginExited, err)
	case strings.Contains(msg, "Failed to read any lines from plugin's stdout"):
		return fmt.Errorf("%w before completing the %w (it crashed, or is not a wanmotion backend; see its log): %v", contract.ErrPluginExited, ErrHandshake, err)
	case strings.Contains(msg, "incompatible"), strings.Contains(msg, "Unrecognized remote plugin message"),
		strings.Contains(msg, "unsupported plugin protocol"):
		return fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	return err
}

// Host bundles discovery and launch for one set of search directories.
type Host struct {
	Dirs    []string
	Options Options
}

// New returns a Host searching dirs (SearchDirs("") if nil).
func New(dirs []string, opts Options) *Host {
	if dirs == nil {
		dirs = SearchDirs("")
	}
	return &Host{Dirs: dirs, Options: opts}
}

// Find resolves (kind, name) in the host's directories.
func (h *Host) Find(kind contract.Kind, name string) (Binary, error) {
	bins, err := Discover(h.Dirs)
	if err != nil {
		return Binary{}, err
	}
	return Resolve(bins, kind, name)
}

// LaunchStorage finds and launches a storage backend with config and stateDir.
func (h *Host) LaunchStorage(ctx context.Context, name string, config []byte, stateDir string) (*Instance, error) {
	return h.launch(ctx, contract.KindStorage, name, config, stateDir)
}

// LaunchNetwork finds and launches a network backend with config and stateDir.
func (h *Host) LaunchNetwork(ctx context.Context, name string, config []byte, stateDir string) (*Instance, error) {
	return h.launch(ctx, contract.KindNetwork, name, config, stateDir)
}

func (h *Host) launch(ctx context.Context, kind contract.Kind, name string, config []byte, stateDir string) (*Instance, error) {
	bin, err := h.Find(kind, name)
	if err != nil {
		return nil, err
	}
	opts := h.Options
	opts.Config, opts.StateDir = config, stateDir
	return Launch(ctx, bin, opts)
}
