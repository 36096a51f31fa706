package engine

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Keys in pool.other_config.
const (
	KeyStorage = "wanmotion:storage"
	KeyNetwork = "wanmotion:network"
	KeyConfig  = "wanmotion:config"
)

// NetworkNone is the network backend name that means "no network backend".
const NetworkNone = "none"

// Defaults used when neither pool nor the migration sets a value.
const (
	DefaultStorage        = "nbd"
	DefaultNetwork        = NetworkNone
	DefaultStreams        = 4
	DefaultCompression    = "zstd"
	DefaultDowntimeTarget = 2 * time.Second
	DefaultMaxRounds      = 8
	DefaultMinShrink      = 0.1
	DefaultPolicy         = PolicyKeepGoing
)

// ConvergencePolicy says what Seed does when the guest writes faster than
// the link carries.
type ConvergencePolicy string

// The convergence policies.
const (
	PolicyKeepGoing ConvergencePolicy = "keep-going" // continue up to the round cap, then hand off
	PolicyThrottle  ConvergencePolicy = "throttle"   // slow the guest's vCPUs step by step (Xen scheduler cap)
	PolicyStop      ConvergencePolicy = "stop"       // stop and roll back with advice
)

// ParsePolicy validates a policy name.
func ParsePolicy(s string) (ConvergencePolicy, error) {
	switch p := ConvergencePolicy(s); p {
	case PolicyKeepGoing, PolicyThrottle, PolicyStop:
		return p, nil
	}
	return "", fmt.Errorf("%w: convergence_policy %q: want keep-going, throttle or stop", ErrConfig, s)
}

// Overrides are optional settings: parsed from one pool's other_config, or
// given per migration (CLI flags). nil means "not set".
type Overrides struct {
	Storage              *string            `msgpack:"storage,omitempty"`
	Network              *string            `msgpack:"network,omitempty"`
	BandwidthBytesPerSec *int64             `msgpack:"bandwidth_bytes_per_sec,omitempty"` // 0 = unlimited
	Streams              *int               `msgpack:"streams,omitempty"`
	Compression          *string            `msgpack:"compression,omitempty"`
	GatewayListen        *string            `msgpack:"gateway_listen,omitempty"`
	GatewayAdvertise     *string            `msgpack:"gateway_advertise,omitempty"`
	DowntimeTarget       *time.Duration     `msgpack:"downtime_target,omitempty"`
	Policy               *ConvergencePolicy `msgpack:"policy,omitempty"`
	MaxRounds            *int               `msgpack:"max_rounds,omitempty"`
	MinShrink            *float64           `msgpack:"min_shrink,omitempty"`
	ThrottleMax          *int               `msgpack:"throttle_max,omitempty"`
	// Sections are the backends' own configuration objects in
	// wanmotion:config, by backend name (raw JSON, e.g. "l2tunnel": {...}).
	Sections         map[string][]byte `msgpack:"sections,omitempty"`
	MigrationNetwork *string           `msgpack:"migration_network,omitempty"`
}

// Settings are the resolved settings of one migration (stored in its checkpoint).
type Settings struct {
	Storage              string            `msgpack:"storage" json:"storage,omitempty"`
	Network              string            `msgpack:"network" json:"network,omitempty"`
	BandwidthBytesPerSec int64             `msgpack:"bandwidth_bytes_per_sec" json:"bandwidth_bytes_per_sec,omitempty"`
	Streams              int               `msgpack:"streams" json:"streams,omitempty"`
	Compression          string            `msgpack:"compression" json:"compression,omitempty"`
	GatewayListen        string            `msgpack:"gateway_listen" json:"gateway_listen,omitempty"`
	GatewayAdvertise     string            `msgpack:"gateway_advertise" json:"gateway_advertise,omitempty"`
	DowntimeTarget       time.Duration     `msgpack:"downtime_target" json:"downtime_target_ns,omitempty"`
	Policy               ConvergencePolicy `msgpack:"policy" json:"convergence_policy,omitempty"`
	MaxRounds            int               `msgpack:"max_rounds" json:"max_rounds,omitempty"`
	MinShrink            float64           `msgpack:"min_shrink" json:"min_shrink,omitempty"`
	ThrottleMax          int               `msgpack:"throttle_max" json:"throttle_max,omitempty"` // largest guest throttle, percent
	// SourceConfig and DestConfig are the chosen backends' sections of
	// each pool's wanmotion:config (raw JSON by backend name): each site's
	// backends are configured from their own pool.
	SourceConfig     map[string][]byte `msgpack:"source_config,omitempty" json:"-"`
	DestConfig       map[string][]byte `msgpack:"dest_config,omitempty" json:"-"`
	MigrationNetwork string            `msgpack:"migration_network" json:"migration_network,omitempty"`
}

