package xapisim

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/nbd"
)

// nbdInfo calls VDI.get_nbd_info and returns the records.
func nbdInfo(t *testing.T, url, sess, vdi string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, r := range ok(t, url, "VDI.get_nbd_info", sess, vdi).([]any) {
		out = append(out, r.(map[string]any))
	}
	return out
}

func networkByName(t *testing.T, url, sess, name string) string {
	t.Helper()
	refs := ok(t, url, "network.get_by_name_label", sess, name).([]any)
	require.Len(t, refs, 1)
	return refs[0].(string)
}

// readExport reads a whole export with our client.
func readExport(t *testing.T, rec map[string]any, pinned bool) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	opts := nbd.DialOptions{Export: rec["exportname"].(string)}
	if pinned {
		opts.PinnedCertPEM = []byte(rec["cert"].(string))
	}
	c, err := nbd.Dial(ctx, "tcp", net.JoinHostPort(rec["address"].(string), rec["port"].(string)), opts)
	if err != nil {
		return nil, err
	}
	defer func() { _ = c.Close() }()
	assert.True(t, c.ReadOnly(), "xapi's NBD exports are read-only")
	buf := make([]byte, c.Size())
	if err := c.ReadAt(ctx, buf, 0); err != nil {
		return nil, err
	}
	return buf, nil
}

// libnbdURI builds the nbd(s):// URI of a get_nbd_info record; the export
// name ("/uuid?session_id=...") is escaped into the URI path.
func libnbdURI(rec map[string]any, tlsDir string) string {
	scheme := "nbd"
	q := ""
	if tlsDir != "" {
		scheme = "nbds"
		q = "?tls-certificates=" + tlsDir
	}
	return scheme + "://" + net.JoinHostPort(rec["address"].(string), rec["port"].(string)) +
		"/" + url.PathEscape(rec["exportname"].(string)) + q
}

func TestGetNBDInfo(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vdi, uuid := demoVDI(t, url, sess)

	recs := nbdInfo(t, url, sess, vdi)
	// Two hosts, each with one PIF on the management network (purpose nbd).
	require.Len(t, recs, len(s.Pools()[0].Hosts()))
	for i, r := range recs {
		h := s.Pools()[0].Hosts()[i]
		assert.Equal(t, h.IP(), r["address"])
		assert.Equal(t, "/"+uuid+"?session_id="+sess, r["exportname"])
		assert.Equal(t, h.Name, r["subject"])
		port, err := strconv.Atoi(r["port"].(string))
		require.NoError(t, err)
		assert.Equal(t, nbdServiceOf(h).port, port)
		blk, _ := pem.Decode([]byte(r["cert"].(string)))
		require.NotNil(t, blk)
		cert, err := x509.ParseCertificate(blk.Bytes)
		require.NoError(t, err)
		assert.Equal(t, h.Name, cert.Subject.CommonName)
		assert.NoError(t, cert.VerifyHostname(h.IP()))
		assert.Equal(t, r["cert"], ok(t, url, "host.get_server_certificate", sess, h.Ref))
	}

	// No Async form: the call is flagged Session in the datamodel.
	_, f := call(t, url, "Async.VDI.get_nbd_info", sess, vdi)
	require.NotNil(t, f)
	assert.Equal(t, "Fault", f.Code)

	// No network with an NBD purpose: an empty list.
	mgmt := networkByName(t, url, sess, ManagementNetwork)
	ok(t, url, "network.remove_purpose", sess, mgmt, "nbd")
	assert.Empty(t, nbdInfo(t, url, sess, vdi))
	// insecure_nbd on WAN-net: records for the WAN PIFs.
	wan := networkByName(t, url, sess, WANNetwork)
	ok(t, url, "network.add_purpose", sess, wan, "insecure_nbd")
	assert.Len(t, nbdInfo(t, url, sess, vdi), len(s.Pools()[0].Hosts()))

	// cbt_metadata VDIs are refused.
	ok(t, url, "VDI.enable_cbt", sess, vdi)
	snap := ok(t, url, "VDI.snapshot", sess, vdi, map[string]any{}).(string)
	ok(t, url, "VDI.data_destroy", sess, snap)
	_, f = call(t, url, "VDI.get_nbd_info", sess, snap)
	require.NotNil(t, f)
	assert.Equal(t, ErrVDIIncompatibleType, f.Code)
	assert.Equal(t, []string{snap, "cbt_metadata"}, f.Params)
}

