package engine

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// DestURLKeys are the keys of host.migrate_receive's result that hold URLs
// the source host connects to; RewriteDest points them at the WAN gateway.
var DestURLKeys = []string{"SM", "xenops", "master"}

// URLTarget returns the "host:port" a URL connects to (port 80 for http and
// 443 for https when absent).
func URLTarget(raw string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("parse url %q: %w", raw, err)
	}
	if u.Host == "" || u.Hostname() == "" {
		return "", fmt.Errorf("url %q has no host", raw)
	}
	port := u.Port()
	if port == "" {
		switch strings.ToLower(u.Scheme) {
		case "http":
			port = "80"
		case "https":
			port = "443"
		default:
			return "", fmt.Errorf("url %q: unknown scheme %q and no port", raw, u.Scheme)
		}
	}
	return net.JoinHostPort(u.Hostname(), port), nil
}

// RewriteURL replaces the scheme, host and port of raw with those of base
// ("scheme://host:port", no path) and keeps raw's path, query and fragment
// byte for byte. User info in raw is dropped.
func RewriteURL(raw, base string) (string, error) {
	u, err := url.Parse(raw)
	if err != nil {
		return "", fmt.Errorf("parse url %q: %w", raw, err)
	}
	if u.Host == "" {
		return "", fmt.Errorf("url %q has no host", raw)
	}
	b, err := url.Parse(base)
	if err != nil {
		return "", fmt.Errorf("parse gateway base %q: %w", base, err)
	}
	if b.Scheme == "" || b.Host == "" || (b.Path != "" && b.Path != "/") || b.RawQuery != "" || b.User != nil || b.Fragment != "" {
		return "", fmt.Errorf("gateway base %q: want scheme://host:port only", base)
	}
	out := &url.URL{
		Scheme:      b.Scheme,
		Host:        b.Host,
		Path:        u.Path,
		RawPath:     u.RawPath,
		RawQuery:    u.RawQuery,
		Fragment:    u.Fragment,
		RawFragment: u.RawFragment,
		ForceQuery:  u.ForceQuery,
	}
	return out.String(), nil
}

// RewriteDest returns a copy of a host.migrate_receive result whose SM,
// xenops and master URLs point at local ends of the WAN gateway. forward
// receives each URL's "host:port" target and returns the "host:port" of the
// local end that tunnels TCP to it (each target is asked once). Each URL
// keeps its scheme (an https URL stays https end to end through the
// tunnel), path and query. Other keys are copied unchanged. A missing URL
// key is an error: xapi always returns all three.
func RewriteDest(dest map[string]string, forward func(target string) (string, error)) (map[string]string, error) {
	out := make(map[string]string, len(dest))
	for k, v := range dest {
		out[k] = v
	}
	locals := map[string]string{}
	for _, k := range DestURLKeys {
		raw, ok := dest[k]
		if !ok || raw == "" {
			return nil, fmt.Errorf("migrate_receive result has no %q url", k)
		}
		target, err := URLTarget(raw)
		if err != nil {
			return nil, fmt.Errorf("dest %s: %w", k, err)
		}
		local, ok := locals[target]
		if !ok {
			local, err = forward(target)
			if err != nil {
				return nil, fmt.Errorf("gateway forward to %s: %w", target, err)
			}
			if _, _, err := net.SplitHostPort(local); err != nil {
				return nil, fmt.Errorf("gateway forward to %s: local end %q: %w", target, local, err)
			}
			locals[target] = local
		}
		u, _ := url.Parse(raw) // parsed by URLTarget already
		nu, err := RewriteURL(raw, u.Scheme+"://"+local)
		if err != nil {
			return nil, fmt.Errorf("dest %s: %w", k, err)
		}
		out[k] = nu
	}
	return out, nil
}
