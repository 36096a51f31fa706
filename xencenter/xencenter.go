// Package xencenter is the XenCenter side of wanmotion: what the menu item
// of packaging/xencenter/WanMotion/WanMotion.xcplugin.xml runs. XenCenter
// appends "<coordinator URL> <session> VM <uuid>" per selected VM
// (xenapi-facts §8); Command asks for the destination on the terminal,
// calls host.call_plugin(coordinator, "wanmotion", "migrate", args) with
// XenCenter's live session, prints the task ref (XenCenter shows the task:
// label VM.migrate_send, applies_to the VM) and follows its progress. It
// never logs out XenCenter's session and never prints it.
//
// The package depends only on the xapi client so that it builds for
// Windows, where XenCenter runs (cmd/wanmotion-xencenter); `wanmotion
// xencenter` runs the same code.
package xencenter

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/term"

	"github.com/wanmotion/wanmotion/xapi"
)

// The host plugin and function called.
const (
	PluginName = "wanmotion"
	FnMigrate  = "migrate"
)

// ErrUsage marks bad command-line input.
var ErrUsage = errors.New("usage")

// ErrNoPassword: the password prompt got nothing.
var ErrNoPassword = errors.New("no password")

// Terminal access, replaceable in tests.
var (
	// Stdin is where the prompts read their answers.
	Stdin io.Reader = os.Stdin
	// ReadPassword reads a password without echo.
	ReadPassword = func(prompt string, w io.Writer) (string, error) {
		fmt.Fprint(w, prompt)
		b, err := term.ReadPassword(int(os.Stdin.Fd()))
		fmt.Fprintln(w)
		return string(b), err
	}
)

const usage = `Usage: wanmotion xencenter [--no-wait] [--insecure | --ca-file F | --thumbprint T] <url> <session> VM <uuid> [...]

Run by XenCenter's "WAN migrate to another pool..." menu item, which appends
the pool coordinator URL, XenCenter's session, the class and the VM uuid.
Asks for the destination pool, user, password, SR and network map on the
terminal and starts the migration through the wanmotion host plugin.

Flags:`

type thumbprints []string

func (t *thumbprints) String() string     { return strings.Join(*t, ",") }
func (t *thumbprints) Set(v string) error { *t = append(*t, v); return nil }

// Command is `wanmotion xencenter ARGS` (a leading "xencenter" is
// accepted, so one manifest line serves both binaries).
func Command(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 && args[0] == "xencenter" {
		args = args[1:]
	}
	fs := flag.NewFlagSet("xencenter", flag.ContinueOnError)
	fs.SetOutput(stderr)
	noWait := fs.Bool("no-wait", false, "print the task and exit; do not follow its progress")
	var o xapi.TLSOptions
	var tps thumbprints
	fs.BoolVar(&o.Insecure, "insecure", false, "do not verify the pools' TLS certificates (labs only)")
	fs.StringVar(&o.CAFile, "ca-file", "", "PEM file of CA or host certificates to trust")
	fs.Var(&tps, "thumbprint", "pin the coordinator's certificate by SHA-256 thumbprint (repeatable)")
	fs.Usage = func() { fmt.Fprintln(stderr, usage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %v", ErrUsage, err)
	}
	o.Thumbprints = tps
	if o.Insecure && (o.CAFile != "" || len(tps) > 0) {
		return fmt.Errorf("%w: --insecure cannot be combined with --ca-file or --thumbprint", ErrUsage)
	}
	rest := fs.Args()
	if len(rest) < 4 || len(rest)%4 != 0 {
		return fmt.Errorf("%w: want <url> <session> VM <uuid> (XenCenter appends them)", ErrUsage)
	}
	in := bufio.NewReader(Stdin)
	log := hclog.New(&hclog.LoggerOptions{Name: "wanmotion", Level: hclog.Warn, Output: stderr})
	for i := 0; i < len(rest); i += 4 {
		poolURL, session, class, uuid := rest[i], rest[i+1], rest[i+2], rest[i+3]
		if class != "VM" || uuid == "" || uuid == "null" || uuid == "blank" {
			return fmt.Errorf("%w: select a VM (got %s %s)", ErrUsage, class, uuid)
		}
		if !strings.HasPrefix(session, "OpaqueRef:") {
			return fmt.Errorf("%w: the second argument is not a session ref", ErrUsage)
		}
		r := run{in: in, stdout: stdout, stderr: stderr, tls: o, log: log}
		if err := r.migrate(ctx, poolURL, session, uuid, *noWait); err != nil {
			return err
		}
	}
	return nil
}

type run struct {
	in             *bufio.Reader
	stdout, stderr io.Writer
	tls            xapi.TLSOptions
	log            hclog.Logger
}

func (r run) prompt(question, def string) (string, error) {
	if def != "" {
		fmt.Fprintf(r.stderr, "%s [%s]: ", question, def)
	} else {
		fmt.Fprintf(r.stderr, "%s: ", question)
	}
	line, err := r.in.ReadString('\n')
	if err != nil && (!errors.Is(err, io.EOF) || line == "") {
		return "", fmt.Errorf("read answer: %w", err)
	}
	if line = strings.TrimSpace(line); line == "" {
		return def, nil
	}
	return line, nil
}

// trust connects to an https URL once without verification, shows the
// certificate's SHA-256 thumbprint and returns it if the user accepts it
// (what XenCenter itself does for a new server). "" for other schemes.
func (r run) trust(ctx context.Context, raw, what string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" {
		return "", nil
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "443")
	}
	d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // only reads the certificate to show its thumbprint
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return "", fmt.Errorf("connect to the %s: %w", what, err)
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("the %s sent no certificate", what)
	}
	tp := xapi.Thumbprint(certs[0].Raw)
	fmt.Fprintf(r.stderr, "The %s (%s) presents a certificate with SHA-256 thumbprint\n  %s\n", what, u.Host, tp)
	ans, err := r.prompt("Trust it? (yes/no)", "no")
	if err != nil {
		return "", err
	}
	if a := strings.ToLower(ans); a != "yes" && a != "y" {
		return "", fmt.Errorf("the certificate of the %s is not trusted", what)
	}
	return tp, nil
}