func TestNBDExportGoClient(t *testing.T) {
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vdi, uuid := demoVDI(t, url, sess)
	path, err := s.VDIPath(uuid)
	require.NoError(t, err)

	// A snapshot, then a guest write: the snapshot export keeps the old data.
	snap := ok(t, url, "VDI.snapshot", sess, vdi, map[string]any{}).(string)
	snapUUID := ok(t, url, "VDI.get_uuid", sess, snap).(string)
	snapPath, err := s.VDIPath(snapUUID)
	require.NoError(t, err)
	require.NoError(t, s.WriteVDI(uuid, 1<<20, bytes.Repeat([]byte("guest"), 1000)))

	for _, tc := range []struct {
		name, vdi, path string
	}{{"live", vdi, path}, {"snapshot", snap, snapPath}} {
		t.Run(tc.name, func(t *testing.T) {
			want, err := os.ReadFile(tc.path)
			require.NoError(t, err)
			for _, rec := range nbdInfo(t, url, sess, tc.vdi) {
				got, err := readExport(t, rec, true)
				require.NoError(t, err)
				assert.True(t, bytes.Equal(want, got), "export of %s at %s differs from the VDI file", tc.name, rec["address"])
			}
		})
	}
	snapData, err := os.ReadFile(snapPath)
	require.NoError(t, err)
	live, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.False(t, bytes.Equal(snapData, live), "the guest write must only change the live VDI")

	// Every connection has ended: the VDI files it opened are closed.
	require.Eventually(t, func() bool { return openFilesUnder(t, filepath.Dir(path)) == 0 },
		10*time.Second, 10*time.Millisecond, "VDI files left open by the NBD server")

	rec := nbdInfo(t, url, sess, vdi)[0]
	t.Run("bad session refused", func(t *testing.T) {
		bad := copyRec(rec)
		bad["exportname"] = "/" + uuid + "?session_id=OpaqueRef:00000000-0000-0000-0000-000000000000"
		_, err := readExport(t, bad, true)
		require.Error(t, err)
		assert.True(t, errors.Is(err, nbd.ErrPolicy), "got %v", err)
		// After logout the session is no longer valid either.
		url2, sess2 := login(t, s, 0)
		rec2 := nbdInfo(t, url2, sess2, vdi)[0]
		ok(t, url2, "session.logout", sess2)
		_, err = readExport(t, rec2, true)
		assert.ErrorIs(t, err, nbd.ErrPolicy)
	})
	t.Run("session of another pool refused", func(t *testing.T) {
		urlB, sessB := login(t, s, 1)
		require.NotEqual(t, url, urlB)
		other := copyRec(rec)
		other["exportname"] = "/" + uuid + "?session_id=" + sessB
		_, err := readExport(t, other, true)
		assert.ErrorIs(t, err, nbd.ErrPolicy)
	})
	t.Run("unknown VDI", func(t *testing.T) {
		other := copyRec(rec)
		other["exportname"] = "/00000000-0000-0000-0000-000000000000?session_id=" + sess
		_, err := readExport(t, other, true)
		assert.ErrorIs(t, err, nbd.ErrUnknownExport)
	})
	t.Run("TLS required with purpose nbd", func(t *testing.T) {
		_, err := readExport(t, rec, false)
		assert.ErrorIs(t, err, nbd.ErrTLSRequired)
	})
	t.Run("pinning another certificate fails", func(t *testing.T) {
		other := copyRec(rec)
		other["cert"] = nbdInfo(t, url, sess, vdi)[1]["cert"]
		require.NotEqual(t, rec["cert"], other["cert"])
		_, err := readExport(t, other, true)
		assert.Error(t, err)
	})
	t.Run("insecure_nbd serves plain", func(t *testing.T) {
		mgmt := networkByName(t, url, sess, ManagementNetwork)
		ok(t, url, "network.remove_purpose", sess, mgmt, "nbd")
		ok(t, url, "network.add_purpose", sess, mgmt, "insecure_nbd")
		want, err := os.ReadFile(path)
		require.NoError(t, err)
		got, err := readExport(t, rec, false)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(want, got))
		// Without any purpose the listener refuses connections.
		ok(t, url, "network.remove_purpose", sess, mgmt, "insecure_nbd")
		_, err = readExport(t, rec, false)
		assert.Error(t, err)
	})
}

