package engine

import (
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vmihailenco/msgpack/v5"
)

func TestPhaseNamesAndTransitions(t *testing.T) {
	t.Parallel()
	for p := PhasePlan; p <= PhaseFailed; p++ {
		q, err := ParsePhase(p.String())
		require.NoError(t, err)
		assert.Equal(t, p, q)
		if !p.Stopped() {
			assert.NotEmpty(t, transitions[p], "%s has no way out", p)
		}
	}
	_, err := ParsePhase("unknown")
	require.Error(t, err)
	assert.Equal(t, "phase(200)", Phase(200).String())

	cases := []struct {
		from, to Phase
		ok       bool
	}{
		{PhasePlan, PhasePrepare, true},
		{PhaseSeed, PhaseHandoff, true},
		{PhaseSeed, PhaseRollingBack, true},
		{PhaseHandoff, PhaseRollingBack, false}, // forward-only from Handoff
		{PhaseSwitch, PhaseRollingBack, false},
		{PhaseHandoff, PhaseSwitch, true},
		{PhaseHandoff, PhaseFailed, true},
		{PhasePlan, PhaseSeed, false},
		{PhaseDone, PhasePlan, false},
		{PhaseRolledBack, PhasePlan, false},
		{PhaseFailed, PhaseHandoff, true},
		{PhaseFailed, PhaseSeed, false},
		{PhaseRollingBack, PhaseRolledBack, true},
	}
	for _, tc := range cases {
		assert.Equal(t, tc.ok, CanTransition(tc.from, tc.to), "%s -> %s", tc.from, tc.to)
	}
	// Nothing at or after Handoff leads to a rollback except through Failed+Abort.
	for p := PhaseHandoff; p <= PhaseCleanup; p++ {
		assert.False(t, CanTransition(p, PhaseRollingBack), p.String())
	}
}

func TestDecide(t *testing.T) {
	t.Parallel()
	const L = 100_000_000 // 100 MB/s
	r := func(changed int64, secs float64) RoundStat { return RoundStat{ChangedBytes: changed, Seconds: secs} }
	base := ConvergeInput{LinkBytesPerSec: L, DowntimeTarget: time.Second, MinShrink: 0.1, MaxRounds: 5, Policy: PolicyKeepGoing}
	cases := []struct {
		name     string
		rounds   []RoundStat
		policy   ConvergencePolicy
		throttle int // percent in force
		want     Action
		reason   string
	}{
		{"nothing yet", nil, "", 0, ActionContinue, "no round"},
		{"after the full copy", []RoundStat{r(10e9, 100)}, "", 0, ActionContinue, "measuring"},
		{"delta under threshold", []RoundStat{r(10e9, 100), r(50e6, 1)}, "", 0, ActionHandoff, "converged"},
		{"delta exactly threshold", []RoundStat{r(10e9, 100), r(100e6, 1)}, "", 0, ActionHandoff, "converged"},
		{"shrinking", []RoundStat{r(10e9, 100), r(2e9, 20), r(500e6, 5)}, "", 0, ActionContinue, "shrinking"},
		{"stopped shrinking", []RoundStat{r(10e9, 100), r(2e9, 20), r(1.9e9, 19)}, "", 0, ActionHandoff, "stopped shrinking"},
		{"grew", []RoundStat{r(10e9, 100), r(1e9, 20), r(1.2e9, 24)}, "", 0, ActionHandoff, "stopped shrinking"},
		{"round cap", []RoundStat{r(10e9, 100), r(5e9, 50), r(2e9, 20), r(1e9, 10), r(500e6, 5), r(200e6, 2)}, "", 0, ActionHandoff, "round cap 5"},
		// guest writes 8e9 bytes during a 50 s round: 160 MB/s > 100 MB/s link
		{"diverging keep-going", []RoundStat{r(5e9, 50), r(8e9, 80)}, PolicyKeepGoing, 0, ActionContinue, "keep going"},
		{"diverging keep-going at cap", []RoundStat{r(5e9, 50), r(8e9, 80), r(9e9, 90), r(9e9, 90), r(9e9, 90), r(9e9, 90)}, PolicyKeepGoing, 0, ActionHandoff, "round cap 5 reached while"},
		{"diverging stop", []RoundStat{r(5e9, 50), r(8e9, 80)}, PolicyStop, 0, ActionStop, "faster than the link"},
		{"diverging throttle", []RoundStat{r(5e9, 50), r(8e9, 80)}, PolicyThrottle, 0, ActionThrottle, "throttling its vCPUs by 20%"},
		{"diverging throttled once", []RoundStat{r(5e9, 50), r(8e9, 80), r(9e9, 90)}, PolicyThrottle, 20, ActionThrottle, "by 30%"},
		{"diverging at the maximum throttle", []RoundStat{r(5e9, 50), r(8e9, 80), r(9e9, 90)}, PolicyThrottle, 90, ActionContinue, "maximum throttle (90%); keep going"},
		{"diverging throttle at the round cap", []RoundStat{r(5e9, 50), r(8e9, 80), r(9e9, 90), r(9e9, 90), r(9e9, 90), r(9e9, 90)}, PolicyThrottle, 40, ActionHandoff, "round cap 5 reached while"},
		{"stopped shrinking throttle", []RoundStat{r(10e9, 100), r(2e9, 20), r(1.9e9, 19)}, PolicyThrottle, 0, ActionThrottle, "stopped shrinking"},
		{"shrinking too slowly for the round cap", []RoundStat{r(10e9, 100), r(2e9, 20), r(1.5e9, 15)}, PolicyThrottle, 20, ActionThrottle, "shrinks too slowly"},
		{"shrinking fast enough", []RoundStat{r(10e9, 100), r(2e9, 20), r(400e6, 4)}, PolicyThrottle, 20, ActionContinue, "delta shrinking"},
		{"shrinking slowly, keep-going", []RoundStat{r(10e9, 100), r(2e9, 20), r(1.5e9, 15)}, PolicyKeepGoing, 0, ActionContinue, "delta shrinking"},
		{"stopped shrinking at the maximum throttle", []RoundStat{r(10e9, 100), r(2e9, 20), r(1.9e9, 19)}, PolicyThrottle, 90, ActionHandoff, "stopped shrinking"},
		{"write rate equals link", []RoundStat{r(1e9, 10), r(1e9, 10)}, PolicyStop, 0, ActionStop, "faster"},
		{"slow writer large delta", []RoundStat{r(10e9, 100), r(5e9, 100)}, PolicyStop, 0, ActionContinue, "shrinking"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			in := base
			in.Rounds, in.ThrottlePercent = tc.rounds, tc.throttle
			if tc.policy != "" {
				in.Policy = tc.policy
			}
			d := Decide(in)
			assert.Equal(t, tc.want.String(), d.Action.String(), d.Reason)
			assert.Contains(t, d.Reason, tc.reason)
			assert.Equal(t, int64(100e6), d.ThresholdBytes)
			if tc.want == ActionStop {
				assert.Contains(t, d.Advice, "convergence_policy keep-going")
				assert.NotContains(t, d.Advice, "suspend", "no advice to use a mode that does not exist")
			}
			if tc.want == ActionThrottle {
				assert.Equal(t, nextThrottle(in), d.ThrottlePercent)
				assert.Greater(t, d.ThrottlePercent, tc.throttle)
			} else {
				assert.Zero(t, d.ThrottlePercent)
			}
		})
	}
}

