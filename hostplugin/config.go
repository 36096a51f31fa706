package hostplugin

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/wanmotion/wanmotion/plugins/host"
)

// Defaults of the host configuration.
const (
	DefaultConfigPath = "/etc/wanmotion/wanmotion.conf"
	DefaultStateDir   = "/var/lib/wanmotion"
	ConfigFileName    = "wanmotion.conf"
	// DefaultTaskLinger is how long a finished migration's xapi task stays
	// before the plugin's controller destroys it (task_linger).
	DefaultTaskLinger = 30 * time.Second
)

// ErrConfig is wrapped by configuration file errors.
var ErrConfig = errors.New("wanmotion.conf")

// Config is the host configuration (wanmotion.conf): `key = value` lines,
// '#' comments. Unknown keys are errors (a typo must not be ignored).
type Config struct {
	// Path is the file read ("" when none was found: all defaults).
	Path string
	// StateDir holds migrations started through the plugin (checkpoints,
	// controller logs) and the agents it starts (state_dir).
	StateDir string
	// PluginDir is the backend install directory (plugin_dir).
	PluginDir string
	// LogLevel of the detached controller and agents (log_level).
	LogLevel string
	// AgentListen is the control listen address of agents started through
	// agent-start when the caller names none (agent_listen).
	AgentListen string
	// LocalPasswordFile holds the password of the local root login used by
	// hooks and detached controllers (local_password_file). Unset on a
	// host: xapi lets root in over the local socket with an empty
	// password. The simulator needs its pools' password here.
	LocalPasswordFile string
	// TaskLinger is how long the detached controller keeps a finished
	// migration's task (its final status, result and error_info readable
	// by task.get_record and event.from) before it destroys it, so that
	// XenCenter shows the migration complete (task_linger: a duration,
	// default 30s; "never" leaves the task to xapi's task GC, negative here).
	TaskLinger time.Duration
}

// LocalPassword reads LocalPasswordFile ("" when unset). The file must not
// be readable by group or others.
func (c Config) LocalPassword() (string, error) {
	if c.LocalPasswordFile == "" {
		return "", nil
	}
	fi, err := os.Stat(c.LocalPasswordFile)
	if err != nil {
		return "", fmt.Errorf("%w: local_password_file: %w", ErrConfig, err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return "", fmt.Errorf("%w: local_password_file %s has mode %04o; run: chmod 600 %s", ErrConfig, c.LocalPasswordFile, fi.Mode().Perm(), c.LocalPasswordFile)
	}
	b, err := os.ReadFile(c.LocalPasswordFile)
	if err != nil {
		return "", fmt.Errorf("%w: local_password_file: %w", ErrConfig, err)
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// ConfigCandidates are the files tried, in order: <etc>/wanmotion/
// wanmotion.conf (etc of the plugin or hook; /etc on a host), then
// wanmotion.conf next to the binary.
func ConfigCandidates(etcDir, binary string) []string {
	var out []string
	if etcDir != "" {
		out = append(out, filepath.Join(etcDir, "wanmotion", ConfigFileName))
	}
	if binary != "" {
		out = append(out, filepath.Join(filepath.Dir(binary), ConfigFileName))
	}
	return out
}

// LoadConfig reads the first existing candidate; none is all defaults.
func LoadConfig(candidates []string) (Config, error) {
	for _, p := range candidates {
		c, err := ReadConfig(p)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		return c, err
	}
	return withDefaults(Config{TaskLinger: DefaultTaskLinger}), nil
}

func withDefaults(c Config) Config {
	if c.StateDir == "" {
		c.StateDir = DefaultStateDir
	}
	if c.PluginDir == "" {
		c.PluginDir = host.InstallDir("")
	}
	if c.LogLevel == "" {
		c.LogLevel = "info"
	}
	if c.AgentListen == "" {
		c.AgentListen = "0.0.0.0:0"
	}
	return c
}

// ReadConfig reads one configuration file.
func ReadConfig(path string) (Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return Config{}, err
	}
	defer f.Close()
	c := Config{Path: path, TaskLinger: DefaultTaskLinger}
	sc := bufio.NewScanner(f)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return c, fmt.Errorf("%w: %s line %d: want key = value", ErrConfig, path, n)
		}
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch k {
		case "state_dir":
			c.StateDir = v
		case "plugin_dir":
			c.PluginDir = v
		case "log_level":
			switch strings.ToLower(v) {
			case "", "trace", "debug", "info", "warn", "error":
			default:
				return c, fmt.Errorf("%w: %s line %d: log_level %q: want trace, debug, info, warn or error", ErrConfig, path, n, v)
			}
			c.LogLevel = v
		case "agent_listen":
			if v != "" {
				if _, _, err := net.SplitHostPort(v); err != nil {
					return c, fmt.Errorf("%w: %s line %d: agent_listen %q: want host:port (0.0.0.0:0 for any address and a free port)", ErrConfig, path, n, v)
				}
			}
			c.AgentListen = v
		case "local_password_file":
			c.LocalPasswordFile = v
		case "task_linger":
			switch d, err := time.ParseDuration(v); {
			case strings.EqualFold(v, "never"):
				c.TaskLinger = -1
			case v == "":
				c.TaskLinger = DefaultTaskLinger
			case v == "0":
				c.TaskLinger = 0
			case err != nil || d < 0:
				return c, fmt.Errorf("%w: %s line %d: task_linger %q: want a duration such as 30s (0: destroy at once) or never", ErrConfig, path, n, v)
			default:
				c.TaskLinger = d
			}
		default:
			return c, fmt.Errorf("%w: %s line %d: unknown key %q", ErrConfig, path, n, k)
		}
		if (k == "state_dir" || k == "plugin_dir" || k == "local_password_file") && v != "" && !filepath.IsAbs(v) {
			return c, fmt.Errorf("%w: %s line %d: %s must be an absolute path", ErrConfig, path, n, k)
		}
	}
	if err := sc.Err(); err != nil {
		return c, fmt.Errorf("%w: %s: %v", ErrConfig, path, err)
	}
	return withDefaults(c), nil
}
