package l2tunnel

import (
	"bufio"
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
	handle func(ctx context.Context, r registration) error
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startRegistrar(listen string, log hclog.Logger, handle func(ctx context.Context, r registration) error) (*registrar, error) {
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
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(registrationTimeout))
	var reg registration
	reply := registrationReply{OK: true}
	line, err := bufio.NewReader(io.LimitReader(c, maxRegistration)).ReadBytes('\n')
	if err == nil {
		reg, err = parseRegistration(line)
	}
	if err != nil {
		reply = registrationReply{Error: "bad registration: " + err.Error()}
	} else if err := r.handle(r.ctx, reg); err != nil {
		reply = registrationReply{Error: err.Error()}
	}
	if !reply.OK {
		r.log.Warn("registration refused", "remote", c.RemoteAddr().String(), "error", reply.Error)
	}
	b, _ := json.Marshal(reply)
	_, _ = c.Write(append(b, '\n'))
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
	if net.ParseIP(reg.Underlay) == nil {
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
// the WAN gateway) this site's underlay address.
func register(ctx context.Context, ep contract.Endpoint, reg registration) error {
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
			return fmt.Errorf("%w: %v", contract.ErrCancelled, ctx.Err())
		}
		return fmt.Errorf("reach the destination's registration channel %s: %v: %w", ep.Address, err, contract.ErrUnavailable)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	b, err := json.Marshal(reg)
	if err != nil {
		return fmt.Errorf("encode registration: %v: %w", err, contract.ErrInternal)
	}
	if _, err := c.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("send registration: %v: %w", err, contract.ErrUnavailable)
	}
	line, err := bufio.NewReader(c).ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("read registration reply: %v: %w", err, contract.ErrUnavailable)
	}
	var reply registrationReply
	if err := json.Unmarshal(line, &reply); err != nil {
		return fmt.Errorf("bad registration reply: %v: %w", err, contract.ErrInternal)
	}
	if !reply.OK {
		return fmt.Errorf("destination refused the registration: %s: %w", reply.Error, contract.ErrFailedPrecondition)
	}
	return nil
}