func TestNextThrottleSteps(t *testing.T) {
	t.Parallel()
	cases := []struct {
		now, initial, step, max, want int
	}{
		{0, 0, 0, 0, DefaultThrottleInitial},
		{20, 0, 0, 0, 30},
		{85, 0, 0, 0, DefaultThrottleMax},
		{90, 0, 0, 0, 0},
		{0, 0, 0, 10, 10},   // the maximum caps the first step
		{50, 0, 0, 50, 0},   // at a lowered maximum
		{0, 30, 25, 99, 30}, // custom steps
		{30, 30, 25, 99, 55},
	}
	for _, tc := range cases {
		got := nextThrottle(ConvergeInput{ThrottlePercent: tc.now, ThrottleInitial: tc.initial, ThrottleStep: tc.step, ThrottleMax: tc.max})
		assert.Equal(t, tc.want, got, "%+v", tc)
	}
}

func TestChangedBytesMSBFirst(t *testing.T) {
	t.Parallel()
	bm := []byte{0x80, 0x01} // block 0 and block 15
	assert.Equal(t, int64(2*CBTBlockSize), ChangedBytes(bm, 0))
	assert.Equal(t, 2, popcount(bm))
	// a disk of 15.5 blocks: block 15 is half a block
	assert.Equal(t, int64(CBTBlockSize+CBTBlockSize/2), ChangedBytes(bm, 15*CBTBlockSize+CBTBlockSize/2))
	// bits beyond the disk are ignored
	assert.Equal(t, int64(CBTBlockSize), ChangedBytes(bm, CBTBlockSize))
	b, err := DecodeCBTBitmap(base64.StdEncoding.EncodeToString(bm))
	require.NoError(t, err)
	assert.Equal(t, bm, b)
	_, err = DecodeCBTBitmap("!!")
	require.Error(t, err)
}

