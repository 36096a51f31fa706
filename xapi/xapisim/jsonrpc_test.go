package xapisim

import (
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func jsonCall(t *testing.T, url, body string) (map[string]any, string) {
	t.Helper()
	resp, err := http.Post(url+"jsonrpc", "application/json", strings.NewReader(body))
	require.NoError(t, err)
	defer func() { _ = resp.Body.Close() }()
	require.Equal(t, "application/json", resp.Header.Get("Content-Type"))
	raw, err := io.ReadAll(resp.Body)
	require.NoError(t, err)
	var out map[string]any
	require.NoError(t, json.Unmarshal(raw, &out), string(raw))
	return out, string(raw)
}

func TestJSONRPC(t *testing.T) {
	s := startSim(t, "")
	url := s.Info().Pools[0].URL
	out, _ := jsonCall(t, url, `{"jsonrpc":"2.0","method":"session.login_with_password","params":["root","xenroot"],"id":7}`)
	assert.Equal(t, "2.0", out["jsonrpc"])
	assert.Equal(t, 7.0, out["id"])
	sess := out["result"].(string)
	require.True(t, strings.HasPrefix(sess, "OpaqueRef:"))

	out, _ = jsonCall(t, url, `{"jsonrpc":"2.0","method":"VM.get_by_name_label","params":["`+sess+`","demo-vm"],"id":"a"}`)
	vm := out["result"].([]any)[0].(string)
	out, raw := jsonCall(t, url, `{"jsonrpc":"2.0","method":"VM.get_record","params":["`+sess+`","`+vm+`"],"id":1}`)
	rec := out["result"].(map[string]any)
	assert.Equal(t, 536870912.0, rec["memory_static_max"], "ints are JSON numbers")
	assert.Equal(t, "19700101T00:00:00Z", rec["snapshot_time"])
	assert.Equal(t, "Running", rec["power_state"])
	assert.True(t, strings.HasPrefix(raw, `{"jsonrpc":"2.0","result":{"uuid":`), "records keep field order")

	// Typed params: a JSON bool and number.
	out, _ = jsonCall(t, url, `{"jsonrpc":"2.0","method":"VM.start","params":["`+sess+`","`+vm+`",false,false],"id":2}`)
	assert.Equal(t, map[string]any{"code": 1.0, "message": ErrVMBadPowerState, "data": []any{vm, "halted", "running"}}, out["error"])

	// v1: no "jsonrpc" member.
	out, _ = jsonCall(t, url, `{"method":"VM.get_all","params":["OpaqueRef:bad"],"id":3}`)
	assert.Nil(t, out["result"])
	assert.Equal(t, []any{ErrSessionInvalid, "OpaqueRef:bad"}, out["error"])
	out, _ = jsonCall(t, url, `{"method":"pool.get_all","params":["`+sess+`"],"id":4}`)
	assert.Nil(t, out["error"])
	assert.Len(t, out["result"], 1)

	out, _ = jsonCall(t, url, `not json`)
	assert.Equal(t, ErrInternal, out["error"].([]any)[0])

	req, err := http.NewRequest(http.MethodOptions, url+"jsonrpc", nil)
	require.NoError(t, err)
	resp, err := http.DefaultClient.Do(req)
	require.NoError(t, err)
	_ = resp.Body.Close()
	assert.Equal(t, http.StatusOK, resp.StatusCode)
	assert.Equal(t, "*", resp.Header.Get("Access-Control-Allow-Origin"))
}
