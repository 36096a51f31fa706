package contract_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

func TestConfigFromJSON(t *testing.T) {
	t.Parallel()
	type cfg struct {
		Streams   int      `msgpack:"streams"`
		Bandwidth int64    `msgpack:"bandwidth"`
		Ratio     float64  `msgpack:"ratio"`
		Peers     []string `msgpack:"peers"`
		TLS       bool     `msgpack:"tls"`
		Nested    struct {
			Port uint16 `msgpack:"port"`
		} `msgpack:"nested"`
	}
	b, err := contract.ConfigFromJSON([]byte(`{"streams": 8, "bandwidth": 125000000000, "ratio": 0.5,
		"peers": ["a","b"], "tls": true, "nested": {"port": 10809}, "unknown": [1, {"x": null}]}`))
	require.NoError(t, err)
	var c cfg
	require.NoError(t, contract.DecodeOpaque(b, &c))
	assert.Equal(t, 8, c.Streams)
	assert.Equal(t, int64(125000000000), c.Bandwidth)
	assert.InDelta(t, 0.5, c.Ratio, 1e-9)
	assert.Equal(t, []string{"a", "b"}, c.Peers)
	assert.True(t, c.TLS)
	assert.Equal(t, uint16(10809), c.Nested.Port)

	for _, in := range []string{"", "  ", "null"} {
		b, err := contract.ConfigFromJSON([]byte(in))
		require.NoError(t, err, in)
		assert.Nil(t, b, in)
	}
	for _, in := range []string{"[1]", `"x"`, "{", `{} {}`, "3"} {
		_, err := contract.ConfigFromJSON([]byte(in))
		assert.ErrorIs(t, err, contract.ErrInvalidArgument, in)
	}
}

func FuzzConfigFromJSON(f *testing.F) {
	for _, s := range []string{`{}`, `{"a":1}`, `{"a":[1,2.5,"x",null,{"b":true}]}`, `null`, `[]`, `{"n":1e400}`, `{"n":-9223372036854775809}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := contract.ConfigFromJSON([]byte(s))
		if err != nil {
			require.ErrorIs(t, err, contract.ErrInvalidArgument)
			return
		}
		var m map[string]any
		require.NoError(t, contract.DecodeOpaque(b, &m))
	})
}
