// Package testutil holds small helpers shared by the tests of every package.
package testutil

import (
	"os"
	"os/exec"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
)

// InCI reports whether the tests run under CI (CI=true). In CI a missing
// prerequisite is a failure, never a skip.
func InCI() bool {
	v := os.Getenv("CI")
	return v == "true" || v == "1"
}

// Missing skips the test locally, or fails it in CI, naming what is missing
// and the Debian package that provides it.
func Missing(t testing.TB, what, debianPackage string) {
	t.Helper()
	msg := what + " is missing: install the Debian package " + debianPackage + " (apt-get install " + debianPackage + ")"
	if InCI() {
		t.Fatal(msg + " — CI must have it (see .ci/run)")
	}
	t.Skip(msg)
}

// RequireTool returns the path of an executable, or skips/fails the test via
// Missing when it is not on PATH.
func RequireTool(t testing.TB, name, debianPackage string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		Missing(t, name, debianPackage)
	}
	return p
}

// RequireRoot skips (locally) or fails (CI) a test that needs root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		Missing(t, "root privileges", "(run the tests as root)")
	}
}

// RequirePythonModule checks that python3 can import module.
func RequirePythonModule(t testing.TB, module, debianPackage string) {
	t.Helper()
	py := PythonPath(t)
	if err := exec.Command(py, "-c", "import "+module).Run(); err != nil {
		Missing(t, "python3 module "+module, debianPackage)
	}
}

// Logger returns an hclog logger that writes through t.Log. Lines logged
// after the test has finished (by a goroutine that outlives it) are dropped
// instead of panicking the whole test binary.
func Logger(t testing.TB) hclog.Logger {
	t.Helper()
	w := &testWriter{t: t}
	t.Cleanup(w.finish)
	return hclog.New(&hclog.LoggerOptions{
		Name:   t.Name(),
		Level:  hclog.Debug,
		Output: w,
	})
}

type testWriter struct {
	t    testing.TB
	mu   sync.Mutex
	done bool
}

func (w *testWriter) finish() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Helper()
		w.t.Log(string(p))
	}
	return len(p), nil
}

// PythonPath returns the Debian system python3 (/usr/bin/python3), which sees
// the packages apt installs (python3-os-xenapi), unlike a pyenv shim on PATH.
func PythonPath(t testing.TB) string {
	t.Helper()
	const sys = "/usr/bin/python3"
	if _, err := os.Stat(sys); err == nil {
		return sys
	}
	return RequireTool(t, "python3", "python3")
}