// configJSON is the schema of pool.other_config["wanmotion:config"].
type configJSON struct {
	Bandwidth         *string  `json:"bandwidth,omitempty"`
	Streams           *int     `json:"streams,omitempty"`
	Compression       *string  `json:"compression,omitempty"`
	GatewayListen     *string  `json:"gateway_listen,omitempty"`
	GatewayAdvertise  *string  `json:"gateway_advertise,omitempty"`
	DowntimeTarget    *string  `json:"downtime_target,omitempty"`
	ConvergencePolicy *string  `json:"convergence_policy,omitempty"`
	MaxRounds         *int     `json:"max_rounds,omitempty"`
	MinShrink         *float64 `json:"min_shrink,omitempty"`
	ThrottleMax       *int     `json:"throttle_max,omitempty"`
	MigrationNetwork  *string  `json:"migration_network,omitempty"`
}

// ParseConfigJSON parses the wanmotion:config JSON object. Unknown fields,
// trailing data and out-of-range values are errors wrapping ErrConfig.
func ParseConfigJSON(s string) (Overrides, error) {
	var o Overrides
	if strings.TrimSpace(s) == "" {
		return o, nil
	}
	top := json.NewDecoder(strings.NewReader(s))
	var raw map[string]json.RawMessage
	if err := top.Decode(&raw); err != nil {
		return o, fmt.Errorf("%w: %s: %v", ErrConfig, KeyConfig, err)
	}
	if _, err := top.Token(); !errors.Is(err, io.EOF) {
		return o, fmt.Errorf("%w: %s: trailing data after the JSON object", ErrConfig, KeyConfig)
	}
	// An unknown key whose value is an object is a backend's section
	// (its own keys are the backend's to check); any other unknown key is
	// an error below.
	for k, v := range raw {
		if knownConfigKeys[k] || !isJSONObject(v) {
			continue
		}
		if !validSectionName(k) {
			return o, fmt.Errorf("%w: %s: section %q: a backend name is lower-case letters, digits and '-'", ErrConfig, KeyConfig, k)
		}
		if o.Sections == nil {
			o.Sections = map[string][]byte{}
		}
		o.Sections[k] = append([]byte(nil), v...)
		delete(raw, k)
	}
	known, err := json.Marshal(raw)
	if err != nil {
		return o, fmt.Errorf("%w: %s: %v", ErrConfig, KeyConfig, err)
	}
	dec := json.NewDecoder(bytes.NewReader(known))
	dec.DisallowUnknownFields()
	var c configJSON
	if err := dec.Decode(&c); err != nil {
		return o, fmt.Errorf("%w: %s: %v", ErrConfig, KeyConfig, err)
	}
	if c.Bandwidth != nil {
		bw, err := ParseBandwidth(*c.Bandwidth)
		if err != nil {
			return o, err
		}
		o.BandwidthBytesPerSec = &bw
	}
	if c.Streams != nil {
		if *c.Streams < 1 || *c.Streams > 256 {
			return o, fmt.Errorf("%w: streams %d: want 1..256", ErrConfig, *c.Streams)
		}
		o.Streams = c.Streams
	}
	if c.Compression != nil {
		switch *c.Compression {
		case "zstd", "none":
		default:
			return o, fmt.Errorf("%w: compression %q: want zstd or none", ErrConfig, *c.Compression)
		}
		o.Compression = c.Compression
	}
	if c.GatewayListen != nil {
		if err := checkHostPort("gateway_listen", *c.GatewayListen); err != nil {
			return o, err
		}
		o.GatewayListen = c.GatewayListen
	}
	if c.GatewayAdvertise != nil {
		if err := checkHostPort("gateway_advertise", *c.GatewayAdvertise); err != nil {
			return o, err
		}
		o.GatewayAdvertise = c.GatewayAdvertise
	}
	if c.DowntimeTarget != nil {
		d, err := time.ParseDuration(*c.DowntimeTarget)
		if err != nil || d <= 0 {
			return o, fmt.Errorf("%w: downtime_target %q: want a positive duration such as \"2s\"", ErrConfig, *c.DowntimeTarget)
		}
		o.DowntimeTarget = &d
	}
	if c.ConvergencePolicy != nil {
		p, err := ParsePolicy(*c.ConvergencePolicy)
		if err != nil {
			return o, err
		}
		o.Policy = &p
	}
	if c.MaxRounds != nil {
		if *c.MaxRounds < 1 || *c.MaxRounds > 1000 {
			return o, fmt.Errorf("%w: max_rounds %d: want 1..1000", ErrConfig, *c.MaxRounds)
		}
		o.MaxRounds = c.MaxRounds
	}
	if c.MinShrink != nil {
		if !(*c.MinShrink >= 0 && *c.MinShrink < 1) {
			return o, fmt.Errorf("%w: min_shrink %v: want 0 <= x < 1", ErrConfig, *c.MinShrink)
		}
		o.MinShrink = c.MinShrink
	}
	if c.ThrottleMax != nil {
		if *c.ThrottleMax < 1 || *c.ThrottleMax > 99 {
			return o, fmt.Errorf("%w: throttle_max %d: want 1..99 (percent of the guest's CPU time taken away at most)", ErrConfig, *c.ThrottleMax)
		}
		o.ThrottleMax = c.ThrottleMax
	}
	if c.MigrationNetwork != nil {
		o.MigrationNetwork = c.MigrationNetwork
	}
	return o, nil
}