// client uses XenCenter's session on its coordinator (borrowed: callers
// Forget it, it is never logged out).
func (r run) client(ctx context.Context, poolURL, session string) (*xapi.Client, error) {
	mk := func(opts xapi.TLSOptions) (*xapi.Client, error) {
		c, err := xapi.New(xapi.Config{URL: poolURL, TLS: opts, Logger: r.log, DisableMemberDiscovery: true})
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrUsage, err)
		}
		c.UseSession(xapi.SessionRef(session))
		return c, nil
	}
	c, err := mk(r.tls)
	if err != nil {
		return nil, err
	}
	if _, err = c.PoolGetAll(ctx); err == nil {
		return c, nil
	}
	c.Forget()
	var te *xapi.TransportError
	if !errors.As(err, &te) || r.tls.Insecure || len(r.tls.Thumbprints) > 0 || r.tls.CAFile != "" || !strings.HasPrefix(poolURL, "https:") {
		return nil, fmt.Errorf("this pool (%s): %w", poolURL, err)
	}
	tp, terr := r.trust(ctx, poolURL, "pool coordinator")
	if terr != nil || tp == "" {
		return nil, fmt.Errorf("this pool (%s): %w", poolURL, errors.Join(err, terr))
	}
	if c, err = mk(xapi.TLSOptions{Thumbprints: []string{tp}}); err != nil {
		return nil, err
	}
	if _, err := c.PoolGetAll(ctx); err != nil {
		c.Forget()
		return nil, fmt.Errorf("this pool (%s): %w", poolURL, err)
	}
	return c, nil
}

