package xapisim

// host.call_plugin (xenapi-facts §2, xapi_plugins.ml) and the per-host
// dom0 layout plugins and hooks see: <etc>/xapi.d/plugins, <etc>/xapi.d/<hook>,
// <etc>/xensource-inventory and the local XML-RPC socket
// <state-dir>/<host>/var/lib/xcp/xapi.

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Error codes of host plugins and hooks.
const (
	ErrPluginFailure = "XENAPI_PLUGIN_FAILURE" // [kind, ...] see callPlugin
	ErrMissingPlugin = "XENAPI_MISSING_PLUGIN" // [name]
	ErrHookFailed    = "XAPI_HOOK_FAILED"      // [hook/script, reason, stdout, exit code]
)

// PluginPath is the PATH a plugin or hook runs with: forkexecd passes no
// other environment (Forkhelpers.default_path_env_pair).
const PluginPath = "PATH=/sbin:/usr/sbin:/bin:/usr/bin"

// Inventory keys the simulator adds to <etc>/xensource-inventory so that a
// plugin (which gets only PATH) can reach the simulated xapi. Real hosts
// have no such keys: there a plugin uses the socket /var/lib/xcp/xapi.
const (
	InventorySim        = "WANMOTION_SIM"             // "true"
	InventoryXapiSocket = "WANMOTION_SIM_XAPI_SOCKET" // this host's local XML-RPC unix socket
	InventoryXapiURL    = "WANMOTION_SIM_XAPI_URL"    // this host's HTTP URL
	InventoryPoolURL    = "WANMOTION_SIM_POOL_URL"    // the coordinator's HTTP URL
)

// hostByID finds a host by ref, name_label or uuid.
func (s *Sim) hostByID(id string) (*Host, bool) {
	for _, p := range s.pools {
		for _, h := range p.hosts {
			if h.Ref == id || h.Name == id {
				return h, true
			}
		}
	}
	for _, p := range s.pools {
		p.mu.Lock()
		o, err := p.db.byUUID("host", id)
		p.mu.Unlock()
		if err == nil {
			for _, h := range p.hosts {
				if h.Ref == o.Ref {
					return h, true
				}
			}
		}
	}
	return nil, false
}

// HostDir returns host h's private directory in the state dir,
// <StateDir>/<host name> (its etc, var/lib/xcp, certificate).
func (s *Sim) HostDir(h *Host) string { return filepath.Join(s.cfg.StateDir, h.Name) }

// HostEtcDir returns the /etc of the host named by host (a ref, name_label
// or uuid): Config.EtcDir when set, else <StateDir>/<host name>/etc. ""
// when there is no such host.
func (s *Sim) HostEtcDir(host string) string {
	if s.cfg.EtcDir != "" {
		return s.cfg.EtcDir
	}
	h, ok := s.hostByID(host)
	if !ok {
		return ""
	}
	return filepath.Join(s.HostDir(h), "etc")
}

// PluginDir returns the host's plugin directory, <etc>/xapi.d/plugins:
// host.call_plugin(host, name, ...) runs the executable <PluginDir>/<name>.
func (s *Sim) PluginDir(host string) string {
	etc := s.HostEtcDir(host)
	if etc == "" {
		return ""
	}
	return filepath.Join(etc, "xapi.d", "plugins")
}

// HookDir returns the host's directory for a xenopsd hook, <etc>/xapi.d/<hook>
// (e.g. vm-pre-migrate); every entry in it runs in filename order.
func (s *Sim) HookDir(host, hook string) string {
	etc := s.HostEtcDir(host)
	if etc == "" {
		return ""
	}
	return filepath.Join(etc, "xapi.d", hook)
}

// XapiSocketPath returns the path of host h's local XML-RPC socket (the
// simulator's /var/lib/xcp/xapi). It is only served when the path fits in
// a unix socket address (107 bytes).
func (s *Sim) XapiSocketPath(h *Host) string {
	return filepath.Join(s.HostDir(h), "var", "lib", "xcp", "xapi")
}

var _ = addRegistrar(registerPlugins)

func registerPlugins() {
	Register(&Method{Name: "host.call_plugin", Unlocked: true,
		Params:  []Param{p("host", KRef), p("plugin", KString), p("fn", KString), p("args", KMap)},
		Handler: callPlugin})
}

