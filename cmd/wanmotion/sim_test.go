package main

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// startSimCmd runs `wanmotion sim` in-process and returns its first stdout
// line decoded, and a stop function that waits for it to exit.
func startSimCmd(t *testing.T, args ...string) (xapisim.Info, func() error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	errc := make(chan error, 1)
	go func() {
		err := runSim(ctx, args, pw, io.Discard)
		_ = pw.CloseWithError(io.EOF)
		errc <- err
	}()
	line, err := bufio.NewReader(pr).ReadString('\n')
	require.NoError(t, err)
	go func() { _, _ = io.Copy(io.Discard, pr) }()
	var info xapisim.Info
	require.NoError(t, json.Unmarshal([]byte(line), &info), line)
	stopped := false
	stop := func() error {
		if stopped {
			return nil
		}
		stopped = true
		cancel()
		select {
		case err := <-errc:
			return err
		case <-time.After(20 * time.Second):
			return context.DeadlineExceeded
		}
	}
	t.Cleanup(func() { _ = stop() })
	return info, stop
}

// simRPC posts a call with untyped string params and returns the body.
func simRPC(t *testing.T, url, method string, params ...string) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("<methodCall><methodName>" + method + "</methodName><params>")
	for _, p := range params {
		b.WriteString("<param><value>" + p + "</value></param>")
	}
	b.WriteString("</params></methodCall>")
	resp, err := http.Post(url, "text/xml", strings.NewReader(b.String()))
	require.NoError(t, err)
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	return string(body)
}

// simValue extracts the Value of a Success response holding a plain string.
func simValue(t *testing.T, body string) string {
	t.Helper()
	const pre = "<name>Value</name><value>"
	i := strings.Index(body, pre)
	require.GreaterOrEqual(t, i, 0, body)
	rest := body[i+len(pre):]
	return rest[:strings.Index(rest, "<")]
}

func TestSimCommand(t *testing.T) {
	dir := t.TempDir()
	args := []string{"--listen", "127.0.0.1:0", "--pools", "2", "--state-dir", dir, "--disk-size", "8MiB", "--fill-size", "1MiB", "--memory-size", "256MiB"}
	info, stop := startSimCmd(t, args...)
	require.Len(t, info.Pools, 2)
	assert.Equal(t, "site-a", info.Pools[0].Name)
	assert.Equal(t, "site-b", info.Pools[1].Name)
	for _, p := range info.Pools {
		require.Len(t, p.Hosts, 2)
		assert.Equal(t, p.URL, p.Hosts[0].URL)
		assert.NotEqual(t, p.Hosts[0].URL, p.Hosts[1].URL)
		assert.NotEmpty(t, p.Password)
	}
	a := info.Pools[0]
	sess := simValue(t, simRPC(t, a.URL, "session.login_with_password", a.Username, a.Password))
	require.True(t, strings.HasPrefix(sess, "OpaqueRef:"))
	body := simRPC(t, a.URL, "VM.get_by_name_label", sess, "demo-vm")
	vm := simValue(t, strings.Replace(body, "<value><array><data>", "", 1))
	assert.Contains(t, simRPC(t, a.URL, "VM.get_memory_static_max", sess, vm), "<value>268435456</value>")
	assert.Contains(t, simRPC(t, a.URL, "VM.pause", sess, vm), "Success")
	// Both pools have the WAN network by name.
	for _, p := range info.Pools {
		s := simValue(t, simRPC(t, p.URL, "session.login_with_password", p.Username, p.Password))
		assert.Contains(t, simRPC(t, p.URL, "network.get_by_name_label", s, "WAN-net"), "OpaqueRef:")
	}
	require.NoError(t, stop())

	info2, stop2 := startSimCmd(t, args...)
	a = info2.Pools[0]
	sess = simValue(t, simRPC(t, a.URL, "session.login_with_password", a.Username, a.Password))
	assert.Contains(t, simRPC(t, a.URL, "VM.get_power_state", sess, vm), "<value>Paused</value>", "state survives a restart")
	require.NoError(t, stop2())
}

func TestSimCommandUsage(t *testing.T) {
	err := runSim(context.Background(), []string{"--pools", "1"}, io.Discard, io.Discard)
	require.ErrorIs(t, err, errUsage)
	err = runSim(context.Background(), []string{"--state-dir", t.TempDir(), "--disk-size", "lots"}, io.Discard, io.Discard)
	require.ErrorIs(t, err, errUsage)
}

func TestParseByteSize(t *testing.T) {
	for in, want := range map[string]int64{"1GiB": 1 << 30, "512MiB": 512 << 20, "64K": 64 << 10, "4096": 4096, "2 GiB": 2 << 30} {
		got, err := parseByteSize(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	_, err := parseByteSize("-1")
	assert.Error(t, err)
}

func TestSimCommandGuest(t *testing.T) {
	args := []string{"--listen", "127.0.0.1:0", "--state-dir", t.TempDir(), "--disk-size", "8MiB", "--fill-size", "1MiB",
		"--memory-size", "16MiB", "--guest-rate", "2MiB/s", "--guest-pattern", "hot-set", "--guest-dirty-rate", "1MiB/s"}
	info, stop := startSimCmd(t, args...)
	a := info.Pools[0]
	sess := simValue(t, simRPC(t, a.URL, "session.login_with_password", a.Username, a.Password))
	body := simRPC(t, a.URL, "VM.get_by_name_label", sess, "demo-vm")
	vm := simValue(t, strings.Replace(body, "<value><array><data>", "", 1))
	require.Eventually(t, func() bool {
		st := simRPC(t, a.URL, "sim.guest_stats", sess, vm)
		return strings.Contains(st, "<name>pattern</name><value>hot-set</value>") &&
			!strings.Contains(st, "<name>writes</name><value>0</value>")
	}, 10*time.Second, 20*time.Millisecond)
	assert.Contains(t, simRPC(t, a.URL, "sim.guest_verify", sess, vm), "<name>ok</name><value>true</value>")
	require.NoError(t, stop())

	err := runSim(context.Background(), []string{"--state-dir", t.TempDir(), "--guest-pattern", "zigzag"}, io.Discard, io.Discard)
	require.ErrorIs(t, err, errUsage)
	err = runSim(context.Background(), []string{"--state-dir", t.TempDir(), "--guest-rate", "fast"}, io.Discard, io.Discard)
	require.ErrorIs(t, err, errUsage)
}
