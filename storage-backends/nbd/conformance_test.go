package nbdstore

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/plugins/conformance"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/plugins/host"
)

func TestConformanceInProcessRPC(t *testing.T) {
	conformance.RunStorageSuite(t, func(t *testing.T) conformance.StorageSetup {
		f := newSimFixture(t)
		src, dst := configured(t, f.src.stateDir, Config{}), configured(t, f.dst.stateDir, Config{})
		return f.setup(conformance.StorageOverRPC(t, src), conformance.StorageOverRPC(t, dst),
			func(t *testing.T) (contract.Storage, contract.Storage) {
				src.shutdown()
				dst.shutdown()
				return conformance.StorageOverRPC(t, configured(t, f.src.stateDir, Config{})),
					conformance.StorageOverRPC(t, configured(t, f.dst.stateDir, Config{}))
			})
	})
}

func TestConformanceSubprocess(t *testing.T) {
	exe, err := os.Executable()
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.Symlink(exe, filepath.Join(dir, "wanmotion-storage-"+Name)))
	h := host.New([]string{dir}, host.Options{Logger: testutil.Logger(t), StartTimeout: 30 * time.Second,
		Env: []string{"GORACE=atexit_sleep_ms=0"}})
	launch := func(t *testing.T, stateDir string) *host.Instance {
		inst, err := h.LaunchStorage(context.Background(), Name, nil, stateDir)
		require.NoError(t, err)
		t.Cleanup(inst.Close)
		return inst
	}
	conformance.RunStorageSuite(t, func(t *testing.T) conformance.StorageSetup {
		f := newSimFixture(t)
		src, dst := launch(t, f.src.stateDir), launch(t, f.dst.stateDir)
		return f.setup(src.Storage(), dst.Storage(), func(t *testing.T) (contract.Storage, contract.Storage) {
			src.Close()
			dst.Close()
			return launch(t, f.src.stateDir).Storage(), launch(t, f.dst.stateDir).Storage()
		})
	})
}