// callPlugin runs <etc>/xapi.d/plugins/<plugin> on the target host with
// xapi's argv protocol and maps its outcome as xapi_plugins.ml does.
func callPlugin(c *Call) (any, error) {
	c.Pool.mu.Lock()
	_, err := c.db().get("host", c.Str(0))
	c.Pool.mu.Unlock()
	if err != nil {
		return nil, err
	}
	name := c.Str(1)
	dir := c.Sim.PluginDir(c.Str(0))
	entries, _ := os.ReadDir(dir)
	if !slices.ContainsFunc(entries, func(e os.DirEntry) bool { return e.Name() == name }) {
		return nil, Errorf(ErrMissingPlugin, name)
	}
	arg := PluginCall(c.Str(2), c.Session, c.Map(3))
	ctx, cancel := c.Sim.runContext(c.Ctx)
	defer cancel()
	c.Sim.log.Debug("calling plugin", "plugin", name, "fn", c.Str(2), "host", c.Str(0))
	res, err := runForked(ctx, filepath.Join(dir, name), arg)
	if err != nil {
		return nil, Errorf(ErrPluginFailure, "non-zero exit", "", err.Error())
	}
	switch {
	case res.signal != "":
		return nil, Errorf(ErrPluginFailure, "signal: "+res.signal, res.stdout, res.stderr)
	case res.exit != 0:
		return nil, Errorf(ErrPluginFailure, "non-zero exit", res.stdout, res.stderr)
	}
	return ParsePluginOutput(res.stdout)
}

// runContext returns a context that is not cancelled with the caller's
// (xapi does not kill a plugin when its client goes away) but is when the
// simulator closes.
func (s *Sim) runContext(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(context.WithoutCancel(parent))
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

// forkResult is the outcome of one forkexecd-style run.
type forkResult struct {
	stdout, stderr string
	exit           int
	signal         string // e.g. "SIGKILL" when killed by a signal
}

// runForked runs path with args as forkexecd's execute_command_get_output
// does: environment PATH only, stdin /dev/null, cwd /, stdout and stderr
// into files read after the process exits (so a detached child keeping
// them open does not hold the call), no timeout. It returns an error only
// when the program could not be started.
func runForked(ctx context.Context, path string, args ...string) (forkResult, error) {
	var res forkResult
	outF, err := os.CreateTemp("", "xapisim-out-")
	if err != nil {
		return res, err
	}
	defer func() { _ = outF.Close(); _ = os.Remove(outF.Name()) }()
	errF, err := os.CreateTemp("", "xapisim-err-")
	if err != nil {
		return res, err
	}
	defer func() { _ = errF.Close(); _ = os.Remove(errF.Name()) }()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.Env = []string{PluginPath}
	cmd.Dir = "/"
	cmd.Stdout = outF
	cmd.Stderr = errF
	err = cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return res, err
	}
	out, rerr := os.ReadFile(outF.Name())
	if rerr != nil {
		return res, rerr
	}
	errOut, rerr := os.ReadFile(errF.Name())
	if rerr != nil {
		return res, rerr
	}
	res.stdout, res.stderr = string(out), string(errOut)
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		res.signal = unix.SignalName(ws.Signal())
		if res.signal == "" {
			res.signal = fmt.Sprintf("(ocaml signal %d with an unknown name)", int(ws.Signal()))
		}
		return res, nil
	}
	res.exit = cmd.ProcessState.ExitCode()
	return res, nil
}

// PluginCall builds argv[1] of a host plugin exactly as xapi does: an
// XML-RPC methodCall printed by xml-light (no prolog, no whitespace),
// methodName fn, param 1 the session ref as an untyped string, param 2 a
// struct of untyped strings (members sorted by key; "" is <value/>).
func PluginCall(fn, session string, args map[string]string) string {
	var b strings.Builder
	b.WriteString("<methodCall><methodName>")
	b.WriteString(xmlLightEscape(fn))
	b.WriteString("</methodName><params><param>")
	writeXMLLightString(&b, session)
	b.WriteString("</param><param><value>")
	if len(args) == 0 {
		b.WriteString("<struct/>")
	} else {
		keys := make([]string, 0, len(args))
		for k := range args {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		b.WriteString("<struct>")
		for _, k := range keys {
			b.WriteString("<member><name>")
			b.WriteString(xmlLightEscape(k))
			b.WriteString("</name>")
			writeXMLLightString(&b, args[k])
			b.WriteString("</member>")
		}
		b.WriteString("</struct>")
	}
	b.WriteString("</value></param></params></methodCall>")
	return b.String()
}

func writeXMLLightString(b *strings.Builder, s string) {
	if s == "" {
		b.WriteString("<value/>")
		return
	}
	b.WriteString("<value>")
	b.WriteString(xmlLightEscape(s))
	b.WriteString("</value>")
}

// xmlLightEscape escapes PCData as xml-light's buffer_pcdata does
// (including leaving "&#" alone).
func xmlLightEscape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '>':
			b.WriteString("&gt;")
		case '<':
			b.WriteString("&lt;")
		case '&':
			if i < len(s)-1 && s[i+1] == '#' {
				b.WriteByte('&')
			} else {
				b.WriteString("&amp;")
			}
		case '\'':
			b.WriteString("&apos;")
		case '"':
			b.WriteString("&quot;")
		default:
			b.WriteByte(c)
		}
	}
	return b.String()
}

