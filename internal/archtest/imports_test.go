// Package archtest enforces the import rules of ARCHITECTURE §3:
//   - xapi imports nothing of ours (its own subpackages excepted; xapisim is a test tool);
//   - backends import only plugins/..., xapi, and the shared low-level packages (nbd, wan);
//   - engine never imports a backend.
package archtest

import (
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const module = "github.com/wanmotion/wanmotion"

// imports returns, for every non-test Go file under dir (relative to the
// repository root), the module-internal import paths it uses.
func imports(t *testing.T, root, dir string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	base := filepath.Join(root, dir)
	if _, err := os.Stat(base); os.IsNotExist(err) {
		return out
	}
	err := filepath.WalkDir(base, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, parser.ImportsOnly)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		for _, im := range f.Imports {
			p := strings.Trim(im.Path.Value, `"`)
			if strings.HasPrefix(p, module+"/") {
				out[rel] = append(out[rel], strings.TrimPrefix(p, module+"/"))
			}
		}
		return nil
	})
	require.NoError(t, err)
	return out
}

func allowed(p string, prefixes []string) bool {
	for _, a := range prefixes {
		if p == a || strings.HasPrefix(p, a+"/") {
			return true
		}
	}
	return false
}

func TestImportRules(t *testing.T) {
	root, err := filepath.Abs("../..")
	require.NoError(t, err)
	rules := []struct {
		dir     string
		skip    []string // subtrees exempt from the rule
		allowed []string
	}{
		{dir: "xapi", skip: []string{"xapi/xapisim"}, allowed: []string{"xapi"}},
		{dir: "storage-backends", allowed: []string{"plugins", "xapi", "nbd", "wan", "storage-backends"}},
		{dir: "network-backends", allowed: []string{"plugins", "xapi", "wan", "network-backends"}},
		{dir: "plugins", allowed: []string{"plugins"}},
		{dir: "nbd", allowed: []string{"nbd"}},
		{dir: "wan", allowed: []string{"wan"}},
	}
	for _, r := range rules {
		for file, ims := range imports(t, root, r.dir) {
			if allowed(filepath.ToSlash(filepath.Dir(file)), r.skip) {
				continue
			}
			for _, p := range ims {
				if !allowed(p, r.allowed) {
					t.Errorf("%s imports %s: %s may import only %v (ARCHITECTURE §3)", file, p, r.dir, r.allowed)
				}
			}
		}
	}
	for file, ims := range imports(t, root, "engine") {
		for _, p := range ims {
			if allowed(p, []string{"storage-backends", "network-backends"}) {
				t.Errorf("%s imports backend %s: the engine never imports a backend", file, p)
			}
		}
	}
}
