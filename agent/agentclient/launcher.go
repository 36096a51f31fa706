package agentclient

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/wanmotion/wanmotion/agent"
	"github.com/wanmotion/wanmotion/plugins/contract"
)

// AgentLaunchSpec is everything needed to start one site agent.
type AgentLaunchSpec struct {
	MigrationID string
	Role        contract.Role
	// Host is the xapi host ref the agent must run on (engine.AgentSpec
	// SourceHost / DestHost); LocalLauncher ignores it.
	Host string
	// TLS is the agent's material (PEM); the launcher puts it into the
	// agent's --tls-dir (0700 directory, 0600 files).
	TLS agent.Material
	// ControlListen is the agent's --control-listen. When it is not a
	// loopback address the launcher must return an address the controller
	// can reach (e.g. the host's management address with the port).
	ControlListen string
	// PluginDir and StateDir are the agent's --plugin-dir and --state-dir
	// ("" = the agent's defaults; LocalLauncher picks a state dir of its own).
	PluginDir string
	StateDir  string
	// IdleTimeout is the agent's --idle-timeout (0 = the agent's default).
	IdleTimeout time.Duration
}

// Args returns the `wanmotion agent` arguments for the spec with its TLS
// material in tlsDir.
func (s AgentLaunchSpec) Args(tlsDir string) []string {
	args := []string{"--migration-id", s.MigrationID, "--role", string(s.Role), "--tls-dir", tlsDir}
	if s.ControlListen != "" {
		args = append(args, "--control-listen", s.ControlListen)
	}
	if s.PluginDir != "" {
		args = append(args, "--plugin-dir", s.PluginDir)
	}
	if s.StateDir != "" {
		args = append(args, "--state-dir", s.StateDir)
	}
	if s.IdleTimeout > 0 {
		args = append(args, "--idle-timeout", s.IdleTimeout.String())
	}
	return args
}

// Launcher starts and stops site agents. The client stops agents with the
// Stop RPC and then calls Launcher.Stop, which must also end an agent
// that did not answer, and releases what the launcher keeps for it (e.g.
// the TLS files). Launcher.Stop is also called before re-launching an
// agent that does not answer.
type Launcher interface {
	// Launch starts the agent and returns its control address ("host:port")
	// once it listens (the first stdout line of `wanmotion agent`).
	Launch(ctx context.Context, spec AgentLaunchSpec) (controlAddr string, err error)
	// Stop ends the agent of spec.MigrationID and spec.Role if it still
	// runs; nil if there is none.
	Stop(ctx context.Context, spec AgentLaunchSpec) error
}

// LocalLauncher runs agents on this machine as detached processes (own
// session, surviving the controller) of the wanmotion binary.
type LocalLauncher struct {
	// Binary is the wanmotion executable (default: os.Executable()).
	Binary string
	// Args go before "agent" (e.g. a re-exec marker in tests).
	Args []string
	// Dir holds one directory per agent, <Dir>/<migration>-<role>, with
	// tls/, state/ (when the spec names no state dir), agent.log and agent.pid.
	Dir string
	// Env is the agents' environment (default: this process's, without
	// WANMOTION_* variables other than WANMOTION_PLUGIN_DIR and without
	// anything named *PASSWORD*: agents never need credentials from
	// their environment).
	Env []string
	// StartTimeout bounds the wait for the first stdout line (default 30s).
	StartTimeout time.Duration
}

var _ Launcher = (*LocalLauncher)(nil)

func (l *LocalLauncher) dir(spec AgentLaunchSpec) string {
	return filepath.Join(l.Dir, spec.MigrationID+"-"+string(spec.Role))
}

