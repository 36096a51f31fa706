package main

// `wanmotion xencenter <url> <session> VM <uuid> [...]`: the XenCenter menu
// item (packaging/xencenter/WanMotion/WanMotion.xcplugin.xml). XenCenter
// appends the coordinator URL, its live session, the class and the uuid of
// each selected object. The command asks for the destination on the
// terminal, calls host.call_plugin(coordinator, "wanmotion", "migrate",
// ...) with XenCenter's session and prints the task, which XenCenter shows
// (label VM.migrate_send, applies_to the VM). It never logs out the session.

import (
	"bufio"
	"context"
	"crypto/tls"
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

	"github.com/wanmotion/wanmotion/hostplugin"
	"github.com/wanmotion/wanmotion/xapi"
)

const xencenterUsage = `Usage: wanmotion xencenter [--no-wait] [--insecure] [--thumbprint T] <url> <session> VM <uuid> [...]

Run by XenCenter's "WAN migrate to another pool..." menu item. Asks for the
destination pool, user, password, SR and network map on the terminal and
starts the migration through the wanmotion host plugin of the VM's pool.`

// xencenterInput is where prompts read answers (a terminal in real use).
var xencenterInput io.Reader = os.Stdin

func runXencenter(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("xencenter", flag.ContinueOnError)
	fs.SetOutput(stderr)
	noWait := fs.Bool("no-wait", false, "do not follow the task's progress")
	var tf tlsFlags
	tf.register(fs)
	fs.Usage = func() { fmt.Fprintln(stderr, xencenterUsage); fs.PrintDefaults() }
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return fmt.Errorf("%w: %v", errUsage, err)
	}
	rest := fs.Args()
	if len(rest) < 4 || len(rest)%4 != 0 {
		return fmt.Errorf("%w: want <url> <session> VM <uuid> (XenCenter appends them)", errUsage)
	}
	if err := tf.check(); err != nil {
		return err
	}
	in := bufio.NewReader(xencenterInput)
	for i := 0; i < len(rest); i += 4 {
		poolURL, session, class, uuid := rest[i], rest[i+1], rest[i+2], rest[i+3]
		if class != "VM" || uuid == "" || uuid == "null" || uuid == "blank" {
			return fmt.Errorf("%w: select a VM (got %s %s)", errUsage, class, uuid)
		}
		if !strings.HasPrefix(session, "OpaqueRef:") {
			return fmt.Errorf("%w: %q is not a session ref", errUsage, session)
		}
		if err := xencenterMigrate(ctx, in, poolURL, session, uuid, tf, *noWait, stdout, stderr); err != nil {
			return err
		}
	}
	return nil
}

func prompt(in *bufio.Reader, w io.Writer, question, def string) (string, error) {
	if def != "" {
		fmt.Fprintf(w, "%s [%s]: ", question, def)
	} else {
		fmt.Fprintf(w, "%s: ", question)
	}
	line, err := in.ReadString('\n')
	if err != nil && (!errors.Is(err, io.EOF) || line == "") {
		return "", fmt.Errorf("read answer: %w", err)
	}
	line = strings.TrimSpace(line)
	if line == "" {
		return def, nil
	}
	return line, nil
}

// trustPrompt connects to an https URL once without verification, shows
// the certificate's SHA-256 thumbprint and returns it if the user accepts
// it (XenCenter's own trust-on-first-use).
func trustPrompt(ctx context.Context, in *bufio.Reader, w io.Writer, raw, what string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme != "https" {
		return "", nil
	}
	addr := u.Host
	if u.Port() == "" {
		addr = net.JoinHostPort(u.Hostname(), "443")
	}
	d := tls.Dialer{Config: &tls.Config{InsecureSkipVerify: true}} //nolint:gosec // only to show the thumbprint to the user
	dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	conn, err := d.DialContext(dctx, "tcp", addr)
	if err != nil {
		return "", fmt.Errorf("connect to %s: %w", what, err)
	}
	defer conn.Close()
	certs := conn.(*tls.Conn).ConnectionState().PeerCertificates
	if len(certs) == 0 {
		return "", fmt.Errorf("%s sent no certificate", what)
	}
	tp := xapi.Thumbprint(certs[0].Raw)
	fmt.Fprintf(w, "The %s (%s) presents a certificate with SHA-256 thumbprint\n  %s\n", what, u.Host, tp)
	ans, err := prompt(in, w, "Trust it? (yes/no)", "no")
	if err != nil {
		return "", err
	}
	if a := strings.ToLower(ans); a != "yes" && a != "y" {
		return "", fmt.Errorf("certificate of the %s not trusted", what)
	}
	return tp, nil
}

