package engine

import (
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestImportRules: the engine defines the interfaces it drives and imports
// no other package of this module (adapters live elsewhere); tests may use
// internal/testutil.
func TestImportRules(t *testing.T) {
	t.Parallel()
	files, err := filepath.Glob("*.go")
	require.NoError(t, err)
	fset := token.NewFileSet()
	for _, f := range files {
		af, err := parser.ParseFile(fset, f, nil, parser.ImportsOnly)
		require.NoError(t, err)
		for _, imp := range af.Imports {
			p, _ := strconv.Unquote(imp.Path.Value)
			if !strings.HasPrefix(p, "github.com/wanmotion/wanmotion/") {
				continue
			}
			if strings.HasSuffix(f, "_test.go") && p == "github.com/wanmotion/wanmotion/internal/testutil" {
				continue
			}
			assert.Failf(t, "forbidden import", "%s imports %s", f, p)
		}
	}
}