func TestRewriteURL(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, raw, base, want string
		wantErr               bool
	}{
		{"SM", "http://10.0.0.2/services/SM?session_id=OpaqueRef%3Aabc", "http://127.0.0.1:4000", "http://127.0.0.1:4000/services/SM?session_id=OpaqueRef%3Aabc", false},
		{"unescaped colon kept", "http://10.0.0.2/services/xenops?session_id=OpaqueRef:abc-1", "http://127.0.0.1:4000", "http://127.0.0.1:4000/services/xenops?session_id=OpaqueRef:abc-1", false},
		{"master root", "http://10.0.0.1/", "http://127.0.0.1:4001", "http://127.0.0.1:4001/", false},
		{"master no slash", "http://10.0.0.1", "http://127.0.0.1:4001", "http://127.0.0.1:4001", false},
		{"https upgraded to gateway scheme", "https://10.0.0.2:443/services/SM?a=1&b=2", "http://127.0.0.1:9", "http://127.0.0.1:9/services/SM?a=1&b=2", false},
		{"ipv6 source", "http://[2001:db8::2]/services/SM?session_id=x", "http://127.0.0.1:4000", "http://127.0.0.1:4000/services/SM?session_id=x", false},
		{"ipv6 gateway", "http://10.0.0.2/services/SM", "http://[::1]:4000", "http://[::1]:4000/services/SM", false},
		{"escaped path kept", "http://h/a%2Fb?x=%20", "https://gw:1", "https://gw:1/a%2Fb?x=%20", false},
		{"userinfo dropped", "http://u:p@h/p", "http://gw:1", "http://gw:1/p", false},
		{"no host", "/services/SM", "http://gw:1", "", true},
		{"base with path", "http://h/p", "http://gw:1/x", "", true},
		{"base with query", "http://h/p", "http://gw:1?x=1", "", true},
		{"base without scheme", "http://h/p", "gw:1", "", true},
		{"bad url", "http://[::1/p", "http://gw:1", "", true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := RewriteURL(tc.raw, tc.base)
			if tc.wantErr {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestURLTarget(t *testing.T) {
	t.Parallel()
	cases := map[string]string{
		"http://10.0.0.2/services/SM": "10.0.0.2:80",
		"https://10.0.0.2/x":          "10.0.0.2:443",
		"http://h:8080/":              "h:8080",
		"http://[2001:db8::1]/":       "[2001:db8::1]:80",
	}
	for in, want := range cases {
		got, err := URLTarget(in)
		require.NoError(t, err, in)
		assert.Equal(t, want, got, in)
	}
	for _, bad := range []string{"ftp://h/", "/x", "http://:80/"} {
		_, err := URLTarget(bad)
		require.Error(t, err, bad)
	}
}

func TestRewriteDest(t *testing.T) {
	t.Parallel()
	dest := map[string]string{
		"SM": "http://10.0.0.2/services/SM?session_id=OpaqueRef%3As", "xenops": "http://10.0.0.2/services/xenops?session_id=OpaqueRef%3As",
		"master": "http://10.0.0.1/", "host": "OpaqueRef:h", "session_id": "OpaqueRef:s",
	}
	asked := map[string]int{}
	out, err := RewriteDest(dest, func(target string) (string, error) {
		asked[target]++
		if target == "10.0.0.1:80" {
			return "127.0.0.1:7001", nil
		}
		return "127.0.0.1:7002", nil
	})
	require.NoError(t, err)
	assert.Equal(t, map[string]int{"10.0.0.1:80": 1, "10.0.0.2:80": 1}, asked, "one forward per target")
	assert.Equal(t, "http://127.0.0.1:7002/services/SM?session_id=OpaqueRef%3As", out["SM"])
	assert.Equal(t, "http://127.0.0.1:7002/services/xenops?session_id=OpaqueRef%3As", out["xenops"])
	assert.Equal(t, "http://127.0.0.1:7001/", out["master"])
	assert.Equal(t, "OpaqueRef:h", out["host"])
	assert.Equal(t, "OpaqueRef:s", out["session_id"])
	assert.Equal(t, "http://10.0.0.1/", dest["master"], "input untouched")

	// https stays https through the tunnel
	dest["SM"] = "https://10.0.0.2/services/SM?session_id=x"
	out, err = RewriteDest(dest, func(string) (string, error) { return "[::1]:9", nil })
	require.NoError(t, err)
	assert.Equal(t, "https://[::1]:9/services/SM?session_id=x", out["SM"])
	_, err = RewriteDest(dest, func(string) (string, error) { return "http://127.0.0.1:1", nil })
	require.ErrorContains(t, err, "local end")

	delete(dest, "xenops")
	_, err = RewriteDest(dest, func(string) (string, error) { return "127.0.0.1:1", nil })
	require.ErrorContains(t, err, "xenops")
	dest["xenops"] = "http://10.0.0.2/x"
	_, err = RewriteDest(dest, func(string) (string, error) { return "", assert.AnError })
	require.ErrorIs(t, err, assert.AnError)
}

func sampleCheckpoint() *Checkpoint {
	bw := int64(25_000_000)
	pol := PolicyThrottle
	return &Checkpoint{
		Version: CheckpointVersion, MigrationID: "wm-abc", Phase: PhaseSeed, Error: "e", ErrorInfo: []string{"A", "b"},
		CreatedUnixNano: 1, UpdatedUnixNano: 2,
		Request: RequestState{VMUUID: "u", SRMap: map[string]string{"a": "b"}, NetworkMap: map[string]string{"*": "n"},
			MigrateOptions: map[string]string{"force": "true"}, Overrides: Overrides{BandwidthBytesPerSec: &bw, Policy: &pol}},
		Settings: Settings{Storage: "nbd", Network: "none", Streams: 4, DowntimeTarget: time.Second, Policy: PolicyKeepGoing, MaxRounds: 8, MinShrink: 0.1},
		Plan:     Estimate{LinkBytesPerSec: 1, SeedRounds: 3, Converges: true},
		VMRef:    "OpaqueRef:vm", Disks: []DiskState{{Disk: Disk{VDIRef: "r", VDIUUID: "u", VirtualSize: 10}, ReplicaRef: "x",
			ReceiverState: []byte{1, 2, 3}, SenderState: []byte{4}, ReceiverEndpoint: []byte("e"), PeerAddress: "127.0.0.1:1", Snapshots: []SnapshotState{{Round: 0, Ref: "s0", ContentID: "c0", DataDestroyed: true}}}},
		VIFs: []VIF{{Ref: "v", MAC: "m"}}, VIFMap: map[string]string{"v": "n"},
		Task: "OpaqueRef:t", TaskCreated: true,
		Seed:    SeedState{Round: 1, Rounds: []RoundStat{{Round: 0, ChangedBytes: 5, Seconds: 1.5}}, Throttled: true},
		Handoff: HandoffState{SendIntent: true, Task: "t2"},
		Net:     NetState{Prepared: true, State: []byte("s")},
		Timings: map[string]float64{"plan": 1.5}, Integrity: IntegrityOK, Stats: GatewayStats{BytesOffered: 9, BytesOnWire: 3},
	}
}

func TestCheckpointRoundTrip(t *testing.T) {
	t.Parallel()
	c := sampleCheckpoint()
	b, err := EncodeCheckpoint(c)
	require.NoError(t, err)
	got, err := DecodeCheckpoint(b)
	require.NoError(t, err)
	assert.Equal(t, c, got)

	// named keys, not positional arrays
	var m map[string]any
	require.NoError(t, msgpack.Unmarshal(b, &m))
	assert.Contains(t, m, "migration_id")
	assert.Contains(t, m, "phase")
	assert.EqualValues(t, CheckpointVersion, m["version"])

	// unknown fields of the same version are ignored (forward-compatible additions)
	m["added_later"] = "x"
	b2, err := msgpack.Marshal(m)
	require.NoError(t, err)
	got2, err := DecodeCheckpoint(b2)
	require.NoError(t, err)
	assert.Equal(t, c.MigrationID, got2.MigrationID)
}

func TestCheckpointVersionTooNew(t *testing.T) {
	t.Parallel()
	c := sampleCheckpoint()
	c.Version = CheckpointVersion + 1
	b, err := EncodeCheckpoint(c)
	require.NoError(t, err)
	_, err = DecodeCheckpoint(b)
	require.ErrorIs(t, err, ErrCheckpointVersion)

	c.Version = 0
	b, err = EncodeCheckpoint(c)
	require.NoError(t, err)
	_, err = DecodeCheckpoint(b)
	require.ErrorIs(t, err, ErrCheckpointCorrupt)
	_, err = DecodeCheckpoint([]byte{0xc1})
	require.ErrorIs(t, err, ErrCheckpointCorrupt)
}

func FuzzDecodeCheckpoint(f *testing.F) {
	b, err := EncodeCheckpoint(sampleCheckpoint())
	require.NoError(f, err)
	f.Add(b)
	f.Add([]byte{})
	f.Add([]byte{0x80})
	f.Add(b[:len(b)/2])
	m, _ := msgpack.Marshal(map[string]any{"version": 1, "migration_id": "x", "phase": 3, "disks": "nope"})
	f.Add(m)
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := DecodeCheckpoint(data)
		if err != nil {
			return
		}
		require.LessOrEqual(t, c.Version, CheckpointVersion)
		require.True(t, c.Phase.Valid())
		// whatever decodes must re-encode and decode to the same thing
		b, err := EncodeCheckpoint(c)
		require.NoError(t, err)
		c2, err := DecodeCheckpoint(b)
		require.NoError(t, err)
		require.Equal(t, c.MigrationID, c2.MigrationID)
		_ = BuildReport(c)
	})
}

func TestFileStore(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "state")
	s, err := NewFileStore(dir)
	require.NoError(t, err)
	ctx := context.Background()
	_, err = s.Load(ctx, "wm-none")
	require.ErrorIs(t, err, ErrNotFound)
	c := sampleCheckpoint()
	require.NoError(t, s.Save(ctx, c))
	c.Phase = PhaseHandoff
	require.NoError(t, s.Save(ctx, c))
	got, err := s.Load(ctx, c.MigrationID)
	require.NoError(t, err)
	assert.Equal(t, PhaseHandoff, got.Phase)
	ids, err := s.List(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"wm-abc"}, ids)
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	assert.Len(t, ents, 1, "no temp files left")
	st, err := os.Stat(dir)
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o700), st.Mode().Perm())

	for _, bad := range []string{"../x", "a/b", "", ".hidden", strings.Repeat("a", 200)} {
		c.MigrationID = bad
		require.Error(t, s.Save(ctx, c), bad)
	}
	// a newer-version file is refused with a clear error
	require.NoError(t, os.WriteFile(filepath.Join(dir, "wm-new.ckpt"), mustEncode(t, 99), 0o600))
	_, err = s.Load(ctx, "wm-new")
	require.ErrorIs(t, err, ErrCheckpointVersion)
}

