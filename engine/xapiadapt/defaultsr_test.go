package xapiadapt

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/internal/testutil"
	"github.com/wanmotion/wanmotion/xapi"
	"github.com/wanmotion/wanmotion/xapi/xapisim"
)

// srSpec is one SR of a test pool layout.
type srSpec struct {
	name      string
	shared    bool
	iso       bool
	free      int64
	plugged   []int // hosts with a currently attached PBD
	unplugged []int // hosts with a PBD that is not attached
}

// simState mirrors the simulator's state.json (only what the tests edit).
type simState struct {
	Version int `json:"version"`
	Pools   []struct {
		Name       string          `json:"name"`
		Gen        int64           `json:"gen"`
		LostBefore int64           `json:"lost_before"`
		Objects    []simObj        `json:"objects"`
		VDIs       json.RawMessage `json:"vdis"`
	} `json:"pools"`
}

type simObj struct {
	Class    string                     `json:"class"`
	Ref      string                     `json:"ref"`
	Created  int64                      `json:"created"`
	Modified int64                      `json:"modified"`
	Fields   map[string]json.RawMessage `json:"fields"`
}

func rawJSON(t *testing.T, v any) json.RawMessage {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	return b
}

// layoutPool starts a one-pool, two-host simulator whose SRs are exactly
// srs (the built-in shared SR is removed) and whose pool.default_SR is the
// SR named defaultSR ("" = unset). It returns the adapter, the host refs in
// order (host 0 is the coordinator) and the SR refs by name.
func layoutPool(t *testing.T, srs []srSpec, defaultSR string) (*Pool, []string, map[string]string) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	cfg := xapisim.Config{StateDir: dir, Pools: 1, HostsPerPool: 2, NoDemoVM: true, Logger: testutil.Logger(t)}
	s, err := xapisim.New(cfg)
	require.NoError(t, err)
	require.NoError(t, s.Close())

	path := filepath.Join(dir, "state.json")
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var st simState
	require.NoError(t, json.Unmarshal(b, &st))
	require.Len(t, st.Pools, 1)
	ps := &st.Pools[0]

	type host struct{ ref, name string }
	var hosts []host
	var poolObj *simObj
	kept := ps.Objects[:0]
	for _, o := range ps.Objects {
		switch o.Class {
		case "SR", "PBD":
			continue // replaced below
		case "host":
			var name string
			require.NoError(t, json.Unmarshal(o.Fields["name_label"], &name))
			hosts = append(hosts, host{o.Ref, name})
		}
		kept = append(kept, o)
	}
	ps.Objects = kept
	for i := range ps.Objects {
		if ps.Objects[i].Class == "pool" {
			poolObj = &ps.Objects[i]
		}
	}
	require.NotNil(t, poolObj)
	require.Len(t, hosts, 2)
	sort.Slice(hosts, func(i, j int) bool { return hosts[i].name < hosts[j].name })
	var master string
	require.NoError(t, json.Unmarshal(poolObj.Fields["master"], &master))
	require.Equal(t, hosts[0].ref, master, "host 0 is the coordinator")

	add := func(class string, fields map[string]any) string {
		ps.Gen++
		ref := xapisim.NewRef()
		o := simObj{Class: class, Ref: ref, Created: ps.Gen, Modified: ps.Gen, Fields: map[string]json.RawMessage{}}
		fields["uuid"] = xapisim.NewUUID()
		for k, v := range fields {
			o.Fields[k] = rawJSON(t, v)
		}
		ps.Objects = append(ps.Objects, o)
		return ref
	}
	byName := map[string]string{}
	for _, sr := range srs {
		typ, content := "ext", "user"
		if sr.iso {
			typ, content = "iso", "iso"
		}
		ref := add("SR", map[string]any{"name_label": sr.name, "type": typ, "content_type": content,
			"shared": sr.shared, "physical_size": sr.free + 1<<30, "physical_utilisation": int64(1 << 30)})
		byName[sr.name] = ref
		for _, h := range sr.plugged {
			add("PBD", map[string]any{"host": hosts[h].ref, "SR": ref, "currently_attached": true})
		}
		for _, h := range sr.unplugged {
			add("PBD", map[string]any{"host": hosts[h].ref, "SR": ref, "currently_attached": false})
		}
	}
	def := "OpaqueRef:NULL"
	if defaultSR != "" {
		def = byName[defaultSR]
		require.NotEmpty(t, def)
	}
	for _, f := range []string{"default_SR", "suspend_image_SR", "crash_dump_SR"} {
		poolObj.Fields[f] = rawJSON(t, def)
	}
	ps.LostBefore = ps.Gen
	b, err = json.Marshal(st)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))

	s, err = xapisim.New(cfg)
	require.NoError(t, err)
	require.NoError(t, s.Start(ctx, "127.0.0.1:0"))
	t.Cleanup(func() { _ = s.Close() })
	info := s.Info()
	c, err := xapi.New(xapi.Config{URL: info.Pools[0].URL, Username: info.Pools[0].Username,
		Password: info.Pools[0].Password, PollInterval: 20 * time.Millisecond})
	require.NoError(t, err)
	require.NoError(t, c.Login(ctx))
	t.Cleanup(func() { _ = c.Close(context.Background()) })

	// The layout really is what the test asks for.
	all, err := c.SRGetAllRecords(ctx)
	require.NoError(t, err)
	require.Len(t, all, len(srs))
	rec, err := c.PoolGetRecord(ctx, mustPool(t, c))
	require.NoError(t, err)
	assert.Equal(t, def, string(rec.DefaultSR))

	return NewPool(c, testutil.Logger(t)), []string{hosts[0].ref, hosts[1].ref}, byName
}