func checkHostPort(field, v string) error {
	i := strings.LastIndex(v, ":")
	if i < 0 {
		return fmt.Errorf("%w: %s %q: want host:port", ErrConfig, field, v)
	}
	port, err := strconv.Atoi(v[i+1:])
	if err != nil || port < 1 || port > 65535 {
		return fmt.Errorf("%w: %s %q: bad port", ErrConfig, field, v)
	}
	return nil
}

// ParsePoolConfig reads the wanmotion keys of a pool's other_config.
func ParsePoolConfig(other map[string]string) (Overrides, error) {
	o, err := ParseConfigJSON(other[KeyConfig])
	if err != nil {
		return Overrides{}, err
	}
	if v, ok := other[KeyStorage]; ok && strings.TrimSpace(v) != "" {
		v = strings.TrimSpace(v)
		o.Storage = &v
	}
	if v, ok := other[KeyNetwork]; ok && strings.TrimSpace(v) != "" {
		v = strings.TrimSpace(v)
		o.Network = &v
	}
	return o, nil
}

// Resolve merges the source pool's, the destination pool's and the
// per-migration settings (see docs/engine.md "Configuration"):
//   - the per-migration value wins;
//   - storage and network backends: the pools must agree when both set one;
//   - gateway_listen / gateway_advertise: the destination pool's (its gateway listens);
//   - bandwidth: the smaller non-zero cap of the two pools;
//   - everything else: the source pool's, else the destination pool's;
//   - then the defaults.
//
// Backend names are checked against the installed ones.
func Resolve(src, dst, flags Overrides, inst Installed) (Settings, error) {
	s := Settings{
		Storage: DefaultStorage, Network: DefaultNetwork, Streams: DefaultStreams,
		Compression: DefaultCompression, DowntimeTarget: DefaultDowntimeTarget,
		Policy: DefaultPolicy, MaxRounds: DefaultMaxRounds, MinShrink: DefaultMinShrink,
		ThrottleMax: DefaultThrottleMax,
	}
	var err error
	if s.Storage, err = pickBackend("storage", src.Storage, dst.Storage, flags.Storage, DefaultStorage); err != nil {
		return s, err
	}
	if s.Network, err = pickBackend("network", src.Network, dst.Network, flags.Network, DefaultNetwork); err != nil {
		return s, err
	}
	if err := inst.Check(s.Storage, s.Network); err != nil {
		return s, err
	}
	switch {
	case flags.BandwidthBytesPerSec != nil:
		s.BandwidthBytesPerSec = *flags.BandwidthBytesPerSec
	default:
		s.BandwidthBytesPerSec = minCap(src.BandwidthBytesPerSec, dst.BandwidthBytesPerSec)
	}
	s.Streams = first(DefaultStreams, flags.Streams, src.Streams, dst.Streams)
	s.Compression = first(DefaultCompression, flags.Compression, src.Compression, dst.Compression)
	s.GatewayListen = first("", flags.GatewayListen, dst.GatewayListen)
	s.GatewayAdvertise = first("", flags.GatewayAdvertise, dst.GatewayAdvertise)
	s.DowntimeTarget = first(DefaultDowntimeTarget, flags.DowntimeTarget, src.DowntimeTarget, dst.DowntimeTarget)
	s.Policy = first(DefaultPolicy, flags.Policy, src.Policy, dst.Policy)
	s.MaxRounds = first(DefaultMaxRounds, flags.MaxRounds, src.MaxRounds, dst.MaxRounds)
	s.MinShrink = first(DefaultMinShrink, flags.MinShrink, src.MinShrink, dst.MinShrink)
	s.ThrottleMax = first(DefaultThrottleMax, flags.ThrottleMax, src.ThrottleMax)
	s.SourceConfig = backendSections(src.Sections, s.Storage, s.Network)
	s.DestConfig = backendSections(dst.Sections, s.Storage, s.Network)
	s.MigrationNetwork = first("", flags.MigrationNetwork, dst.MigrationNetwork)
	return s, nil
}