func TestFileStoreLock(t *testing.T) {
	t.Parallel()
	s, err := NewFileStore(t.TempDir())
	require.NoError(t, err)
	ctx := context.Background()
	unlock, err := s.Lock(ctx, "wm-a")
	require.NoError(t, err)
	// flock locks are per open file description: a second open conflicts
	_, err = s.Lock(ctx, "wm-a")
	require.ErrorIs(t, err, ErrLocked)
	u2, err := s.Lock(ctx, "wm-b")
	require.NoError(t, err)
	u2()
	unlock()
	u3, err := s.Lock(ctx, "wm-a")
	require.NoError(t, err)
	u3()
	_, err = s.Lock(ctx, "../x")
	require.Error(t, err)
	ids, err := s.List(ctx)
	require.NoError(t, err)
	assert.Empty(t, ids, "lock files are not checkpoints")
}

func TestMemStore(t *testing.T) {
	t.Parallel()
	s := NewMemStore()
	ctx := context.Background()
	_, err := s.Load(ctx, "wm-x")
	require.ErrorIs(t, err, ErrNotFound)
	c := sampleCheckpoint()
	require.NoError(t, s.Save(ctx, c))
	got, err := s.Load(ctx, c.MigrationID)
	require.NoError(t, err)
	assert.Equal(t, c, got)
	c.Phase = PhaseDone
	assert.Equal(t, PhaseSeed, got.Phase, "stored by value")
	ids, err := s.List(ctx)
	require.NoError(t, err)
	assert.Equal(t, []string{"wm-abc"}, ids)
}

