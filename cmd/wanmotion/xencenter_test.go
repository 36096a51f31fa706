package main

import (
	"context"
	"encoding/xml"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xencenter"
)

// The manifest as XenCenter's plugin loader reads it (XenAdmin/Plugins).
type xcPlugin struct {
	XMLName xml.Name `xml:"http://www.citrix.com/XenCenter/Plugins/schema XenCenterPlugin"`
	Version string   `xml:"version,attr"`
	Items   []struct {
		Name        string `xml:"name,attr"`
		Menu        string `xml:"menu,attr"`
		ContextMenu string `xml:"contextmenu,attr"`
		Serialized  string `xml:"serialized,attr"`
		Label       string `xml:"label,attr"`
		Shell       []struct {
			Filename        string `xml:"filename,attr"`
			Param           string `xml:"param,attr"`
			Window          string `xml:"window,attr"`
			RequiredMethods string `xml:"required_methods,attr"`
		} `xml:"Shell"`
		Other []struct {
			XMLName xml.Name
		} `xml:",any"`
	} `xml:"MenuItem"`
}

func TestXenCenterManifest(t *testing.T) {
	b, err := os.ReadFile("../../packaging/xencenter/WanMotion/WanMotion.xcplugin.xml")
	require.NoError(t, err)
	var p xcPlugin
	require.NoError(t, xml.Unmarshal(b, &p))
	assert.Contains(t, []string{"1", "1.0.0.0", "2"}, p.Version, "versions XenCenter accepts")
	require.Len(t, p.Items, 1)
	it := p.Items[0]
	assert.Equal(t, "vm", it.Menu)
	assert.Equal(t, "vm", it.ContextMenu)
	assert.Equal(t, "obj", it.Serialized)
	assert.NotEmpty(t, it.Label)
	require.Len(t, it.Shell, 1, "exactly one Shell child")
	for _, o := range it.Other {
		assert.Equal(t, "Shell", o.XMLName.Local, "no other child element")
	}
	sh := it.Shell[0]
	assert.True(t, strings.HasSuffix(strings.ToLower(sh.Filename), `\wanmotion-xencenter.exe`), sh.Filename)
	params := strings.Split(sh.Param, ",")
	_, ok := commands()[params[0]]
	require.True(t, ok, "the manifest runs an existing command: %q", params[0])
	assert.Equal(t, "xencenter", params[0])
	assert.Len(t, params, 1, "XenCenter appends <url> <session> VM <uuid> itself")
	assert.Contains(t, sh.RequiredMethods, "host.call_plugin")
}

// TestXenCenterCommand runs what XenCenter runs, against the simulator
// with the plugin installed: answers on the prompt, XenCenter's session.
func TestXenCenterCommand(t *testing.T) {
	e := newPluginEnv(t)
	ctx := context.Background()
	vms, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	vm, err := e.src.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	pb := e.info.Pools[1]

	oldIn, oldPW := xencenter.Stdin, xencenter.ReadPassword
	t.Cleanup(func() { xencenter.Stdin, xencenter.ReadPassword = oldIn, oldPW })
	var prompted string
	xencenter.ReadPassword = func(p string, w io.Writer) (string, error) { prompted = p; return pb.Password, nil }
	// URL, user (default), SR (default), network map (default).
	xencenter.Stdin = strings.NewReader(pb.URL + "\n\n\n\n")

	session := string(e.src.Session())
	// As the manifest runs it: "xencenter" then XenCenter's four arguments.
	out, stderr, err := run(t, runXencenter, "xencenter", "--no-wait", e.info.Pools[0].URL, session, "VM", vm.UUID)
	require.NoError(t, err, stderr)
	task := strings.TrimSpace(out)
	require.True(t, strings.HasPrefix(task, "OpaqueRef:"), "stdout is the task: %q", out)
	assert.Contains(t, prompted, pb.URL)
	assert.NotContains(t, stderr, pb.Password)
	assert.NotContains(t, stderr, session, "the session is never printed")

	rec, err := e.src.TaskGetRecord(ctx, xapi.TaskRef(task))
	require.NoError(t, err)
	assert.Equal(t, "VM.migrate_send", rec.NameLabel)
	assert.Contains(t, rec.OtherConfig["applies_to"], string(vms[0]))
	_, err = e.src.VMGetAll(ctx)
	require.NoError(t, err, "XenCenter's session is still valid (never logged out)")
	waitTaskEnd(t, e.src, task)

	for _, bad := range [][]string{
		{e.info.Pools[0].URL, session, "VM"},
		{e.info.Pools[0].URL, session, "host", vm.UUID},
		{e.info.Pools[0].URL, "root", "VM", vm.UUID},
	} {
		_, _, err := run(t, runXencenter, bad...)
		require.ErrorIs(t, err, errUsage, "%v", bad)
	}

	xencenter.Stdin = strings.NewReader("\n")
	_, _, err = run(t, runXencenter, "--no-wait", e.info.Pools[0].URL, session, "VM", vm.UUID)
	require.ErrorIs(t, err, errUsage, "no destination")
}

// TestXenCenterCommandFollowsToTheEnd: the window follows the task to its
// end even when the controller destroys it at once (task_linger 0): the
// plugin's status then says how it ended.
func TestXenCenterCommandFollowsToTheEnd(t *testing.T) {
	e := newPluginEnv(t) // backends that exit at once: the migration fails in prepare
	e.setConf(t, "task_linger = 0\n")
	ctx := context.Background()
	vms, err := e.src.VMGetByNameLabel(ctx, "demo-vm")
	require.NoError(t, err)
	vm, err := e.src.VMGetRecord(ctx, vms[0])
	require.NoError(t, err)
	pb := e.info.Pools[1]
	oldIn, oldPW := xencenter.Stdin, xencenter.ReadPassword
	t.Cleanup(func() { xencenter.Stdin, xencenter.ReadPassword = oldIn, oldPW })
	xencenter.ReadPassword = func(string, io.Writer) (string, error) { return pb.Password, nil }
	xencenter.Stdin = strings.NewReader(pb.URL + "\n\n\n\n")
	out, stderr, err := run(t, runXencenter, e.info.Pools[0].URL, string(e.src.Session()), "VM", vm.UUID)
	require.Error(t, err, "the migration failed: %s", stderr)
	assert.Contains(t, err.Error(), "migration failure")
	assert.Contains(t, err.Error(), "WANMOTION_MIGRATION_FAILED")
	task := strings.TrimSpace(out)
	require.True(t, strings.HasPrefix(task, "OpaqueRef:"), out)
	require.Eventually(t, func() bool {
		_, err := e.src.TaskGetRecord(ctx, xapi.TaskRef(task))
		return xapi.IsCode(err, xapi.CodeHandleInvalid)
	}, 30*time.Second, 100*time.Millisecond, "the controller destroyed its task")
}