// ---- plugin output parsing (XMLRPC.From.methodResponse) ----

// xnode is an xml-light tree node: an element or PCData.
type xnode struct {
	name     string // "" for PCData
	attrs    bool
	text     string
	children []*xnode
}

// parseXMLLight parses a document into an xml-light-like tree:
// whitespace-only text between elements is dropped, comments and
// processing instructions are ignored.
func parseXMLLight(s string) (*xnode, error) {
	d := xml.NewDecoder(strings.NewReader(s))
	d.Strict = true
	var stack []*xnode
	var root *xnode
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if root != nil && len(stack) == 0 {
				return nil, errors.New("content after the root element")
			}
			n := &xnode{name: t.Name.Local, attrs: len(t.Attr) > 0}
			if len(stack) > 0 {
				top := stack[len(stack)-1]
				top.children = append(top.children, n)
			} else {
				root = n
			}
			stack = append(stack, n)
		case xml.EndElement:
			stack = stack[:len(stack)-1]
		case xml.CharData:
			txt := string(t)
			if strings.TrimSpace(txt) == "" {
				continue
			}
			if len(stack) == 0 {
				return nil, errors.New("text outside the root element")
			}
			top := stack[len(stack)-1]
			if k := len(top.children); k > 0 && top.children[k-1].name == "" {
				top.children[k-1].text += txt
			} else {
				top.children = append(top.children, &xnode{text: txt})
			}
		}
	}
	if root == nil {
		return nil, errors.New("no root element")
	}
	return root, nil
}

// errShape is XMLRPC.RunTimeTypeError: well-formed XML of the wrong shape.
var errShape = errors.New("unexpected XML-RPC shape")

func unbox(n *xnode, names ...string) ([]*xnode, error) {
	if n.name == "" || n.attrs || !slices.Contains(names, n.name) {
		return nil, fmt.Errorf("%w: want <%s>", errShape, names[0])
	}
	return n.children, nil
}

func singleton(n *xnode, names ...string) (*xnode, error) {
	ch, err := unbox(n, names...)
	if err != nil {
		return nil, err
	}
	if len(ch) != 1 {
		return nil, fmt.Errorf("%w: <%s> must hold one element", errShape, names[0])
	}
	return ch[0], nil
}

func pcdata(n *xnode) (string, error) {
	if n.name != "" {
		return "", fmt.Errorf("%w: want text", errShape)
	}
	return n.text, nil
}

// fromString is XMLRPC.From.string.
func fromString(n *xnode) (string, error) {
	if n.name == "value" && !n.attrs {
		switch {
		case len(n.children) == 0:
			return "", nil
		case len(n.children) == 1 && n.children[0].name == "":
			return n.children[0].text, nil
		case len(n.children) == 1 && n.children[0].name == "string" && !n.children[0].attrs && len(n.children[0].children) == 0:
			return "", nil
		}
	}
	v, err := singleton(n, "value")
	if err != nil {
		return "", err
	}
	s, err := singleton(v, "string")
	if err != nil {
		return "", err
	}
	return pcdata(s)
}

// fromStructure is XMLRPC.From.structure (member order kept).
func fromStructure(n *xnode) ([][2]any, error) {
	st, err := singleton(n, "value")
	if err != nil {
		return nil, err
	}
	members, err := unbox(st, "struct")
	if err != nil {
		return nil, err
	}
	var out [][2]any
	for _, m := range members {
		kv, err := unbox(m, "member")
		if err != nil {
			return nil, err
		}
		if len(kv) != 2 {
			return nil, fmt.Errorf("%w: member", errShape)
		}
		nameCh, err := unbox(kv[0], "name")
		if err != nil {
			return nil, err
		}
		name := ""
		switch {
		case len(nameCh) == 1 && nameCh[0].name == "":
			name = nameCh[0].text
		case len(nameCh) != 0:
			return nil, fmt.Errorf("%w: name", errShape)
		}
		out = append(out, [2]any{name, kv[1]})
	}
	return out, nil
}