func mustPool(t *testing.T, c *xapi.Client) xapi.PoolRef {
	t.Helper()
	ref, err := c.ThePool(context.Background())
	require.NoError(t, err)
	return ref
}

func TestDefaultSRFor(t *testing.T) {
	const gib = int64(1) << 30
	localEach := []srSpec{
		{name: "local0", free: 1000 * gib, plugged: []int{0}},
		{name: "local1", free: 100 * gib, plugged: []int{1}},
	}
	tests := []struct {
		name      string
		srs       []srSpec
		defaultSR string
		// want[i] is the SR expected for host i ("" = ErrNoSR).
		want [2]string
	}{
		{
			name: "no default SR, a local SR on each host",
			srs:  localEach,
			// The bigger local SR of host 0 must not be chosen for host 1.
			want: [2]string{"local0", "local1"},
		},
		{
			name: "shared SR preferred over a bigger local SR",
			srs: append([]srSpec{{name: "shared", shared: true, free: 10 * gib, plugged: []int{0, 1}}},
				localEach...),
			want: [2]string{"shared", "shared"},
		},
		{
			name:      "default SR local to another host is skipped",
			srs:       localEach,
			defaultSR: "local0",
			want:      [2]string{"local0", "local1"},
		},
		{
			name:      "default SR usable by the host is used even if smaller",
			srs:       localEach,
			defaultSR: "local1",
			want:      [2]string{"local0", "local1"},
		},
		{
			name: "local SR whose PBD is unplugged is not usable",
			srs: []srSpec{
				{name: "local0", free: 1000 * gib, plugged: []int{0}},
				{name: "local1", free: 100 * gib, unplugged: []int{1}},
			},
			want: [2]string{"local0", ""},
		},
		{
			name: "ISO SR and full SR are not usable",
			srs: []srSpec{
				{name: "iso", shared: true, iso: true, free: 1000 * gib, plugged: []int{0, 1}},
				{name: "full", shared: true, free: 0, plugged: []int{0, 1}},
				{name: "local1", free: 100 * gib, plugged: []int{1}},
			},
			want: [2]string{"", "local1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			p, hosts, srs := layoutPool(t, tt.srs, tt.defaultSR)
			for i, host := range hosts {
				got, err := p.DefaultSRFor(ctx, host)
				if tt.want[i] == "" {
					require.ErrorIs(t, err, ErrNoSR, "host %d", i)
					continue
				}
				require.NoError(t, err, "host %d", i)
				assert.Equal(t, srs[tt.want[i]], got, "host %d: want %s", i, tt.want[i])
			}
			// DefaultSR and DefaultSRFor("") choose for the coordinator (host 0).
			for _, f := range []func() (string, error){
				func() (string, error) { return p.DefaultSR(ctx) },
				func() (string, error) { return p.DefaultSRFor(ctx, "") },
			} {
				got, err := f()
				if tt.want[0] == "" {
					require.ErrorIs(t, err, ErrNoSR)
					continue
				}
				require.NoError(t, err)
				assert.Equal(t, srs[tt.want[0]], got)
			}
		})
	}
}