func (r run) migrate(ctx context.Context, poolURL, session, vmUUID string, noWait bool) error {
	c, err := r.client(ctx, poolURL, session)
	if err != nil {
		return err
	}
	defer func() { c.Forget(); _ = c.Close(context.WithoutCancel(ctx)) }() // XenCenter's session: never logged out
	vm, err := c.VMGetByUUID(ctx, vmUUID)
	if err != nil {
		return fmt.Errorf("VM %s: %w", vmUUID, err)
	}
	rec, err := c.VMGetRecord(ctx, vm)
	if err != nil {
		return fmt.Errorf("VM %s: %w", vmUUID, err)
	}
	fmt.Fprintf(r.stderr, "WAN migration of VM %q (%s)\n", rec.NameLabel, vmUUID)
	args := map[string]string{"vm": vmUUID}
	if args["dest_url"], err = r.prompt("Destination pool coordinator URL (https://host)", ""); err != nil {
		return err
	}
	if args["dest_url"] == "" {
		return fmt.Errorf("%w: no destination pool", ErrUsage)
	}
	if args["dest_user"], err = r.prompt("Destination user", "root"); err != nil {
		return err
	}
	pw, err := ReadPassword(fmt.Sprintf("Password for %s at %s: ", args["dest_user"], args["dest_url"]), r.stderr)
	if err != nil {
		return fmt.Errorf("read password: %w", err)
	}
	if pw == "" {
		return fmt.Errorf("%w for %s", ErrNoPassword, args["dest_url"])
	}
	args["dest_password"] = pw
	tp, err := r.trust(ctx, args["dest_url"], "destination pool")
	if err != nil {
		return err
	}
	if tp != "" {
		args["dest_thumbprint"] = tp
	}
	for _, q := range []struct{ key, question string }{
		{"dest_sr", "Destination SR, name or UUID (empty: the pool's default SR)"},
		{"network_map", "Network map SRC=DST[,SRC=DST...] (empty: networks of the same name)"},
	} {
		v, err := r.prompt(q.question, "")
		if err != nil {
			return err
		}
		if v != "" {
			args[q.key] = v
		}
	}
	pool, err := c.ThePool(ctx)
	if err != nil {
		return err
	}
	coord, err := c.PoolGetMaster(ctx, pool)
	if err != nil {
		return fmt.Errorf("pool.get_master: %w", err)
	}
	task, err := c.HostCallPlugin(ctx, coord, PluginName, FnMigrate, args)
	if err != nil {
		if ae, ok := xapi.AsAPIError(err); ok && ae.Code == "XENAPI_MISSING_PLUGIN" {
			return fmt.Errorf("wanmotion is not installed on the pool coordinator (see the operator guide): %w", err)
		}
		return fmt.Errorf("start the migration: %w", err)
	}
	fmt.Fprintln(r.stdout, task)
	fmt.Fprintf(r.stderr, "Started. XenCenter shows the task \"Migrating %s\"; cancel it there.\n", rec.NameLabel)
	if noWait {
		return nil
	}
	return follow(ctx, c, coord, xapi.TaskRef(task), r.stderr)
}

// follow prints the task's progress until it ends (an interrupt stops
// watching, not the migration). The plugin's controller destroys the
// finished task after its task_linger; if this window missed the end, the
// plugin's status (on the coordinator) says how the task ended.
func follow(ctx context.Context, c *xapi.Client, coord xapi.HostRef, task xapi.TaskRef, w io.Writer) error {
	last := -1
	for {
		rec, err := c.TaskGetRecord(ctx, task)
		if ctx.Err() != nil {
			fmt.Fprintln(w, "stopped watching; the migration goes on (XenCenter shows it)")
			return nil
		}
		if xapi.IsCode(err, xapi.CodeHandleInvalid) {
			rec, err = goneTask(ctx, c, coord, task)
		}
		if err != nil {
			return fmt.Errorf("task: %w", err)
		}
		if p := int(rec.Progress * 100); p != last {
			fmt.Fprintf(w, "progress %d%%\n", p)
			last = p
		}
		switch rec.Status {
		case xapi.TaskStatusSuccess:
			fmt.Fprintln(w, "migration finished")
			return nil
		case xapi.TaskStatusFailure, xapi.TaskStatusCancelled:
			return fmt.Errorf("migration %s: %s", rec.Status, strings.Join(rec.ErrorInfo, " "))
		}
		select {
		case <-ctx.Done():
		case <-time.After(2 * time.Second):
		}
	}
}

// goneTask is the end of a destroyed task as the plugin's status reports
// it (from the migration's checkpoint).
func goneTask(ctx context.Context, c *xapi.Client, coord xapi.HostRef, task xapi.TaskRef) (xapi.TaskRecord, error) {
	out, err := c.HostCallPlugin(ctx, coord, PluginName, "status", map[string]string{"task": string(task)})
	if err != nil {
		return xapi.TaskRecord{}, fmt.Errorf("the task is gone and the plugin's status failed: %w", err)
	}
	var st struct {
		Status    string   `json:"status"`
		Progress  float64  `json:"progress"`
		ErrorInfo []string `json:"error_info"`
		Result    string   `json:"result"`
	}
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		return xapi.TaskRecord{}, fmt.Errorf("the plugin's status: %w", err)
	}
	return xapi.TaskRecord{Status: xapi.TaskStatus(st.Status), Progress: st.Progress, ErrorInfo: st.ErrorInfo, Result: st.Result}, nil
}