func pickBackend(kind string, src, dst, flag *string, def string) (string, error) {
	switch {
	case flag != nil && *flag != "":
		return *flag, nil
	case src != nil && dst != nil && *src != *dst:
		return "", fmt.Errorf("%w: the source pool sets %s backend %q and the destination pool %q; choose one for this migration", ErrConfig, kind, *src, *dst)
	case src != nil:
		return *src, nil
	case dst != nil:
		return *dst, nil
	}
	return def, nil
}

func first[T any](def T, vals ...*T) T {
	for _, v := range vals {
		if v != nil {
			return *v
		}
	}
	return def
}

func minCap(a, b *int64) int64 {
	switch {
	case a == nil || *a == 0:
		if b == nil {
			return 0
		}
		return *b
	case b == nil || *b == 0:
		return *a
	}
	return min(*a, *b)
}

// Check returns an error wrapping ErrUnknownBackend, naming the installed
// backends, when storage or network (if not "" or NetworkNone) is not in
// inst. An empty storage name is not checked.
func (inst Installed) Check(storage, network string) error {
	if storage != "" && !slices.Contains(inst.Storage, storage) {
		return fmt.Errorf("%w: storage backend %q is not installed (installed: %s; 'wanmotion plugins list' shows what is installed where)", ErrUnknownBackend, storage, listOrNone(inst.Storage))
	}
	if network != "" && network != NetworkNone && !slices.Contains(inst.Network, network) {
		return fmt.Errorf("%w: network backend %q is not installed (installed: %s; 'wanmotion plugins list' shows what is installed where)", ErrUnknownBackend, network, listOrNone(append([]string{NetworkNone}, inst.Network...)))
	}
	return nil
}

func listOrNone(l []string) string {
	if len(l) == 0 {
		return "none"
	}
	return strings.Join(l, ", ")
}