func mustEncode(t *testing.T, version int) []byte {
	c := sampleCheckpoint()
	c.Version = version
	b, err := EncodeCheckpoint(c)
	require.NoError(t, err)
	return b
}

func TestParseBandwidth(t *testing.T) {
	t.Parallel()
	cases := []struct {
		in      string
		want    int64
		wantErr bool
	}{
		{"200Mbit", 25_000_000, false},
		{"200mbit", 25_000_000, false},
		{"1Gbps", 125_000_000, false},
		{"1gbit/s", 125_000_000, false},
		{"50MB/s", 50_000_000, false},
		{"50MiB/s", 50 << 20, false},
		{"1.5GB", 1_500_000_000, false},
		{"800000", 100_000, false}, // bare: bits per second
		{"10 Mbit", 1_250_000, false},
		{"unlimited", 0, false},
		{"0", 0, false},
		{"", 0, true},
		{"-5Mbit", 0, true},
		{"fast", 0, true},
		{"5mb", 0, true}, // ambiguous: bits or bytes?
		{"NaNMbit", 0, true},
		{"1e400Mbit", 0, true},
		{"4bit", 0, true}, // under 1 byte/s
	}
	for _, tc := range cases {
		got, err := ParseBandwidth(tc.in)
		if tc.wantErr {
			require.ErrorIs(t, err, ErrConfig, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, got, tc.in)
	}
}

func TestParsePoolConfig(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		oc      map[string]string
		check   func(t *testing.T, o Overrides)
		wantErr string
	}{
		{"empty", map[string]string{}, func(t *testing.T, o Overrides) { assert.Equal(t, Overrides{}, o) }, ""},
		{"backends only", map[string]string{KeyStorage: " drbd ", KeyNetwork: "l2tunnel", "xo:other": "x"}, func(t *testing.T, o Overrides) {
			assert.Equal(t, "drbd", *o.Storage)
			assert.Equal(t, "l2tunnel", *o.Network)
		}, ""},
		{"full config", map[string]string{KeyConfig: `{"bandwidth":"200Mbit","streams":8,"compression":"none","gateway_listen":"0.0.0.0:7000","gateway_advertise":"gw.example:7000","downtime_target":"500ms","convergence_policy":"throttle","max_rounds":4,"min_shrink":0.2,"throttle_max":60,"migration_network":"OpaqueRef:n"}`},
			func(t *testing.T, o Overrides) {
				assert.Equal(t, int64(25_000_000), *o.BandwidthBytesPerSec)
				assert.Equal(t, 8, *o.Streams)
				assert.Equal(t, "none", *o.Compression)
				assert.Equal(t, "0.0.0.0:7000", *o.GatewayListen)
				assert.Equal(t, "gw.example:7000", *o.GatewayAdvertise)
				assert.Equal(t, 500*time.Millisecond, *o.DowntimeTarget)
				assert.Equal(t, PolicyThrottle, *o.Policy)
				assert.Equal(t, 4, *o.MaxRounds)
				assert.Equal(t, 0.2, *o.MinShrink)
				assert.Equal(t, 60, *o.ThrottleMax)
				assert.Equal(t, "OpaqueRef:n", *o.MigrationNetwork)
			}, ""},
		{"unknown field", map[string]string{KeyConfig: `{"bandwith":"1Gbit"}`}, nil, `unknown field "bandwith"`},
		{"not an object", map[string]string{KeyConfig: `[1]`}, nil, "wanmotion:config"},
		{"trailing", map[string]string{KeyConfig: `{} {}`}, nil, "trailing"},
		{"bad policy", map[string]string{KeyConfig: `{"convergence_policy":"yolo"}`}, nil, "keep-going, throttle or stop"},
		{"bad streams", map[string]string{KeyConfig: `{"streams":0}`}, nil, "streams"},
		{"bad compression", map[string]string{KeyConfig: `{"compression":"lz4"}`}, nil, "compression"},
		{"bad duration", map[string]string{KeyConfig: `{"downtime_target":"soon"}`}, nil, "downtime_target"},
		{"bad listen", map[string]string{KeyConfig: `{"gateway_listen":"7000"}`}, nil, "gateway_listen"},
		{"bad port", map[string]string{KeyConfig: `{"gateway_advertise":"h:99999"}`}, nil, "bad port"},
		{"bad shrink", map[string]string{KeyConfig: `{"min_shrink":1}`}, nil, "min_shrink"},
		{"throttle_max 100", map[string]string{KeyConfig: `{"throttle_max":100}`}, nil, "throttle_max 100: want 1..99"},
		{"throttle_max 0", map[string]string{KeyConfig: `{"throttle_max":0}`}, nil, "throttle_max 0: want 1..99"},
		{"wrong type", map[string]string{KeyConfig: `{"streams":"4"}`}, nil, "streams"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, err := ParsePoolConfig(tc.oc)
			if tc.wantErr != "" {
				require.ErrorIs(t, err, ErrConfig)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			tc.check(t, o)
		})
	}
}

