package l2tunnel

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// The registration channel: the destination listens (its Endpoint, which
// the engine forwards through the WAN gateway); the source connects once
// and tells its underlay address, so the destination's tunnels learn
// where to send. One JSON line each way.

type registration struct {
	Token       string `json:"token"`
	MigrationID string `json:"migration_id"`
	VMUUID      string `json:"vm_uuid"`
	Underlay    string `json:"underlay"`
	// Stream (tap mode): keep the connection as the frame stream.
	Stream bool `json:"stream,omitempty"`
}

type registrationReply struct {
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

const registrationTimeout = 10 * time.Second

// registrar serves one destination handle's registration channel.
type registrar struct {
	ln     net.Listener
	log    hclog.Logger
	handle registrationHandler
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

// registrationHandler applies a registration; a non-nil keep takes the
// connection over (after the reply) as a frame stream.
type registrationHandler func(ctx context.Context, r registration) (keep func(net.Conn), err error)

func startRegistrar(listen string, log hclog.Logger, handle registrationHandler) (*registrar, error) {
	if listen == "" {
		listen = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("listen for the source's registration on %s: %v: %w", listen, err, contract.ErrUnavailable)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &registrar{ln: ln, log: log, handle: handle, ctx: ctx, cancel: cancel}
	r.wg.Add(1)
	go r.serve()
	return r, nil
}

func (r *registrar) addr() string { return r.ln.Addr().String() }

func (r *registrar) serve() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				r.log.Warn("registration accept failed", "error", err)
			}
			return
		}
		r.wg.Add(1)
		go func() {
			defer r.wg.Done()
			r.serveConn(c)
		}()
	}
}

func (r *registrar) serveConn(c net.Conn) {
	_ = c.SetDeadline(time.Now().Add(registrationTimeout))
	var reg registration
	var keep func(net.Conn)
	reply := registrationReply{OK: true}
	line, err := readLine(io.LimitReader(c, maxRegistration))
	if err == nil {
		reg, err = parseRegistration(line)
	}
	if err == nil {
		keep, err = r.handle(r.ctx, reg)
	}
	if err != nil {
		reply = registrationReply{Error: err.Error()}
		keep = nil
		r.log.Warn("registration refused", "remote", c.RemoteAddr().String(), "error", reply.Error)
	}
	b, _ := json.Marshal(reply)
	if _, err := c.Write(append(b, '\n')); err != nil || keep == nil {
		_ = c.Close()
		return
	}
	_ = c.SetDeadline(time.Time{})
	keep(c)
}

// readLine reads up to and including '\n' one byte at a time, so nothing
// after the line (frames of a stream) is consumed.
func readLine(r io.Reader) ([]byte, error) {
	var line []byte
	var b [1]byte
	for {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return nil, err
		}
		line = append(line, b[0])
		if b[0] == '\n' {
			return line, nil
		}
	}
}

// maxRegistration bounds what the registrar reads from a connection.
const maxRegistration = 4096

// parseRegistration decodes one registration line from the network.
func parseRegistration(line []byte) (registration, error) {
	var reg registration
	if err := json.Unmarshal(line, &reg); err != nil {
		return reg, invalid("registration: %v", err)
	}
	if reg.Token == "" || reg.MigrationID == "" || reg.VMUUID == "" {
		return reg, invalid("registration: token, migration_id and vm_uuid are required")
	}
	if !reg.Stream && net.ParseIP(reg.Underlay) == nil {
		return reg, invalid("registration: underlay %q is not an IP address", reg.Underlay)
	}
	return reg, nil
}

func (r *registrar) close() {
	r.cancel()
	_ = r.ln.Close()
	r.wg.Wait()
}

// checkToken compares tokens in constant time.
func checkToken(want, got string) bool {
	return want != "" && subtle.ConstantTimeCompare([]byte(want), []byte(got)) == 1
}

// register tells the destination (through ep, usually the local end of
// the WAN gateway) this site's underlay address. With reg.Stream the
// connection is returned open, as the frame stream; otherwise it is closed.
func register(ctx context.Context, ep contract.Endpoint, reg registration) (net.Conn, error) {
	network := ep.Network
	if network == "" {
		network = "tcp"
	}
	ctx, cancel := context.WithTimeout(ctx, registrationTimeout)
	defer cancel()
	var d net.Dialer
	c, err := d.DialContext(ctx, network, ep.Address)
	if err != nil {
		if ctx.Err() != nil && errors.Is(ctx.Err(), context.Canceled) {
			return nil, fmt.Errorf("%w: %v", contract.ErrCancelled, ctx.Err())
		}
		return nil, fmt.Errorf("reach the destination's registration channel %s: %v: %w", ep.Address, err, contract.ErrUnavailable)
	}
	ok := false
	defer func() {
		if !ok {
			_ = c.Close()
		}
	}()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	b, err := json.Marshal(reg)
	if err != nil {
		return nil, fmt.Errorf("encode registration: %v: %w", err, contract.ErrInternal)
	}
	if _, err := c.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("send registration: %v: %w", err, contract.ErrUnavailable)
	}
	line, err := readLine(io.LimitReader(c, maxRegistration))
	if err != nil {
		return nil, fmt.Errorf("read registration reply: %v: %w", err, contract.ErrUnavailable)
	}
	var reply registrationReply
	if err := json.Unmarshal(line, &reply); err != nil {
		return nil, fmt.Errorf("bad registration reply: %v: %w", err, contract.ErrInternal)
	}
	if !reply.OK {
		return nil, fmt.Errorf("destination refused the registration: %s: %w", reply.Error, contract.ErrFailedPrecondition)
	}
	if !reg.Stream {
		return nil, nil
	}
	_ = c.SetDeadline(time.Time{})
	ok = true
	return c, nil
}