// xencenterClient uses XenCenter's session on its coordinator (borrowed:
// the caller must Forget it, never log it out).
func xencenterClient(ctx context.Context, in *bufio.Reader, w io.Writer, poolURL, session string, tf tlsFlags, log hclog.Logger) (*xapi.Client, error) {
	mk := func(opts xapi.TLSOptions) (*xapi.Client, error) {
		c, err := xapi.New(xapi.Config{URL: poolURL, TLS: opts, Logger: log, DisableMemberDiscovery: true})
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		c.UseSession(xapi.SessionRef(session))
		return c, nil
	}
	c, err := mk(tf.options())
	if err != nil {
		return nil, err
	}
	if _, err = c.PoolGetAll(ctx); err == nil {
		return c, nil
	}
	c.Forget()
	var te *xapi.TransportError
	if !errors.As(err, &te) || tf.insecure || len(tf.thumbprints) > 0 || !strings.HasPrefix(poolURL, "https:") {
		return nil, fmt.Errorf("this pool (%s): %w", poolURL, err)
	}
	tp, terr := trustPrompt(ctx, in, w, poolURL, "pool coordinator")
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

func xencenterMigrate(ctx context.Context, in *bufio.Reader, poolURL, session, vmUUID string, tf tlsFlags, noWait bool, stdout, stderr io.Writer) error {
	log := newCLILogger("warn", stderr)
	c, err := xencenterClient(ctx, in, stderr, poolURL, session, tf, log)
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
	fmt.Fprintf(stderr, "WAN migration of VM %q (%s)\n", rec.NameLabel, vmUUID)
	args := map[string]string{"vm": vmUUID}
	if args["dest_url"], err = prompt(in, stderr, "Destination pool coordinator URL (https://host)", ""); err != nil {
		return err
	}
	if args["dest_url"] == "" {
		return fmt.Errorf("%w: no destination pool", errUsage)
	}
	if args["dest_user"], err = prompt(in, stderr, "Destination user", "root"); err != nil {
		return err
	}
	pw, err := readPassword(fmt.Sprintf("Password for %s at %s: ", args["dest_user"], args["dest_url"]), stderr)
	if err != nil {
		return fmt.Errorf("read password: %w", err)
	}
	if pw == "" {
		return fmt.Errorf("%w for %s", errNoPassword, args["dest_url"])
	}
	args["dest_password"] = pw
	if tp, err := trustPrompt(ctx, in, stderr, args["dest_url"], "destination pool"); err != nil {
		return err
	} else if tp != "" {
		args["dest_thumbprint"] = tp
	}
	for _, q := range []struct{ key, question string }{
		{"dest_sr", "Destination SR, name or UUID (empty: the pool's default SR)"},
		{"network_map", "Network map SRC=DST[,SRC=DST...] (empty: networks of the same name)"},
	} {
		v, err := prompt(in, stderr, q.question, "")
		if err != nil {
			return err
		}
		if v != "" {
			args[q.key] = v
		}
	}
	pools, err := c.PoolGetAll(ctx)
	if err != nil || len(pools) == 0 {
		return fmt.Errorf("pool.get_all: %w", err)
	}
	coord, err := c.PoolGetMaster(ctx, pools[0])
	if err != nil {
		return fmt.Errorf("pool.get_master: %w", err)
	}
	task, err := c.HostCallPlugin(ctx, coord, hostplugin.PluginName, fnMigrate, args)
	if err != nil {
		if ae, ok := xapi.AsAPIError(err); ok && ae.Code == "XENAPI_MISSING_PLUGIN" {
			return fmt.Errorf("wanmotion is not installed on the pool coordinator (see docs/operator-guide.md): %w", err)
		}
		return fmt.Errorf("start the migration: %w", err)
	}
	fmt.Fprintln(stdout, task)
	fmt.Fprintf(stderr, "Started: XenCenter shows the task \"Migrating %s\". Cancel it there, or with host.call_plugin(..., \"cancel\", {\"task\": ...}).\n", rec.NameLabel)
	if noWait {
		return nil
	}
	return followTask(ctx, c, xapi.TaskRef(task), stderr)
}

// followTask prints the task's progress until it ends (Ctrl-C stops
// watching, not the migration).
func followTask(ctx context.Context, c *xapi.Client, task xapi.TaskRef, w io.Writer) error {
	last := -1
	for {
		rec, err := c.TaskGetRecord(ctx, task)
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
			fmt.Fprintln(w, "stopped watching; the migration goes on (XenCenter shows it)")
			return nil
		case <-time.After(2 * time.Second):
		}
	}
}