func TestFormatConfigJSONRoundTrip(t *testing.T) {
	t.Parallel()
	o, err := ParseConfigJSON(`{"bandwidth":"200Mbit","streams":8,"downtime_target":"1.5s","convergence_policy":"stop"}`)
	require.NoError(t, err)
	s, err := FormatConfigJSON(o)
	require.NoError(t, err)
	o2, err := ParseConfigJSON(s)
	require.NoError(t, err)
	assert.Equal(t, o, o2)
	assert.NotContains(t, s, "null")
}

func TestPoolConfigEntries(t *testing.T) {
	t.Parallel()
	pol := PolicyStop
	o := Overrides{Storage: ptr("drbd"), Streams: ptr(2), Policy: &pol}
	m, err := PoolConfigEntries(o)
	require.NoError(t, err)
	assert.Equal(t, "drbd", m[KeyStorage])
	assert.Equal(t, "", m[KeyNetwork], "unset: remove the key")
	back, err := ParsePoolConfig(m)
	require.NoError(t, err)
	assert.Equal(t, o, back)
	m, err = PoolConfigEntries(Overrides{})
	require.NoError(t, err)
	assert.Equal(t, map[string]string{KeyStorage: "", KeyNetwork: "", KeyConfig: ""}, m)
	_, err = PoolConfigEntries(Overrides{Streams: ptr(0)})
	require.ErrorIs(t, err, ErrConfig)
}

