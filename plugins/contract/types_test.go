package contract_test

import (
	"fmt"
	"testing"

	"github.com/hashicorp/go-hclog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

func TestSelectAPIVersion(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name          string
		host, backend []string
		want          string
		wantErr       error
	}{
		{"same", []string{"1.0"}, []string{"1.0"}, "1.0", nil},
		{"backend newer (N vs N-1)", []string{"1.0"}, []string{"1.0", "1.1"}, "1.0", nil},
		{"host newer (N-1 backend)", []string{"1.0", "1.1"}, []string{"1.0"}, "1.0", nil},
		{"highest overlap", []string{"1.0", "1.1", "2.0"}, []string{"2.0", "1.1", "1.0"}, "2.0", nil},
		{"numeric, not lexical", []string{"1.2", "1.10"}, []string{"1.10", "1.2"}, "1.10", nil},
		{"v prefix", []string{"1.0"}, []string{"v1.0"}, "1.0", nil},
		{"no overlap", []string{"1.0"}, []string{"2.0"}, "", contract.ErrUnsupported},
		{"garbage ignored", []string{"1.0"}, []string{"x", "1", "1.0"}, "1.0", nil},
		{"empty backend", []string{"1.0"}, nil, "", contract.ErrUnsupported},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := contract.SelectAPIVersion(tc.host, tc.backend)
			if tc.wantErr != nil {
				require.ErrorIs(t, err, tc.wantErr)
				assert.Contains(t, err.Error(), fmt.Sprint(tc.backend))
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
			assert.NoError(t, contract.CheckAPIVersion(got, tc.backend))
		})
	}
	assert.ErrorIs(t, contract.CheckAPIVersion("3.0", []string{"1.0"}), contract.ErrUnsupported)
	assert.ErrorIs(t, contract.CheckAPIVersion("bad", []string{"1.0"}), contract.ErrInvalidArgument)
}

func TestCapabilities(t *testing.T) {
	t.Parallel()
	c := contract.CapSource | contract.CapIncremental | contract.CapL2Stretch | contract.Capabilities(1)<<20
	assert.Equal(t, []string{"bit20", "incremental", "l2_stretch", "source"}, c.Names())
	assert.True(t, c.Has(contract.CapSource|contract.CapIncremental))
	assert.False(t, c.Has(contract.CapSource|contract.CapDestination))
	assert.Equal(t, []string{}, contract.Capabilities(0).Names())
	f, err := contract.ParseCapability("resume")
	require.NoError(t, err)
	assert.Equal(t, contract.CapResume, f)
	_, err = contract.ParseCapability("teleport")
	assert.ErrorIs(t, err, contract.ErrInvalidArgument)
}

func TestParseKind(t *testing.T) {
	t.Parallel()
	for _, k := range contract.Kinds() {
		got, err := contract.ParseKind(string(k))
		require.NoError(t, err)
		assert.Equal(t, k, got)
	}
	_, err := contract.ParseKind("disk")
	assert.ErrorIs(t, err, contract.ErrInvalidArgument)
}

func TestSecretIsNotPrinted(t *testing.T) {
	t.Parallel()
	x := contract.XAPIAccess{URL: "https://pool", Session: "OpaqueRef:s3cr3t"}
	e := contract.Endpoint{Address: "127.0.0.1:1", Token: "tok3n"}
	for _, s := range []string{fmt.Sprint(x), fmt.Sprintf("%+v", x), fmt.Sprintf("%#v", x), fmt.Sprintf("%v", e), fmt.Sprintf("%s", x.Session)} {
		assert.NotContains(t, s, "s3cr3t")
		assert.NotContains(t, s, "tok3n")
	}
	var buf syncBuf
	hclog.New(&hclog.LoggerOptions{Output: &buf}).Info("prepare", "xapi", x, "session", x.Session)
	assert.NotContains(t, buf.String(), "s3cr3t")
	assert.Contains(t, buf.String(), "[redacted]")
	assert.Equal(t, "OpaqueRef:s3cr3t", string(x.Session), "the value itself is intact")
	assert.Equal(t, "", contract.Secret("").String())
}

type syncBuf struct{ b []byte }

func (s *syncBuf) Write(p []byte) (int, error) { s.b = append(s.b, p...); return len(p), nil }
func (s *syncBuf) String() string              { return string(s.b) }

func TestOpaqueRoundTrip(t *testing.T) {
	t.Parallel()
	type cfgV1 struct {
		Streams int               `msgpack:"streams"`
		Peers   []string          `msgpack:"peers"`
		Labels  map[string]string `msgpack:"labels"`
	}
	type cfgV2 struct {
		Streams int      `msgpack:"streams"`
		Peers   []string `msgpack:"peers"`
		NewKey  bool     `msgpack:"new_key"`
	}
	in := cfgV1{Streams: 4, Peers: []string{"a", "b"}, Labels: map[string]string{"x": "y"}}
	b, err := contract.EncodeOpaque(in)
	require.NoError(t, err)
	var out cfgV1
	require.NoError(t, contract.DecodeOpaque(b, &out))
	assert.Equal(t, in, out)

	var newer cfgV2
	require.NoError(t, contract.DecodeOpaque(b, &newer), "fields are by name: a newer struct reads older bytes")
	assert.Equal(t, 4, newer.Streams)
	assert.Equal(t, []string{"a", "b"}, newer.Peers)

	def := cfgV1{Streams: 9}
	require.NoError(t, contract.DecodeOpaque(nil, &def), "empty means defaults")
	assert.Equal(t, 9, def.Streams)

	err = contract.DecodeOpaque([]byte{0xc1}, &out)
	assert.ErrorIs(t, err, contract.ErrInvalidArgument)
}

func FuzzParseAPIVersion(f *testing.F) {
	for _, s := range []string{"1.0", "v1.1", "10.20", "", ".", "1.", "-1.0", "1.0.0", "a.b"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ma, mi, err := contract.ParseAPIVersion(s)
		if err != nil {
			require.ErrorIs(t, err, contract.ErrInvalidArgument)
			return
		}
		require.GreaterOrEqual(t, ma, 0)
		require.GreaterOrEqual(t, mi, 0)
		v, err := contract.SelectAPIVersion([]string{fmt.Sprintf("%d.%d", ma, mi)}, []string{s})
		require.NoError(t, err)
		require.Equal(t, fmt.Sprintf("%d.%d", ma, mi), v)
	})
}

func FuzzWireError(f *testing.F) {
	for _, c := range contract.Codes() {
		f.Add(string(c), "message")
	}
	f.Add("made_up_code", "")
	f.Fuzz(func(t *testing.T, code, msg string) {
		err := contract.FromWire(&contract.WireError{Code: contract.Code(code), Message: msg})
		require.Error(t, err)
		require.ErrorIs(t, err, contract.Code(code).Sentinel())
		back := contract.ToWire(err)
		require.NotNil(t, back)
		require.Equal(t, contract.Code(code).Sentinel(), back.Code.Sentinel())
	})
}
