package xapi

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type rawServer struct {
	mu       sync.Mutex
	disk     []byte
	lastPut  *http.Request
	redirect string
}

func newRawServer(t *testing.T) (*httptest.Server, *rawServer) {
	rs := &rawServer{}
	rpc := &fakeXapi{t: t, handle: loginOK("OpaqueRef:s1", func(string, []any) string { return successXML(xv("")) })}
	mux := http.NewServeMux()
	mux.HandleFunc("/", rpc.serve)
	mux.HandleFunc("PUT /import_raw_vdi", func(w http.ResponseWriter, r *http.Request) {
		rs.mu.Lock()
		defer rs.mu.Unlock()
		if rs.redirect != "" && r.URL.Query().Get("moved") == "" {
			w.Header().Set("Location", rs.redirect)
			w.WriteHeader(http.StatusFound)
			return
		}
		q := r.URL.Query()
		if q.Get("session_id") != "OpaqueRef:s1" || q.Get("vdi") != "OpaqueRef:vdi" || q.Get("format") != "raw" {
			http.Error(w, "bad query", http.StatusBadRequest)
			return
		}
		if r.ContentLength < 0 || len(r.TransferEncoding) > 0 {
			http.Error(w, "Chunked encoding not yet implemented", http.StatusBadRequest)
			return
		}
		b, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		rs.disk = b
		rs.lastPut = r
	})
	mux.HandleFunc("GET /export_raw_vdi", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		if q.Get("session_id") != "OpaqueRef:s1" || q.Get("vdi") != "OpaqueRef:vdi" || q.Get("format") != "raw" {
			http.Error(w, "VDI not found", http.StatusNotFound)
			return
		}
		rs.mu.Lock()
		defer rs.mu.Unlock()
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.Itoa(len(rs.disk)))
		_, _ = w.Write(rs.disk)
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv, rs
}

func TestImportExportRawVDI(t *testing.T) {
	srv, rs := newRawServer(t)
	c := newTestClient(t, srv.URL, func(c *Config) { c.DisableMemberDiscovery = true })
	ctx := context.Background()
	require.NoError(t, c.Login(ctx))

	data := bytes.Repeat([]byte("wanmotion-"), 100000)
	require.NoError(t, c.ImportRawVDI(ctx, "OpaqueRef:vdi", io.MultiReader(bytes.NewReader(data)), int64(len(data))))
	assert.Equal(t, data, rs.disk)
	assert.Equal(t, int64(len(data)), rs.lastPut.ContentLength)
	assert.Empty(t, rs.lastPut.TransferEncoding, "never chunked")

	rc, size, err := c.ExportRawVDI(ctx, "OpaqueRef:vdi")
	require.NoError(t, err)
	got, err := io.ReadAll(rc)
	require.NoError(t, err)
	require.NoError(t, rc.Close())
	assert.Equal(t, int64(len(data)), size)
	assert.Equal(t, data, got)

	_, _, err = c.ExportRawVDI(ctx, "OpaqueRef:other")
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrProtocol)
	assert.Contains(t, err.Error(), "404")
	assert.NotContains(t, err.Error(), "OpaqueRef:s1", "the session is not echoed")

	assert.Error(t, c.ImportRawVDI(ctx, "OpaqueRef:vdi", strings.NewReader("x"), -1))
}

func TestImportRawVDIRedirect(t *testing.T) {
	srv, rs := newRawServer(t)
	c := newTestClient(t, srv.URL, func(c *Config) { c.DisableMemberDiscovery = true })
	ctx := context.Background()
	require.NoError(t, c.Login(ctx))
	rs.redirect = srv.URL + "/import_raw_vdi?format=raw&vdi=OpaqueRef:vdi&session_id=OpaqueRef:s1&moved=1"

	data := []byte("replayable body")
	require.NoError(t, c.ImportRawVDI(ctx, "OpaqueRef:vdi", bytes.NewReader(data), int64(len(data))))
	assert.Equal(t, data, rs.disk)

	err := c.ImportRawVDI(ctx, "OpaqueRef:vdi", io.MultiReader(bytes.NewReader(data)), int64(len(data)))
	require.Error(t, err, "a body that cannot be rewound is not replayed")
	assert.ErrorIs(t, err, ErrProtocol)
}

func TestRawVDINeedsLogin(t *testing.T) {
	srv, _ := newRawServer(t)
	c := newTestClient(t, srv.URL)
	_, _, err := c.ExportRawVDI(context.Background(), "OpaqueRef:vdi")
	assert.ErrorIs(t, err, ErrNotLoggedIn)
}