func FuzzParseConfigJSON(f *testing.F) {
	for _, s := range []string{``, `{}`, `{"bandwidth":"1Gbit"}`, `{"streams":4,"compression":"zstd"}`,
		`{"downtime_target":"2s","convergence_policy":"keep-going","max_rounds":3,"min_shrink":0.5}`,
		`{"gateway_listen":"[::]:7000"}`, `{"x":1}`, `null`, `{"bandwidth":"9e99Tbit"}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		o, err := ParseConfigJSON(s)
		if err != nil {
			require.ErrorIs(t, err, ErrConfig)
			return
		}
		if o.Streams != nil {
			require.True(t, *o.Streams >= 1 && *o.Streams <= 256)
		}
		if o.BandwidthBytesPerSec != nil {
			require.GreaterOrEqual(t, *o.BandwidthBytesPerSec, int64(0))
		}
		if o.DowntimeTarget != nil {
			require.Positive(t, *o.DowntimeTarget)
		}
		// what parses formats back to something that parses the same
		out, err := FormatConfigJSON(o)
		require.NoError(t, err)
		o2, err := ParseConfigJSON(out)
		require.NoError(t, err, out)
		require.Equal(t, o.Streams, o2.Streams)
		require.Equal(t, o.Policy, o2.Policy)
	})
}

func ptr[T any](v T) *T { return &v }

func TestResolve(t *testing.T) {
	t.Parallel()
	inst := Installed{Storage: []string{"nbd", "drbd", "p2p"}, Network: []string{"l2tunnel", "mipv6"}}
	cases := []struct {
		name          string
		src, dst, flg Overrides
		check         func(t *testing.T, s Settings)
		wantErr       error
		errText       string
	}{
		{"defaults", Overrides{}, Overrides{}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, Settings{Storage: "nbd", Network: "none", Streams: DefaultStreams, Compression: "zstd",
				DowntimeTarget: DefaultDowntimeTarget, Policy: PolicyKeepGoing, MaxRounds: DefaultMaxRounds, MinShrink: DefaultMinShrink,
				ThrottleMax: DefaultThrottleMax}, s)
		}, nil, ""},
		{"throttle_max: the source pool's (its guest is throttled), the flag wins", Overrides{ThrottleMax: ptr(50)}, Overrides{ThrottleMax: ptr(10)}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, 50, s.ThrottleMax)
		}, nil, ""},
		{"throttle_max flag", Overrides{ThrottleMax: ptr(50)}, Overrides{}, Overrides{ThrottleMax: ptr(70)}, func(t *testing.T, s Settings) {
			assert.Equal(t, 70, s.ThrottleMax)
		}, nil, ""},
		{"pool backends agree", Overrides{Storage: ptr("drbd")}, Overrides{Storage: ptr("drbd")}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, "drbd", s.Storage)
		}, nil, ""},
		{"pools disagree", Overrides{Storage: ptr("drbd")}, Overrides{Storage: ptr("p2p")}, Overrides{}, nil, ErrConfig, "choose one"},
		{"flag settles a disagreement", Overrides{Storage: ptr("drbd")}, Overrides{Storage: ptr("p2p")}, Overrides{Storage: ptr("nbd")}, func(t *testing.T, s Settings) {
			assert.Equal(t, "nbd", s.Storage)
		}, nil, ""},
		{"unknown storage", Overrides{Storage: ptr("zfs")}, Overrides{}, Overrides{}, nil, ErrUnknownBackend, "installed: nbd, drbd, p2p"},
		{"unknown network", Overrides{}, Overrides{Network: ptr("sdwan")}, Overrides{}, nil, ErrUnknownBackend, "installed: none, l2tunnel, mipv6"},
		{"bandwidth: smaller cap", Overrides{BandwidthBytesPerSec: ptr(int64(100))}, Overrides{BandwidthBytesPerSec: ptr(int64(50))}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, int64(50), s.BandwidthBytesPerSec)
		}, nil, ""},
		{"bandwidth: one pool unlimited", Overrides{BandwidthBytesPerSec: ptr(int64(0))}, Overrides{BandwidthBytesPerSec: ptr(int64(70))}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, int64(70), s.BandwidthBytesPerSec)
		}, nil, ""},
		{"bandwidth: flag wins", Overrides{BandwidthBytesPerSec: ptr(int64(100))}, Overrides{}, Overrides{BandwidthBytesPerSec: ptr(int64(900))}, func(t *testing.T, s Settings) {
			assert.Equal(t, int64(900), s.BandwidthBytesPerSec)
		}, nil, ""},
		{"gateway from destination", Overrides{GatewayListen: ptr("src:1")}, Overrides{GatewayListen: ptr("0.0.0.0:7000"), GatewayAdvertise: ptr("b:7000")}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, "0.0.0.0:7000", s.GatewayListen)
			assert.Equal(t, "b:7000", s.GatewayAdvertise)
		}, nil, ""},
		{"source first, then destination", Overrides{Streams: ptr(2)}, Overrides{Streams: ptr(16), MaxRounds: ptr(3)}, Overrides{}, func(t *testing.T, s Settings) {
			assert.Equal(t, 2, s.Streams)
			assert.Equal(t, 3, s.MaxRounds)
		}, nil, ""},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Resolve(tc.src, tc.dst, tc.flg, inst)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				assert.Contains(t, err.Error(), tc.errText)
				return
			}
			require.NoError(t, err)
			tc.check(t, s)
		})
	}
}

func TestEstimateMigration(t *testing.T) {
	t.Parallel()
	base := PlanInput{Link: Link{BandwidthBytesPerSec: 12_500_000, RTT: 50 * time.Millisecond}, // 100 Mbit/s
		BytesToMove: 10e9, MemoryBytes: 4 << 30, GuestWriteBytesPerSec: 1e6, DowntimeTarget: 2 * time.Second, MaxRounds: 8}
	e, err := EstimateMigration(base)
	require.NoError(t, err)
	assert.True(t, e.Converges)
	assert.InDelta(t, 800, e.SeedSeconds, 80, "10 GB at 12.5 MB/s is 800 s, plus small rounds")
	assert.GreaterOrEqual(t, e.SeedRounds, 3)
	assert.Equal(t, int64(25_000_000), e.HandoffThresholdBytes)
	assert.Less(t, e.ResidualBytes, e.HandoffThresholdBytes)
	assert.Greater(t, e.TotalSeconds, e.SeedSeconds+e.HandoffSeconds)
	assert.Greater(t, e.DowntimeSeconds, 0.4) // ≥ 2 RTT + pause overhead
	assert.Less(t, e.DowntimeSeconds, 2.0)
	assert.Empty(t, e.Advice)

	faster := base
	faster.Link.BandwidthBytesPerSec *= 10
	ef, err := EstimateMigration(faster)
	require.NoError(t, err)
	assert.Less(t, ef.TotalSeconds, e.TotalSeconds)

	compressed := base
	compressed.CompressionRatio = 2
	ec, err := EstimateMigration(compressed)
	require.NoError(t, err)
	assert.Less(t, ec.SeedSeconds, e.SeedSeconds)

	idle := base
	idle.GuestWriteBytesPerSec = 0
	ei, err := EstimateMigration(idle)
	require.NoError(t, err)
	assert.Equal(t, 2, ei.SeedRounds, "full copy + one (empty) delta round")
	assert.Zero(t, ei.ResidualBytes)

	hot := base
	hot.GuestWriteBytesPerSec = 20_000_000
	eh, err := EstimateMigration(hot)
	require.NoError(t, err)
	assert.False(t, eh.Converges)
	assert.Contains(t, eh.Advice, "cannot converge")
	assert.Equal(t, 1+base.MaxRounds, eh.SeedRounds)

	_, err = EstimateMigration(PlanInput{})
	require.ErrorIs(t, err, ErrConfig)
}

func TestOverallProgress(t *testing.T) {
	t.Parallel()
	e := Estimate{SeedSeconds: 100, HandoffSeconds: 20}
	prev := -1.0
	for _, p := range WorkPhases {
		for _, f := range []float64{0, 0.5, 1} {
			v := OverallProgress(e, p, f)
			assert.GreaterOrEqual(t, v, prev)
			assert.LessOrEqual(t, v, 1.0)
			prev = v
		}
	}
	assert.Equal(t, 1.0, OverallProgress(e, PhaseDone, 0))
	assert.InDelta(t, 1.0, OverallProgress(e, PhaseCleanup, 1), 1e-9)
	// seed dominates: half of seed is well under half of the whole
	assert.Less(t, OverallProgress(e, PhaseSeed, 0.5), 0.5)
	assert.Greater(t, OverallProgress(e, PhaseSeed, 1), 0.7)
}

func TestHumanBytes(t *testing.T) {
	t.Parallel()
	assert.Equal(t, "512 B", HumanBytes(512))
	assert.Equal(t, "1.0 KiB", HumanBytes(1024))
	assert.Equal(t, "1.5 GiB", HumanBytes(3<<29))
}

// A report of a migration stopped with the guest still throttled says so.
func TestReportThrottleStillActive(t *testing.T) {
	cp := &Checkpoint{MigrationID: "wm-t", Phase: PhaseSeed}
	cp.Seed.Throttle = &ThrottleState{Percent: 40, Cap: 120}
	r := BuildReport(cp)
	assert.True(t, r.GuestThrottleActive)
	assert.Contains(t, r.Text(), "STILL IN FORCE: vCPUs slowed by 40%; wanmotion migrate resume wm-t")
	cp.Seed.ThrottleRemoved = true
	r = BuildReport(cp)
	assert.False(t, r.GuestThrottleActive)
	assert.Contains(t, r.Text(), "slowed by up to 40% until the hand-over")
	cp.Seed.ThrottleRemoved, cp.Phase = false, PhaseDone
	assert.False(t, BuildReport(cp).GuestThrottleActive, "after the move the throttled domain is gone")
}

// Backend sections of wanmotion:config: kept raw, per pool, and given to
// each site's chosen backends only.
func TestConfigSections(t *testing.T) {
	o, err := ParseConfigJSON(`{"streams":8,"l2tunnel":{"netns":"a","underlay_address":"10.0.0.1"},"nbd":{"chunk_size":"1MiB"}}`)
	require.NoError(t, err)
	assert.Equal(t, 8, *o.Streams)
	require.Len(t, o.Sections, 2)
	assert.JSONEq(t, `{"netns":"a","underlay_address":"10.0.0.1"}`, string(o.Sections["l2tunnel"]))

	js, err := FormatConfigJSON(o)
	require.NoError(t, err)
	assert.JSONEq(t, `{"streams":8,"l2tunnel":{"netns":"a","underlay_address":"10.0.0.1"},"nbd":{"chunk_size":"1MiB"}}`, js, "sections survive a rewrite")

	for in, want := range map[string]string{
		`{"colour":"blue"}`:          `unknown field "colour"`,
		`{"l2tunnel":[1]}`:           `unknown field "l2tunnel"`,
		`{"L2 Tunnel":{"x":1}}`:      `section "L2 Tunnel"`,
		`{"streams":{"x":1}}`:        "streams",
		`{"l2tunnel":{"x":1}} {"a"}`: "trailing",
	} {
		_, err := ParseConfigJSON(in)
		require.ErrorIs(t, err, ErrConfig, in)
		assert.Contains(t, err.Error(), want, in)
	}

	src, err := ParseConfigJSON(`{"l2tunnel":{"netns":"a"},"nbd":{"x":1},"other":{"y":2}}`)
	require.NoError(t, err)
	dst, err := ParseConfigJSON(`{"l2tunnel":{"netns":"b"}}`)
	require.NoError(t, err)
	nw := "l2tunnel"
	s, err := Resolve(src, dst, Overrides{Network: &nw}, Installed{Storage: []string{"nbd"}, Network: []string{"l2tunnel"}})
	require.NoError(t, err)
	assert.Equal(t, map[string][]byte{"l2tunnel": []byte(`{"netns":"a"}`), "nbd": []byte(`{"x":1}`)}, s.SourceConfig, "the chosen backends' sections only")
	assert.Equal(t, map[string][]byte{"l2tunnel": []byte(`{"netns":"b"}`)}, s.DestConfig, "each site its own pool's")
}
