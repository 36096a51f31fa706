package xapi

import (
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseDate(t *testing.T) {
	utc := func(s string) time.Time { return date(s) }
	tests := map[string]time.Time{
		"20250319T04:16:24Z":        utc("2025-03-19T04:16:24Z"),
		"20250319T04:16:24":         utc("2025-03-19T04:16:24Z"),
		"20250319T041624Z":          utc("2025-03-19T04:16:24Z"),
		"20250319T041624":           utc("2025-03-19T04:16:24Z"),
		"20250319T04:16:24+03:00":   utc("2025-03-19T01:16:24Z"),
		"20250319T04:16:24+0300":    utc("2025-03-19T01:16:24Z"),
		"20250319T04:16:24.123Z":    utc("2025-03-19T04:16:24.123Z"),
		"2025-03-19T04:16:24Z":      utc("2025-03-19T04:16:24Z"),
		"2025-03-19T04:16:24":       utc("2025-03-19T04:16:24Z"),
		"2025-03-19T04:16:24-05:00": utc("2025-03-19T09:16:24Z"),
		"19700101T00:00:00Z":        time.Unix(0, 0).UTC(),
		"":                          {},
	}
	for in, want := range tests {
		got, err := ParseDate(in)
		require.NoError(t, err, in)
		assert.True(t, want.Equal(got), "%s: got %s", in, got)
	}
	_, err := ParseDate("yesterday")
	assert.Error(t, err)
	assert.True(t, IsNever(time.Unix(0, 0)))
	assert.True(t, IsNever(time.Time{}))
	assert.False(t, IsNever(utc("2025-03-19T04:16:24Z")))
	assert.Equal(t, "20250319T04:16:24Z", FormatDate(utc("2025-03-19T04:16:24Z")))
}

func TestEnumsParse(t *testing.T) {
	assert.Equal(t, VMPowerStateRunning, ParseVMPowerState("running"))
	assert.Equal(t, VMPowerStateHalted, ParseVMPowerState("HALTED"))
	assert.Equal(t, VMPowerStateUnrecognized, ParseVMPowerState("Levitating"))
	assert.Equal(t, TaskStatusCancelled, ParseTaskStatus("Cancelled"))
	assert.Equal(t, VDITypeCBTMetadata, ParseVDIType("CBT_Metadata"))
	assert.Equal(t, VBDModeRO, ParseVBDMode("ro"))
	assert.Equal(t, VBDTypeCD, ParseVBDType("cd"))
	assert.Equal(t, NetworkPurposeInsecureNBD, ParseNetworkPurpose("INSECURE_NBD"))
	assert.Equal(t, NetworkPurposeUnrecognized, ParseNetworkPurpose(""))
}

func TestNullRefs(t *testing.T) {
	assert.True(t, VMRef(NullRef).IsNull())
	assert.True(t, VDIRef("").IsNull())
	assert.True(t, HostRef("Ref:1").IsNull())
	assert.False(t, SRRef("OpaqueRef:1").IsNull())
}

func TestConvertEdges(t *testing.T) {
	var i8 int8
	err := fromWire("x", "300", &i8)
	assert.ErrorIs(t, err, ErrProtocol, "overflow is an error")
	var i int64
	require.NoError(t, fromWire("x", "1e3", &i))
	assert.Equal(t, int64(1000), i)
	assert.ErrorIs(t, fromWire("x", "1.5", &i), ErrProtocol)
	assert.ErrorIs(t, fromWire("x", []any{}, &i), ErrProtocol)
	var rec VMRecord
	err = fromWire("VM.get_record", map[string]any{"memory_static_max": "lots"}, &rec)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "VM.get_record -> .memory_static_max")
	assert.Error(t, fromWire("x", "s", rec))
	var b bool
	require.NoError(t, fromWire("x", "true", &b))
	assert.True(t, b)

	_, err = toWire(map[int]string{1: "a"})
	assert.Error(t, err)
	_, err = toWire(nil)
	assert.Error(t, err)
	w, err := toWire(struct {
		A int64  `xapi:"a"`
		B string `xapi:"b,omitempty"`
		c int
	}{A: 5})
	require.NoError(t, err)
	assert.Equal(t, map[string]any{"a": "5"}, w)
	assert.False(t, errors.Is(err, ErrProtocol))
}

func TestAPIErrorIs(t *testing.T) {
	err := error(&APIError{Method: "VM.pause", Code: CodeVMBadPowerState, Params: []string{"OpaqueRef:v", "running", "halted"}})
	assert.ErrorIs(t, err, ErrVMBadPowerState)
	assert.NotErrorIs(t, err, ErrHandleInvalid)
	assert.NotErrorIs(t, err, &APIError{Method: "VM.pause", Code: CodeVMBadPowerState}, "targets with a Method do not match")
	ae, ok := AsAPIError(err)
	require.True(t, ok)
	assert.Equal(t, "halted", ae.Param(2))
	assert.Equal(t, "", ae.Param(3))
	assert.Equal(t, "SESSION_INVALID [redacted]", (&APIError{Code: CodeSessionInvalid, Params: []string{"OpaqueRef:secret"}}).Error())
}
