package xapisim

import (
	"io"
	"net/http"
	"strconv"
)

// maxRequestBody bounds an XML-RPC request body.
const maxRequestBody = 64 << 20

// handler is one host's HTTP handler: XML-RPC on POST to any path not
// otherwise registered (xapi picks handlers by longest prefix, so "/",
// "/RPC2" and e.g. "/xmlrpc" all reach the RPC endpoint), plus the raw
// VDI import/export actions.
func (s *Sim) handler(h *Host) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/import_raw_vdi", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPut {
			s.serveRPCOrReject(h, w, r)
			return
		}
		s.importRawVDI(h, w, r)
	})
	mux.HandleFunc("/export_raw_vdi", func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			s.serveRPCOrReject(h, w, r)
			return
		}
		s.exportRawVDI(h, w, r)
	})
	mux.HandleFunc("/jsonrpc", func(w http.ResponseWriter, r *http.Request) {
		s.serveJSONRPC(h, w, r)
	})
	for _, e := range extraHandlers {
		mux.Handle(e.pattern, e.fn(s, h))
	}
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		s.serveRPCOrReject(h, w, r)
	})
	return mux
}

// extraHandlers lets later work add HTTP actions (e.g. /services/SM).
var extraHandlers []struct {
	pattern string
	fn      func(s *Sim, h *Host) http.Handler
}

// RegisterHTTP adds an HTTP action served by every host (call from an init
// function in this package).
func RegisterHTTP(pattern string, fn func(s *Sim, h *Host) http.Handler) {
	extraHandlers = append(extraHandlers, struct {
		pattern string
		fn      func(s *Sim, h *Host) http.Handler
	}{pattern, fn})
}

func (s *Sim) serveRPCOrReject(h *Host, w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
		return
	}
	s.serveRPC(h, w, r)
}

func (s *Sim) serveRPC(h *Host, w http.ResponseWriter, r *http.Request) {
	req, err := ParseRequest(io.LimitReader(r.Body, maxRequestBody))
	var resp Response
	if err != nil {
		resp = Response{Fault: Errorf(ErrInternal, err.Error())}
	} else {
		resp = s.dispatch(r.Context(), h, req)
		if resp.Fault != nil {
			s.log.Debug("call failed", "method", req.Method, "host", h.Name, "code", resp.Fault.Code)
		} else {
			s.log.Trace("call", "method", req.Method, "host", h.Name)
		}
	}
	body := resp.Encode()
	w.Header().Set("Content-Type", "text/xml")
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	_, _ = w.Write(body)
}