// openFilesUnder counts this process's open descriptors on files in dir.
func openFilesUnder(t *testing.T, dir string) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skip("no /proc/self/fd")
	}
	n := 0
	for _, e := range ents {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", e.Name())); err == nil && strings.HasPrefix(target, dir) {
			n++
		}
	}
	return n
}

func copyRec(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// TestNBDExportLibnbd reads the simulator's exports with nbdinfo and
// nbdcopy (libnbd), with TLS (the returned cert as CA) and without.
func TestNBDExportLibnbd(t *testing.T) {
	nbdinfo := testutil.RequireTool(t, "nbdinfo", "libnbd-bin")
	nbdcopy := testutil.RequireTool(t, "nbdcopy", "libnbd-bin")
	s := startSim(t, "")
	url, sess := login(t, s, 0)
	vdi, uuid := demoVDI(t, url, sess)
	path, err := s.VDIPath(uuid)
	require.NoError(t, err)
	want, err := os.ReadFile(path)
	require.NoError(t, err)

	check := func(t *testing.T, rec map[string]any, tlsDir string) {
		uri := libnbdURI(rec, tlsDir)
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, nbdinfo, "--size", uri).CombinedOutput()
		require.NoError(t, err, "nbdinfo %s: %s", uri, out)
		assert.Equal(t, strconv.Itoa(len(want)), string(bytes.TrimSpace(out)))
		// The allocation map covers the disk and shows its holes.
		out, err = exec.CommandContext(ctx, nbdinfo, "--map", uri).CombinedOutput()
		require.NoError(t, err, "nbdinfo --map %s: %s", uri, out)
		var covered int64
		holes := 0
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			f := strings.Fields(line)
			require.GreaterOrEqual(t, len(f), 3, line)
			n, err := strconv.ParseInt(f[1], 10, 64)
			require.NoError(t, err, line)
			covered += n
			if f[2] == "3" { // hole, zero
				holes++
				off, err := strconv.ParseInt(f[0], 10, 64)
				require.NoError(t, err)
				assert.Equal(t, make([]byte, n), want[off:off+n], "a reported hole must read as zeroes")
			}
		}
		assert.Equal(t, int64(len(want)), covered)
		assert.Positive(t, holes, "the sparse demo disk has holes: %s", out)
		dst := filepath.Join(t.TempDir(), "copy.img")
		out, err = exec.CommandContext(ctx, nbdcopy, uri, dst).CombinedOutput()
		require.NoError(t, err, "nbdcopy %s: %s", uri, out)
		got, err := os.ReadFile(dst)
		require.NoError(t, err)
		assert.True(t, bytes.Equal(want, got), "nbdcopy output differs from the VDI file")
	}

	t.Run("tls", func(t *testing.T) {
		for _, rec := range nbdInfo(t, url, sess, vdi) {
			dir := t.TempDir()
			require.NoError(t, os.WriteFile(filepath.Join(dir, "ca-cert.pem"), []byte(rec["cert"].(string)), 0o600))
			check(t, rec, dir)
		}
	})
	t.Run("bad session refused", func(t *testing.T) {
		rec := copyRec(nbdInfo(t, url, sess, vdi)[0])
		rec["exportname"] = "/" + uuid + "?session_id=OpaqueRef:bad"
		dir := t.TempDir()
		require.NoError(t, os.WriteFile(filepath.Join(dir, "ca-cert.pem"), []byte(rec["cert"].(string)), 0o600))
		out, err := exec.Command(nbdinfo, "--size", libnbdURI(rec, dir)).CombinedOutput()
		assert.Error(t, err, "nbdinfo must fail with a bad session: %s", out)
	})
	t.Run("insecure", func(t *testing.T) {
		mgmt := networkByName(t, url, sess, ManagementNetwork)
		ok(t, url, "network.remove_purpose", sess, mgmt, "nbd")
		ok(t, url, "network.add_purpose", sess, mgmt, "insecure_nbd")
		for _, rec := range nbdInfo(t, url, sess, vdi) {
			check(t, rec, "")
		}
	})
}