// ParseBandwidth parses a rate such as "200Mbit", "1Gbps", "50MB/s",
// "50MiB/s" or a bare number of bits per second (as tc does) and returns
// bytes per second. "0" and "unlimited" return 0 (no cap). Bit units are
// case-insensitive; byte units need an upper-case B ("MB", "MiB").
func ParseBandwidth(s string) (int64, error) {
	orig := s
	s = strings.TrimSpace(s)
	if s == "unlimited" || s == "0" {
		return 0, nil
	}
	if strings.HasSuffix(strings.ToLower(s), "/s") {
		s = s[:len(s)-2]
	}
	type unit struct {
		suffix string
		mult   float64 // bytes per second per unit
		fold   bool
	}
	units := []unit{
		{"tbit", 1e12 / 8, true}, {"gbit", 1e9 / 8, true}, {"mbit", 1e6 / 8, true}, {"kbit", 1e3 / 8, true}, {"bit", 1.0 / 8, true},
		{"tbps", 1e12 / 8, true}, {"gbps", 1e9 / 8, true}, {"mbps", 1e6 / 8, true}, {"kbps", 1e3 / 8, true}, {"bps", 1.0 / 8, true},
		{"TiB", 1 << 40, false}, {"GiB", 1 << 30, false}, {"MiB", 1 << 20, false}, {"KiB", 1 << 10, false},
		{"TB", 1e12, false}, {"GB", 1e9, false}, {"MB", 1e6, false}, {"KB", 1e3, false}, {"kB", 1e3, false}, {"B", 1, false},
	}
	mult := 1.0 / 8 // bare number: bits per second
	num := s
	for _, u := range units {
		if u.fold && len(s) >= len(u.suffix) && strings.EqualFold(s[len(s)-len(u.suffix):], u.suffix) ||
			!u.fold && strings.HasSuffix(s, u.suffix) {
			mult, num = u.mult, strings.TrimSpace(s[:len(s)-len(u.suffix)])
			break
		}
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || math.IsNaN(v) || math.IsInf(v, 0) || v <= 0 {
		return 0, fmt.Errorf("%w: bandwidth %q: want a positive rate such as 200Mbit, 1Gbps or 50MB/s", ErrConfig, orig)
	}
	b := v * mult
	if b < 1 || b > math.MaxInt64/2 {
		return 0, fmt.Errorf("%w: bandwidth %q out of range", ErrConfig, orig)
	}
	return int64(b), nil
}

// FormatConfigJSON renders overrides back to the wanmotion:config JSON
// (for `wanmotion pool configure`). Backend names are separate keys and
// not included.
func FormatConfigJSON(o Overrides) (string, error) {
	var c configJSON
	if o.BandwidthBytesPerSec != nil {
		v := strconv.FormatInt(*o.BandwidthBytesPerSec*8, 10) + "bit"
		if *o.BandwidthBytesPerSec == 0 {
			v = "unlimited"
		}
		c.Bandwidth = &v
	}
	c.Streams, c.Compression, c.GatewayListen, c.GatewayAdvertise = o.Streams, o.Compression, o.GatewayListen, o.GatewayAdvertise
	if o.DowntimeTarget != nil {
		v := o.DowntimeTarget.String()
		c.DowntimeTarget = &v
	}
	if o.Policy != nil {
		v := string(*o.Policy)
		c.ConvergencePolicy = &v
	}
	c.MaxRounds, c.MinShrink, c.MigrationNetwork, c.ThrottleMax = o.MaxRounds, o.MinShrink, o.MigrationNetwork, o.ThrottleMax
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	if err := enc.Encode(c); err != nil {
		return "", err
	}
	out := strings.TrimSpace(buf.String())
	if len(o.Sections) == 0 {
		return out, nil
	}
	// add the backend sections (sorted by name, as encoding/json does)
	var all map[string]json.RawMessage
	if err := json.Unmarshal([]byte(out), &all); err != nil {
		return "", err
	}
	for k, v := range o.Sections {
		all[k] = json.RawMessage(v)
	}
	b, err := json.Marshal(all)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// PoolConfigEntries returns the pool.other_config entries that store o
// (for `wanmotion pool configure`): wanmotion:storage and wanmotion:network
// when set, and wanmotion:config with the rest. Write each with
// remove-then-add; an empty value means "remove the key".
func PoolConfigEntries(o Overrides) (map[string]string, error) {
	m := map[string]string{KeyStorage: "", KeyNetwork: ""}
	if o.Storage != nil {
		m[KeyStorage] = *o.Storage
	}
	if o.Network != nil {
		m[KeyNetwork] = *o.Network
	}
	js, err := FormatConfigJSON(o)
	if err != nil {
		return nil, err
	}
	if js == "{}" {
		js = ""
	}
	m[KeyConfig] = js
	if _, err := ParsePoolConfig(m); err != nil { // never write what we cannot read back
		return nil, err
	}
	return m, nil
}

// knownConfigKeys are the wanmotion:config fields of configJSON.
var knownConfigKeys = func() map[string]bool {
	m := map[string]bool{}
	t := reflect.TypeOf(configJSON{})
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		m[name] = true
	}
	return m
}()

func isJSONObject(v json.RawMessage) bool {
	b := bytes.TrimSpace(v)
	return len(b) > 0 && b[0] == '{'
}

func validSectionName(k string) bool {
	if k == "" || len(k) > 64 {
		return false
	}
	for _, r := range k {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
			return false
		}
	}
	return true
}

// backendSections picks the sections of the chosen backends.
func backendSections(all map[string][]byte, names ...string) map[string][]byte {
	var out map[string][]byte
	for _, n := range names {
		if v, ok := all[n]; ok && n != "" && n != NetworkNone {
			if out == nil {
				out = map[string][]byte{}
			}
			out[n] = v
		}
	}
	return out
}
