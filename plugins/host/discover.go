package host

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// DefaultInstallDir is where packages install backends.
const DefaultInstallDir = "/opt/wanmotion/plugins"

// EnvPluginDir overrides DefaultInstallDir.
const EnvPluginDir = "WANMOTION_PLUGIN_DIR"

// BinaryPrefix starts every backend binary name: wanmotion-<kind>-<name>.
const BinaryPrefix = "wanmotion-"

// Errors of discovery and launch.
var (
	// ErrBackendNotFound: no installed backend has the (kind, name) asked
	// for. It matches contract.ErrNotFound too.
	ErrBackendNotFound = fmt.Errorf("backend not installed: %w", contract.ErrNotFound)
	// ErrChecksum: the binary's SHA-256 is not the expected one.
	ErrChecksum = errors.New("backend checksum mismatch")
	// ErrStartTimeout: the backend did not complete the handshake in time.
	ErrStartTimeout = errors.New("backend start timed out")
	// ErrHandshake: the binary is not a wanmotion backend of a compatible
	// protocol version (or of the kind its name says).
	ErrHandshake = errors.New("backend handshake failed")
)

// Binary is one backend executable found on disk.
type Binary struct {
	Kind   contract.Kind
	Name   string
	Path   string // absolute
	SHA256 string // hex, computed at discovery (or pinned)
	// Args are extra arguments passed to the binary (normally none).
	Args []string
}

// ID is "<kind>/<name>".
func (b Binary) ID() string { return string(b.Kind) + "/" + b.Name }

// ParseBinaryName splits "wanmotion-<kind>-<name>".
func ParseBinaryName(base string) (contract.Kind, string, bool) {
	rest, ok := strings.CutPrefix(base, BinaryPrefix)
	if !ok {
		return "", "", false
	}
	k, name, ok := strings.Cut(rest, "-")
	if !ok || name == "" {
		return "", "", false
	}
	kind, err := contract.ParseKind(k)
	if err != nil || !validName(name) {
		return "", "", false
	}
	return kind, name, true
}

func validName(s string) bool {
	for i, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9':
		case (r == '-' || r == '_' || r == '.') && i > 0:
		default:
			return false
		}
	}
	return s != ""
}

// InstallDir returns the install directory: flagDir if set, else
// $WANMOTION_PLUGIN_DIR, else DefaultInstallDir.
func InstallDir(flagDir string) string {
	if flagDir != "" {
		return flagDir
	}
	if d := os.Getenv(EnvPluginDir); d != "" {
		return d
	}
	return DefaultInstallDir
}

// SearchDirs is the install directory followed by the directory of the
// running binary (when it differs).
func SearchDirs(flagDir string) []string {
	dirs := []string{InstallDir(flagDir)}
	if exe, err := os.Executable(); err == nil {
		if d := filepath.Dir(exe); d != dirs[0] {
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// Discover lists the backends in dirs. A (kind, name) found in several
// directories is taken from the first. Missing directories are skipped.
func Discover(dirs []string) ([]Binary, error) {
	seen := map[string]bool{}
	var out []Binary
	for _, dir := range dirs {
		abs, err := filepath.Abs(dir)
		if err != nil {
			return nil, fmt.Errorf("plugin dir %s: %w", dir, err)
		}
		entries, err := os.ReadDir(abs)
		if errors.Is(err, os.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read plugin dir: %w", err)
		}
		for _, e := range entries {
			kind, name, ok := ParseBinaryName(e.Name())
			if !ok {
				continue
			}
			p := filepath.Join(abs, e.Name())
			fi, err := os.Stat(p) // follows symlinks
			if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
				continue
			}
			b := Binary{Kind: kind, Name: name, Path: p}
			if seen[b.ID()] {
				continue
			}
			sum, err := FileSHA256(p)
			if err != nil {
				return nil, err
			}
			b.SHA256 = sum
			seen[b.ID()] = true
			out = append(out, b)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID() < out[j].ID() })
	return out, nil
}

// Resolve picks the backend (kind, name) among bins. When it is not there
// the error names the installed backends of that kind.
func Resolve(bins []Binary, kind contract.Kind, name string) (Binary, error) {
	var have []string
	for _, b := range bins {
		if b.Kind != kind {
			continue
		}
		if b.Name == name {
			return b, nil
		}
		have = append(have, b.Name)
	}
	installed := "none"
	if len(have) > 0 {
		installed = strings.Join(have, ", ")
	}
	return Binary{}, fmt.Errorf("%s backend %q (installed %s backends: %s): %w", kind, name, kind, installed, ErrBackendNotFound)
}

// FileSHA256 returns the hex SHA-256 of a file.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("checksum: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("checksum %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
