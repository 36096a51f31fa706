package agent

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

// ErrUsage marks bad command-line input of Command.
var ErrUsage = errors.New("usage")

// HelloLine is the first (and only) line the agent command prints on stdout.
type HelloLine struct {
	Control string `json:"control"`
	PID     int    `json:"pid"`
}

// DefaultStateRoot is where the agent command keeps backend state when
// --state-dir is not given (one subdirectory per migration).
const DefaultStateRoot = "/var/lib/wanmotion/agent"

// Command is `wanmotion agent`: it runs the site agent of one migration.
// It prints HelloLine as JSON on stdout, closes stdout (a launcher may
// close its end of the pipe), logs to stderr, and returns when the agent
// stops (Stop RPC, idle timeout, or ctx: SIGINT/SIGTERM). Backends are
// cleaned up before it returns.
func Command(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		id        = fs.String("migration-id", "", "migration id (required)")
		role      = fs.String("role", "", "source or destination (required)")
		control   = fs.String("control-listen", "127.0.0.1:0", "control (controller RPC) listen address")
		tlsDir    = fs.String("tls-dir", "", "directory with "+FileCA+", "+FileCert+", "+FileKey+", "+FileGatewayCert+", "+FileGatewayKey+" [, "+FileControllerCA+"] (required)")
		gwListen  = fs.String("gateway-listen", "", "destination: default WAN gateway listen address (default 127.0.0.1:0)")
		fwdHost   = fs.String("forward-host", "127.0.0.1", "source: address the gateway's forward listeners bind")
		pluginDir = fs.String("plugin-dir", "", "backend install directory (default $"+host.EnvPluginDir+" or "+host.DefaultInstallDir+")")
		stateDir  = fs.String("state-dir", "", "backends' state directory (default "+DefaultStateRoot+"/<migration-id>)")
		idle      = fs.Duration("idle-timeout", DefaultIdleTimeout, "stop when the controller has been silent this long")
		logLevel  = fs.String("log-level", "info", "trace, debug, info, warn or error")
		logJSON   = fs.Bool("log-json", false, "log JSON lines")
	)
	if err := fs.Parse(args); err != nil {
		return fmt.Errorf("%w: %w", ErrUsage, err)
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("%w: unexpected arguments %q", ErrUsage, fs.Args())
	}
	if *id == "" || *role == "" || *tlsDir == "" {
		return fmt.Errorf("%w: --migration-id, --role and --tls-dir are required", ErrUsage)
	}
	r := contract.Role(*role)
	if r != contract.RoleSource && r != contract.RoleDestination {
		return fmt.Errorf("%w: --role %q: want source or destination", ErrUsage, *role)
	}
	if strings.ContainsAny(*id, "/\\") || *id == "." || *id == ".." {
		return fmt.Errorf("%w: --migration-id %q must not contain path separators", ErrUsage, *id)
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "wanmotion", Output: stderr, Level: hclog.LevelFromString(*logLevel), JSONFormat: *logJSON})
	m, err := ReadDir(*tlsDir)
	if err != nil {
		return err
	}
	sd := *stateDir
	if sd == "" {
		sd = DefaultStateRoot + "/" + *id
	}
	if err := os.MkdirAll(sd, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	var dirs []string
	if *pluginDir != "" {
		dirs = host.SearchDirs(*pluginDir)
	}
	a, err := New(ctx, Config{
		MigrationID: *id, Role: r, TLS: m, ControlListen: *control, GatewayListen: *gwListen,
		ForwardHost: *fwdHost, PluginDirs: dirs, StateDir: sd, IdleTimeout: *idle, Logger: log,
	})
	if err != nil {
		return err
	}
	defer host.CleanupAll()
	line, _ := json.Marshal(HelloLine{Control: a.Addr(), PID: os.Getpid()}) // cannot fail for this struct
	if _, err := fmt.Fprintf(stdout, "%s\n", line); err != nil {
		a.shutdown()
		<-a.serveAndWait()
		return fmt.Errorf("write hello line: %w", err)
	}
	if f, ok := stdout.(*os.File); ok {
		_ = f.Close() // nothing else goes to stdout; a closed pipe must not kill us later
	}
	log.Info("agent serving", "migration_id", *id, "role", *role, "control", a.Addr(), "idle_timeout", idle.String())
	err = a.Serve(ctx)
	switch {
	case errors.Is(err, ErrIdle), err != nil && errors.Is(err, ctx.Err()):
		return nil
	}
	return err
}

// serveAndWait runs Serve in the background (used to clean up after a
// failure before serving started).
func (a *Agent) serveAndWait() <-chan struct{} {
	go func() { _ = a.Serve(context.Background()) }()
	return a.done
}