// Launch implements Launcher.
func (l *LocalLauncher) Launch(ctx context.Context, spec AgentLaunchSpec) (string, error) {
	if l.Dir == "" {
		return "", fmt.Errorf("local launcher: Dir required: %w", contract.ErrInvalidArgument)
	}
	bin := l.Binary
	if bin == "" {
		exe, err := os.Executable()
		if err != nil {
			return "", fmt.Errorf("local launcher: %w", err)
		}
		bin = exe
	}
	dir := l.dir(spec)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("local launcher: %w", err)
	}
	tlsDir := filepath.Join(dir, "tls")
	if err := spec.TLS.WriteDir(tlsDir); err != nil {
		return "", err
	}
	if spec.StateDir == "" {
		spec.StateDir = filepath.Join(dir, "state")
	}
	logf, err := os.OpenFile(filepath.Join(dir, "agent.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return "", fmt.Errorf("local launcher: %w", err)
	}
	defer logf.Close()
	args := append(append(append([]string(nil), l.Args...), "agent"), spec.Args(tlsDir)...)
	cmd := exec.Command(bin, args...)
	cmd.Env = l.Env
	if cmd.Env == nil {
		cmd.Env = agentEnv(os.Environ())
	}
	cmd.Stderr = logf
	cmd.SysProcAttr = detached()
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", fmt.Errorf("local launcher: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return "", fmt.Errorf("local launcher: start %s: %w", bin, err)
	}
	exited := make(chan error, 1)
	lines := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(out).ReadString('\n')
		lines <- line
		exited <- cmd.Wait() // reap; it returns when the agent exits
	}()
	timeout := l.StartTimeout
	if timeout <= 0 {
		timeout = 30 * time.Second
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	var line string
	select {
	case line = <-lines:
	case <-t.C:
		_ = cmd.Process.Kill()
		return "", fmt.Errorf("local launcher: agent gave no control address within %v (see %s): %w", timeout, logf.Name(), contract.ErrUnavailable)
	case <-ctx.Done():
		_ = cmd.Process.Kill()
		return "", fmt.Errorf("local launcher: %w (%w)", contract.ErrCancelled, ctx.Err())
	}
	var hl agent.HelloLine
	if err := json.Unmarshal([]byte(strings.TrimSpace(line)), &hl); err != nil || hl.Control == "" {
		_ = cmd.Process.Kill()
		werr := <-exited
		return "", fmt.Errorf("local launcher: agent exited (%v) without a control address (see %s): %w", werr, logf.Name(), contract.ErrUnavailable)
	}
	pid := cmd.Process.Pid
	if err := os.WriteFile(filepath.Join(dir, "agent.pid"), []byte(strconv.Itoa(pid)+"\n"), 0o600); err != nil {
		_ = cmd.Process.Kill()
		return "", fmt.Errorf("local launcher: %w", err)
	}
	return hl.Control, nil
}

// Stop implements Launcher: SIGTERM, then SIGKILL after 5 s, for the pid
// recorded at launch (only if that process is still a wanmotion agent of
// the migration); the agent's TLS files are removed.
func (l *LocalLauncher) Stop(ctx context.Context, spec AgentLaunchSpec) error {
	defer os.RemoveAll(filepath.Join(l.dir(spec), "tls"))
	pidFile := filepath.Join(l.dir(spec), "agent.pid")
	b, err := os.ReadFile(pidFile)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("local launcher: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		_ = os.Remove(pidFile)
		return nil
	}
	defer os.Remove(pidFile)
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), spec.MigrationID) {
		return nil // gone, or the pid was reused
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		if !alive(pid) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	return nil
}

// alive reports whether pid runs (a zombie counts as gone).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// state is the field after the parenthesised command name
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z'
	}
	return true
}

func detached() *syscall.SysProcAttr { return &syscall.SysProcAttr{Setsid: true} }

// agentEnv filters credentials out of the controller's environment.
func agentEnv(env []string) []string {
	out := make([]string, 0, len(env))
	for _, kv := range env {
		name, _, _ := strings.Cut(kv, "=")
		upper := strings.ToUpper(name)
		if strings.Contains(upper, "PASSWORD") || (strings.HasPrefix(upper, "WANMOTION_") && upper != "WANMOTION_PLUGIN_DIR") {
			continue
		}
		out = append(out, kv)
	}
	return out
}
