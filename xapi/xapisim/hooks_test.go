package xapisim

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
)

// installHook writes an executable hook script on every host of pool 0.
func installHook(t *testing.T, s *Sim, hook, name, script string) {
	t.Helper()
	for _, h := range s.Pools()[0].Hosts() {
		dir := s.HookDir(h.Ref, hook)
		require.NoError(t, os.MkdirAll(dir, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(script), 0o755))
	}
}

// recorder is a hook that appends "<name> <argv...>" to log, prints out
// and exits with code.
func recorder(log, name, out, code string) string {
	return "#!/bin/sh\necho \"" + name + " $*\" >> " + log + "\nprintf '" + out + "'\nexit " + code + "\n"
}

// flagHook parses its flags by name, in any order, and appends
// "uuid=U reason=R domid=D" to log.
func flagHook(log string) string {
	return `#!/bin/sh
U= R= D=
while [ $# -gt 0 ]; do
  case "$1" in
    -vmuuid) U=$2; shift 2 ;;
    -reason) R=$2; shift 2 ;;
    -vmdomid) D=$2; shift 2 ;;
    *) echo "unknown flag $1" >&2; exit 2 ;;
  esac
done
echo "uuid=$U reason=$R domid=$D" >> ` + log + "\n"
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

func TestRunHooksExitCodes(t *testing.T) {
	s := startSim(t, "")
	h := s.Pools()[0].Hosts()[1]
	ctx := context.Background()
	log := filepath.Join(t.TempDir(), "log")
	const hook = HookVMPreMigrate

	// Nothing installed: nothing runs.
	require.NoError(t, s.RunHooks(ctx, h.Ref, hook, "vm-uuid", "source", "7"))

	installHook(t, s, hook, "20logs", recorder(log, "20logs", "noted", "1"))
	installHook(t, s, hook, "10first", recorder(log, "10first", "", "0"))
	installHook(t, s, hook, "30third", recorder(log, "30third", "", "0"))
	require.NoError(t, s.RunHooks(ctx, h.Ref, hook, "vm-uuid", "source", "7"))
	assert.Equal(t, []string{
		"10first -vmuuid vm-uuid -reason source -vmdomid 7",
		"20logs -vmuuid vm-uuid -reason source -vmdomid 7",
		"30third -vmuuid vm-uuid -reason source -vmdomid 7",
	}, readLines(t, log), "every entry runs in filename order; exit 1 logs and continues")

	// Without a domid there is no -vmdomid; the host may be named.
	require.NoError(t, os.Remove(log))
	require.NoError(t, s.RunHooks(ctx, h.Name, hook, "vm-uuid", "destination", ""))
	assert.Equal(t, "10first -vmuuid vm-uuid -reason destination", readLines(t, log)[0])

	// Another exit code aborts: later scripts do not run.
	require.NoError(t, os.Remove(log))
	installHook(t, s, hook, "25fail", recorder(log, "25fail", "not now", "2"))
	err := s.RunHooks(ctx, h.Ref, hook, "vm-uuid", "source", "7")
	var f *Fault
	require.ErrorAs(t, err, &f)
	assert.Equal(t, ErrHookFailed, f.Code)
	assert.Equal(t, []string{hook + "/25fail", "source", "not now", "2"}, f.Params)
	assert.Len(t, readLines(t, log), 3, "30third must not run after a failure")

	// Killed by a signal: an internal error.
	for _, n := range []string{"10first", "20logs", "25fail", "30third"} {
		require.NoError(t, os.Remove(filepath.Join(s.HookDir(h.Ref, hook), n)))
	}
	installHook(t, s, hook, "40killed", "#!/bin/sh\nkill -KILL $$\n")
	err = s.RunHooks(ctx, h.Ref, hook, "vm-uuid", "source", "")
	require.ErrorAs(t, err, &f)
	assert.Equal(t, ErrInternal, f.Code)

	// Unknown host.
	err = s.RunHooks(ctx, "no-such-host", hook, "vm-uuid", "source", "")
	require.ErrorAs(t, err, &f)
	assert.Equal(t, ErrHandleInvalid, f.Code)
}

// TestRunHooksArgvOrders runs a flag-parsing hook with xenopsd's argv
// order and with the design doc's order; both parse the same.
func TestRunHooksArgvOrders(t *testing.T) {
	s := startSim(t, "")
	h := s.Pools()[0].Coordinator()
	dir := t.TempDir()
	parsed, raw := filepath.Join(dir, "parsed"), filepath.Join(dir, "raw")
	installHook(t, s, HookVMPostMigrate, "10raw", recorder(raw, "raw", "", "0"))
	installHook(t, s, HookVMPostMigrate, "20flags", flagHook(parsed))
	ctx := context.Background()

	require.NoError(t, s.RunHooks(ctx, h.Ref, HookVMPostMigrate, "u-1", "destination", "3"))
	s.SetHookReasonFirst(true)
	require.NoError(t, s.RunHooks(ctx, h.Ref, HookVMPostMigrate, "u-1", "destination", "3"))
	s.SetHookReasonFirst(false)

	assert.Equal(t, []string{
		"raw -vmuuid u-1 -reason destination -vmdomid 3",
		"raw -reason destination -vmuuid u-1 -vmdomid 3",
	}, readLines(t, raw))
	assert.Equal(t, []string{
		"uuid=u-1 reason=destination domid=3",
		"uuid=u-1 reason=destination domid=3",
	}, readLines(t, parsed))
}

// TestPowerOpsRunHooks checks the hooks wired into VM power operations.
func TestPowerOpsRunHooks(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	uuid := ok(t, url, "VM.get_uuid", sess, vm).(string)
	host := ok(t, url, "VM.get_resident_on", sess, vm).(string)
	domid := ok(t, url, "VM.get_domid", sess, vm).(string)
	log := filepath.Join(t.TempDir(), "log")
	for _, hk := range []string{HookVMPreStart, HookVMPreShutdown, HookVMPostDestroy, HookVMPreReboot} {
		installHook(t, s, hk, "10rec", recorder(log, hk, "", "0"))
	}

	ok(t, url, "VM.clean_shutdown", sess, vm)
	assert.Equal(t, []string{
		"vm-pre-shutdown -vmuuid " + uuid + " -reason clean-shutdown -vmdomid " + domid,
		"vm-post-destroy -vmuuid " + uuid + " -reason clean-shutdown",
	}, readLines(t, log))

	require.NoError(t, os.Remove(log))
	ok(t, url, "VM.start", sess, vm, false, false)
	assert.Equal(t, []string{"vm-pre-start -vmuuid " + uuid + " -reason none"}, readLines(t, log))

	// A failing pre hook aborts the operation: the VM keeps running.
	require.NoError(t, os.Remove(log))
	installHook(t, s, HookVMPreShutdown, "20veto", recorder(log, "veto", "busy", "3"))
	_, f := call(t, url, "VM.hard_shutdown", sess, vm)
	require.NotNil(t, f)
	assert.Equal(t, ErrHookFailed, f.Code)
	assert.Equal(t, []string{HookVMPreShutdown + "/20veto", "hard-shutdown", "busy", "3"}, f.Params)
	assert.Equal(t, Running, ok(t, url, "VM.get_power_state", sess, vm))
	assert.Equal(t, host, ok(t, url, "VM.get_resident_on", sess, vm))

	// A failing pre-start hook keeps the VM halted; dom0 runs no hooks.
	require.NoError(t, os.Remove(filepath.Join(s.HookDir(host, HookVMPreShutdown), "20veto")))
	ok(t, url, "VM.hard_shutdown", sess, vm)
	installHook(t, s, HookVMPreStart, "20veto", recorder(log, "veto", "no", "4"))
	_, f = call(t, url, "VM.start", sess, vm, false, false)
	require.NotNil(t, f)
	assert.Equal(t, ErrHookFailed, f.Code)
	assert.Equal(t, Halted, ok(t, url, "VM.get_power_state", sess, vm))
}

// TestHookCallsBack runs a vm-pre-start hook that calls the API through
// the host's local socket while VM.start waits for it: no deadlock, and
// the VM is still halted at that point.
func TestHookCallsBack(t *testing.T) {
	py := testutil.PythonPath(t)
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vm := demoVM(t, url, sess)
	ok(t, url, "VM.hard_shutdown", sess, vm)
	if len(s.XapiSocketPath(s.Pools()[0].Coordinator())) > 107 {
		t.Skip("state dir too long for a unix socket")
	}
	out := filepath.Join(t.TempDir(), "state")
	installHook(t, s, HookVMPreStart, "10ask", `#!`+py+`
import http.client, os, socket, sys, xmlrpc.client
etc = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))))
inv = dict(l.strip().split('=', 1) for l in open(os.path.join(etc, 'xensource-inventory')))
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(inv['WANMOTION_SIM_XAPI_SOCKET'].strip("'"))
class T(xmlrpc.client.Transport):
    def make_connection(self, host):
        return C('localhost')
x = xmlrpc.client.ServerProxy('http://localhost/', transport=T())
sess = x.session.slave_local_login_with_password('root', 'xenroot')['Value']
uuid = sys.argv[sys.argv.index('-vmuuid') + 1]
vm = x.VM.get_by_uuid(sess, uuid)['Value']
open('`+out+`', 'w').write(x.VM.get_power_state(sess, vm)['Value'])
`)
	ok(t, url, "VM.start", sess, vm, false, false)
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, Halted, string(b))
	assert.Equal(t, Running, ok(t, url, "VM.get_power_state", sess, vm))
}
