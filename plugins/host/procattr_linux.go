package host

import (
	"os/exec"
	"syscall"
)

// setProcAttr makes the kernel send SIGTERM to a backend when the process
// that launched it dies (even by SIGKILL), so no backend outlives its
// agent. (Linux ties this to the launching OS thread; Go only retires
// threads of goroutines that exit while locked to them.)
func setProcAttr(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
}
