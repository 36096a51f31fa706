package xapi

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
)

// rawURL builds base/<path>?<query> with the session added.
func (c *Client) rawURL(path string, q url.Values) (*url.URL, error) {
	base, sess, _ := c.snapshot()
	if sess == "" {
		return nil, ErrNotLoggedIn
	}
	q.Set("session_id", string(sess))
	u := *base
	u.Path = path
	u.RawQuery = q.Encode()
	return &u, nil
}

// httpError reads a short error body without echoing the URL (it carries the
// session).
func httpError(op string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	msg := strings.TrimSpace(string(b))
	if msg != "" {
		return protocolErrorf("%s: HTTP %s: %s", op, resp.Status, msg)
	}
	return protocolErrorf("%s: HTTP %s", op, resp.Status)
}

// ImportRawVDI writes size bytes from r over the whole VDI with
// PUT /import_raw_vdi?format=raw&vdi=<ref>&session_id=<session>. xapi does not
// support chunked transfer encoding, so size (the Content-Length) is
// required. If xapi redirects to another host (the SR is not local) the upload
// is retried there only when r is an io.Seeker.
func (c *Client) ImportRawVDI(ctx context.Context, vdi VDIRef, r io.Reader, size int64) error {
	const op = "PUT /import_raw_vdi"
	if size < 0 {
		return fmt.Errorf("xapi: %s: size must be known (xapi refuses chunked uploads)", op)
	}
	u, err := c.rawURL("/import_raw_vdi", url.Values{"format": {"raw"}, "vdi": {string(vdi)}})
	if err != nil {
		return fmt.Errorf("xapi: %s: %w", op, err)
	}
	hc := *c.data
	hc.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	target := u.String()
	for attempt := 0; attempt < 2; attempt++ {
		req, err := http.NewRequestWithContext(ctx, http.MethodPut, target, io.NopCloser(r))
		if err != nil {
			return fmt.Errorf("xapi: %s: %w", op, unwrapURLError(err))
		}
		req.ContentLength = size
		if size == 0 {
			req.Body = http.NoBody
		}
		resp, err := hc.Do(req)
		if err != nil {
			return &TransportError{Method: op, Err: unwrapURLError(err)}
		}
		loc := resp.Header.Get("Location")
		switch {
		case resp.StatusCode == http.StatusOK:
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
			_ = resp.Body.Close()
			return nil
		case resp.StatusCode >= 300 && resp.StatusCode < 400 && loc != "":
			_ = resp.Body.Close()
			s, ok := r.(io.Seeker)
			if !ok {
				return protocolErrorf("%s: redirected to another host and the body cannot be replayed", op)
			}
			if _, err := s.Seek(0, io.SeekStart); err != nil {
				return fmt.Errorf("xapi: %s: rewind for redirect: %w", op, err)
			}
			next, err := u.Parse(loc)
			if err != nil {
				return protocolErrorf("%s: bad redirect location", op)
			}
			target = next.String()
			continue
		default:
			err := httpError(op, resp)
			_ = resp.Body.Close()
			return err
		}
	}
	return protocolErrorf("%s: too many redirects", op)
}

// ExportRawVDI streams the whole VDI with
// GET /export_raw_vdi?format=raw&vdi=<ref>&session_id=<session>. size is the
// Content-Length (-1 when xapi did not send one). The caller must close the
// reader.
func (c *Client) ExportRawVDI(ctx context.Context, vdi VDIRef) (io.ReadCloser, int64, error) {
	const op = "GET /export_raw_vdi"
	u, err := c.rawURL("/export_raw_vdi", url.Values{"format": {"raw"}, "vdi": {string(vdi)}})
	if err != nil {
		return nil, 0, fmt.Errorf("xapi: %s: %w", op, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, 0, fmt.Errorf("xapi: %s: %w", op, unwrapURLError(err))
	}
	resp, err := c.data.Do(req)
	if err != nil {
		return nil, 0, &TransportError{Method: op, Err: unwrapURLError(err)}
	}
	if resp.StatusCode != http.StatusOK {
		err := httpError(op, resp)
		_ = resp.Body.Close()
		return nil, 0, err
	}
	return resp.Body, resp.ContentLength, nil
}