func assoc(m [][2]any, key string) (*xnode, bool) {
	for _, kv := range m {
		if kv[0].(string) == key {
			return kv[1].(*xnode), true
		}
	}
	return nil, false
}

// ParsePluginOutput maps a plugin's stdout to the call_plugin result as
// xapi_plugins.ml does: Status Success → its Value (a string), Status
// Failure → the plugin's own error code and params, <fault> →
// XENAPI_PLUGIN_FAILURE ["fault", code, reason], XML that does not parse →
// ["failed to parse plugin output", output, error], any other shape →
// ["unexpected XMLRPC result", output].
func ParsePluginOutput(output string) (string, error) {
	root, err := parseXMLLight(output)
	if err != nil {
		return "", Errorf(ErrPluginFailure, "failed to parse plugin output", output, err.Error())
	}
	v, err := pluginResult(root)
	if errors.Is(err, errShape) {
		return "", Errorf(ErrPluginFailure, "unexpected XMLRPC result", output)
	}
	return v, err
}

func pluginResult(root *xnode) (string, error) {
	body, err := singleton(root, "methodResponse")
	if err != nil {
		return "", err
	}
	switch body.name {
	case "params":
		params, err := unbox(body, "params")
		if err != nil {
			return "", err
		}
		if len(params) != 1 {
			return "", fmt.Errorf("%w: expected a single return value", errShape)
		}
		st, err := singleton(params[0], "param")
		if err != nil {
			return "", err
		}
		m, err := fromStructure(st)
		if err != nil {
			return "", err
		}
		statusN, ok := assoc(m, "Status")
		if !ok {
			return "", fmt.Errorf("%w: no Status", errShape)
		}
		status, err := fromString(statusN)
		if err != nil {
			return "", err
		}
		switch status {
		case "Success":
			val, ok := assoc(m, "Value")
			if !ok {
				return "", fmt.Errorf("%w: no Value", errShape)
			}
			return fromString(val)
		case "Failure":
			descN, ok := assoc(m, "ErrorDescription")
			if !ok {
				return "", fmt.Errorf("%w: no ErrorDescription", errShape)
			}
			arr, err := singleton(descN, "value")
			if err != nil {
				return "", err
			}
			data, err := singleton(arr, "array")
			if err != nil {
				return "", err
			}
			items, err := unbox(data, "data")
			if err != nil {
				return "", err
			}
			if len(items) == 0 {
				return "", fmt.Errorf("%w: empty ErrorDescription", errShape)
			}
			desc := make([]string, len(items))
			for i, it := range items {
				if desc[i], err = fromString(it); err != nil {
					return "", err
				}
			}
			return "", Errorf(desc[0], desc[1:]...)
		}
		return "", fmt.Errorf("%w: Status %q", errShape, status)
	case "fault":
		st, err := singleton(body, "fault")
		if err != nil {
			return "", err
		}
		m, err := fromStructure(st)
		if err != nil {
			return "", err
		}
		codeN, ok1 := assoc(m, "faultCode")
		reasonN, ok2 := assoc(m, "faultString")
		if !ok1 || !ok2 {
			return "", fmt.Errorf("%w: fault members", errShape)
		}
		iv, err := singleton(codeN, "value")
		if err != nil {
			return "", err
		}
		in, err := singleton(iv, "i4", "int")
		if err != nil {
			return "", err
		}
		txt, err := pcdata(in)
		if err != nil {
			return "", err
		}
		code, perr := strconv.ParseInt(strings.TrimSpace(txt), 0, 32)
		if perr != nil {
			return "", fmt.Errorf("%w: faultCode %q", errShape, txt)
		}
		reason, err := fromString(reasonN)
		if err != nil {
			return "", err
		}
		return "", Errorf(ErrPluginFailure, "fault", strconv.FormatInt(code, 10), reason)
	}
	return "", fmt.Errorf("%w: response", errShape)
}

// ---- dom0 layout: etc dirs, inventory, local XML-RPC socket ----

func init() { RegisterStartHook(startHostLocal) }