// TestNBDCertPersists checks that a host keeps its certificate across a
// restart on the same state dir.
func TestNBDCertPersists(t *testing.T) {
	dir := t.TempDir()
	certs := func() []string {
		s, err := New(Config{StateDir: dir, DiskSize: 4 << 20, FillSize: 1 << 20, Logger: testutil.Logger(t)})
		require.NoError(t, err)
		require.NoError(t, s.Start(context.Background(), "127.0.0.1:0"))
		defer func() { require.NoError(t, s.Close()) }()
		url, sess := login(t, s, 0)
		var out []string
		for _, h := range s.Pools()[0].Hosts() {
			out = append(out, ok(t, url, "host.get_server_certificate", sess, h.Ref).(string))
			_, err := os.Stat(s.HostCertPath(h))
			assert.NoError(t, err)
		}
		return out
	}
	first := certs()
	require.Len(t, first, 2)
	assert.NotEqual(t, first[0], first[1], "each host has its own certificate")
	assert.Equal(t, first, certs())
}

// FuzzNBDExportName feeds client-chosen export names to a host's resolver:
// only a valid "/<uuid>?session_id=<valid session>" opens a VDI.
func FuzzNBDExportName(f *testing.F) {
	s, err := New(Config{StateDir: f.TempDir(), DiskSize: 1 << 20, FillSize: 1 << 16})
	require.NoError(f, err)
	require.NoError(f, s.Start(context.Background(), "127.0.0.1:0"))
	f.Cleanup(func() { _ = s.Close() })
	p := s.Pools()[0]
	h := p.Coordinator()
	p.Lock()
	sess := p.newSession(h.Ref, "root", "fuzz")
	vdi := p.db.all("VDI")[0].str("uuid")
	p.Unlock()
	good := "/" + vdi + "?session_id=" + sess
	for _, seed := range []string{good, "", "/", "/" + vdi, good + "&session_id=x", "%zz", "/../" + vdi + "?session_id=" + sess,
		"//" + vdi + "?session_id=" + sess, "/" + vdi + "?session_id=" + sess + "#frag"} {
		f.Add(seed)
	}
	resolve := s.nbdExports(h)
	f.Fuzz(func(t *testing.T, name string) {
		exp, err := resolve(context.Background(), name)
		if err != nil {
			assert.Nil(t, exp)
			assert.True(t, errors.Is(err, nbd.ErrPolicy) || errors.Is(err, nbd.ErrUnknownExport), "%v", err)
			return
		}
		require.NotNil(t, exp.Release)
		defer exp.Release()
		u, perr := url.Parse(name)
		require.NoError(t, perr)
		assert.Equal(t, "/"+vdi, u.Path)
		assert.Equal(t, sess, u.Query().Get("session_id"))
		assert.True(t, exp.ReadOnly)
	})
}