// startHostLocal prepares every host's etc (xapi.d/plugins,
// xensource-inventory) and its xl stand-in (xl.go), and serves its
// XML-RPC on the local unix socket.
func startHostLocal(ctx context.Context, s *Sim) (func(), error) {
	var servers []*http.Server
	var wg sync.WaitGroup
	stop := func() {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, srv := range servers {
			_ = srv.Shutdown(sctx)
		}
		wg.Wait()
	}
	for _, p := range s.pools {
		for _, h := range p.hosts {
			etc := s.HostEtcDir(h.Ref)
			if err := os.MkdirAll(filepath.Join(etc, "xapi.d", "plugins"), 0o755); err != nil {
				stop()
				return nil, fmt.Errorf("host %s etc: %w", h.Name, err)
			}
			sock := s.XapiSocketPath(h)
			served := false
			if len(sock) <= 107 {
				if err := os.MkdirAll(filepath.Dir(sock), 0o755); err != nil {
					stop()
					return nil, fmt.Errorf("host %s socket dir: %w", h.Name, err)
				}
				_ = os.Remove(sock)
				var lc net.ListenConfig
				ln, err := lc.Listen(ctx, "unix", sock)
				if err != nil {
					stop()
					return nil, fmt.Errorf("host %s local socket: %w", h.Name, err)
				}
				srv := &http.Server{Handler: localConnHandler(s.handler(h)), ReadHeaderTimeout: 30 * time.Second}
				servers = append(servers, srv)
				wg.Add(1)
				go func() {
					defer wg.Done()
					if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
						s.log.Error("local socket serve failed", "host", h.Name, "error", err)
					}
				}()
				served = true
			} else {
				s.log.Warn("state dir path too long for the local xapi socket", "host", h.Name)
			}
			if s.cfg.EtcDir == "" {
				if err := s.writeInventory(h, etc, sock, served); err != nil {
					stop()
					return nil, err
				}
				if err := s.startXL(h); err != nil {
					stop()
					return nil, err
				}
			}
		}
	}
	return stop, nil
}

// writeInventory writes <etc>/xensource-inventory in the real KEY='value'
// format, plus the simulator's keys telling a plugin where xapi is.
func (s *Sim) writeInventory(h *Host, etc, sock string, served bool) error {
	p := h.pool
	p.mu.Lock()
	var hostUUID, dom0UUID string
	if o, err := p.db.get("host", h.Ref); err == nil {
		hostUUID = o.str("uuid")
		if vm, err := p.db.get("VM", o.str("control_domain")); err == nil {
			dom0UUID = vm.str("uuid")
		}
	}
	p.mu.Unlock()
	var b bytes.Buffer
	kv := func(k, v string) { fmt.Fprintf(&b, "%s='%s'\n", k, v) }
	kv("PRODUCT_BRAND", "XCP-ng")
	kv("PRODUCT_VERSION", "8.3.0")
	kv("INSTALLATION_UUID", hostUUID)
	kv("CONTROL_DOMAIN_UUID", dom0UUID)
	kv("MANAGEMENT_INTERFACE", "xenbr0")
	kv(InventorySim, "true")
	if served {
		kv(InventoryXapiSocket, sock)
	}
	kv(InventoryXapiURL, h.URL())
	kv(InventoryPoolURL, p.Coordinator().URL())
	path := filepath.Join(etc, "xensource-inventory")
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("host %s inventory: %w", h.Name, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("host %s inventory: %w", h.Name, err)
	}
	return nil
}

// InstallPlugin makes the executable at path the plugin name of every
// host: a symlink <PluginDir(host)>/<name> → path (replacing an existing
// entry), so the plugin's argv[0] stays inside the host's etc.
func (s *Sim) InstallPlugin(name, path string) error {
	return s.installEverywhere(func(h *Host) string { return s.PluginDir(h.Ref) }, name, path)
}

// InstallHook makes the executable at path the hook script name of hook
// (e.g. HookVMPreMigrate, "10wanmotion") on every host, as a symlink.
func (s *Sim) InstallHook(hook, name, path string) error {
	return s.installEverywhere(func(h *Host) string { return s.HookDir(h.Ref, hook) }, name, path)
}

func (s *Sim) installEverywhere(dirOf func(*Host) string, name, path string) error {
	if name == "" || strings.ContainsRune(name, '/') {
		return fmt.Errorf("install %q: invalid name", name)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("install %s: %w", name, err)
	}
	for _, p := range s.pools {
		for _, h := range p.hosts {
			dir := dirOf(h)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return fmt.Errorf("install %s on %s: %w", name, h.Name, err)
			}
			link := filepath.Join(dir, name)
			if err := os.Remove(link); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("install %s on %s: %w", name, h.Name, err)
			}
			if err := os.Symlink(abs, link); err != nil {
				return fmt.Errorf("install %s on %s: %w", name, h.Name, err)
			}
		}
	}
	return nil
}
