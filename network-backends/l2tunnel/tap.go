package l2tunnel

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// ModeTAP carries the VM's frames in userspace: a TAP interface on each
// site's bridge, and one TCP stream between the two backends through the
// WAN gateway (the destination's registration channel, kept open). For
// sites without UDP between them.
const ModeTAP = "tap"

// tapPlane creates TAP interfaces (in the backend's or a configured
// namespace) and keeps their file descriptors; the interfaces disappear
// when the backend process ends.
type tapPlane struct {
	k   *kernelPlane
	mtu int

	mu   sync.Mutex
	taps map[string]*os.File
}

func newTAPPlane(c Config) (*tapPlane, error) {
	k, err := newKernelPlane(c.Netns)
	if err != nil {
		return nil, err
	}
	return &tapPlane{k: k, mtu: c.MTU, taps: map[string]*os.File{}}, nil
}

func (p *tapPlane) close() {
	p.mu.Lock()
	taps := p.taps
	p.taps = map[string]*os.File{}
	p.mu.Unlock()
	for _, f := range taps {
		_ = f.Close()
	}
	p.k.close()
}

// inNamespace runs fn on a thread inside ns (None: directly).
func inNamespace(ns netns.NsHandle, fn func() error) error {
	if !ns.IsOpen() {
		return fn()
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("current namespace: %v: %w", err, contract.ErrInternal)
			return
		}
		defer orig.Close()
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter namespace: %v: %w", err, contract.ErrInternal)
			return
		}
		ferr := fn()
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// openTAP creates a TAP interface name (no packet information header)
// and returns its descriptor as a pollable file.
func openTAP(ns netns.NsHandle, name string) (*os.File, error) {
	var f *os.File
	err := inNamespace(ns, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open /dev/net/tun: %v: %w", err, contract.ErrFailedPrecondition)
		}
		var req [unix.IFNAMSIZ + 64]byte
		copy(req[:unix.IFNAMSIZ-1], name)
		binary.NativeEndian.PutUint16(req[unix.IFNAMSIZ:], unix.IFF_TAP|unix.IFF_NO_PI)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req[0]))); errno != 0 {
			_ = unix.Close(fd)
			return fmt.Errorf("create tap %s: %v: %w", name, errno, contract.ErrFailedPrecondition)
		}
		f = os.NewFile(uintptr(fd), name)
		return nil
	})
	return f, err
}

func (p *tapPlane) file(name string) *os.File {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.taps[name]
}

func (p *tapPlane) ensure(ctx context.Context, t tunnel, _ tunnelParams) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%w: %v", contract.ErrCancelled, err)
	}
	br, err := p.k.bridge(t.Bridge)
	if err != nil {
		return err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.taps[t.Name] == nil {
		if l, err := p.k.h.LinkByName(t.Name); err == nil {
			// Not ours (ours vanish with their descriptor): leave it alone.
			return fmt.Errorf("interface %s exists and is not this backend's tap: %w", t.Name, contract.ErrFailedPrecondition)
		} else if !isNotFound(err) {
			return fmt.Errorf("look up %s: %v: %w", l, err, contract.ErrInternal)
		}
		f, err := openTAP(p.k.ns, t.Name)
		if err != nil {
			return err
		}
		p.taps[t.Name] = f
	}
	link, err := p.k.h.LinkByName(t.Name)
	if err != nil {
		return fmt.Errorf("look up tap %s: %v: %w", t.Name, err, contract.ErrInternal)
	}
	if p.mtu > 0 && link.Attrs().MTU != p.mtu {
		if err := p.k.h.LinkSetMTU(link, p.mtu); err != nil {
			return fmt.Errorf("set mtu on %s: %v: %w", t.Name, err, contract.ErrInternal)
		}
	}
	if link.Attrs().MasterIndex != br.Attrs().Index {
		if err := p.k.h.LinkSetMaster(link, br); err != nil {
			return fmt.Errorf("attach %s to %s: %v: %w", t.Name, t.Bridge, err, contract.ErrInternal)
		}
	}
	if err := isolate(p.k.h, link); err != nil {
		return err
	}
	if err := p.k.h.LinkSetUp(link); err != nil {
		return fmt.Errorf("set %s up: %v: %w", t.Name, err, contract.ErrInternal)
	}
	return nil
}

func (p *tapPlane) setRemote(context.Context, tunnel, tunnelParams) error { return nil }

func (p *tapPlane) remote(context.Context, tunnel) (net.IP, error) { return nil, nil }

func (p *tapPlane) remove(_ context.Context, t tunnel) error {
	p.mu.Lock()
	f := p.taps[t.Name]
	delete(p.taps, t.Name)
	p.mu.Unlock()
	if f != nil {
		_ = f.Close() // a non-persistent tap goes with its last descriptor
	}
	return nil
}

// list returns this process's taps (the only ones that exist: a tap
// vanishes with its descriptor).
func (p *tapPlane) list(context.Context) ([]FoundTunnel, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]FoundTunnel, 0, len(p.taps))
	for name := range p.taps {
		out = append(out, FoundTunnel{Name: name})
	}
	return out, nil
}

func (p *tapPlane) removeName(ctx context.Context, name string) error {
	return p.remove(ctx, tunnel{Name: name})
}

// mark refuses: a tap cannot outlive its process, so it cannot be kept.
func (p *tapPlane) mark(context.Context, tunnel, Marker) (bool, error) {
	return false, fmt.Errorf("tap mode tunnels cannot be kept: %w", contract.ErrFailedPrecondition)
}

func (p *tapPlane) describe(_ context.Context, t tunnel) string {
	link, err := p.k.h.LinkByName(t.Name)
	if err != nil || p.file(t.Name) == nil {
		return fmt.Sprintf("%s: missing", t.Name)
	}
	state := "down"
	if link.Attrs().Flags&net.FlagUp != 0 {
		state = "up"
	}
	return fmt.Sprintf("%s: tap channel %d on %s %s", t.Name, t.VNI, t.Bridge, state)
}

func (p *tapPlane) localAddress(ctx context.Context, ifname string) (net.IP, error) {
	return p.k.localAddress(ctx, ifname)
}

func (p *tapPlane) send(ctx context.Context, ifname string, frames [][]byte) error {
	return p.k.send(ctx, ifname, frames)
}

// tapLink pumps frames between a handle's TAP interfaces and one TCP
// stream to the other site. Each frame travels as a 4-byte channel (the
// tunnel's VNI), a 2-byte length and the Ethernet frame. The source
// (re)dials the destination; the destination takes the stream its
// registration channel hands over.
type tapLink struct {
	log   hclog.Logger
	plane *tapPlane
	chans map[uint32]string // channel → tap name

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	conn    net.Conn
	connGen int
	wmu     sync.Mutex // serialises writes on conn

	frames, dropped uint64
}

func newTAPLink(log hclog.Logger, plane *tapPlane, ts []tunnel) *tapLink {
	ctx, cancel := context.WithCancel(context.Background())
	l := &tapLink{log: log, plane: plane, chans: map[uint32]string{}, ctx: ctx, cancel: cancel}
	for _, t := range ts {
		l.chans[uint32(t.VNI)] = t.Name
		f := plane.file(t.Name)
		if f == nil {
			continue
		}
		l.wg.Add(1)
		go l.fromTAP(uint32(t.VNI), f)
	}
	return l
}

// fromTAP forwards frames the bridge sends into a tap to the stream.
func (l *tapLink) fromTAP(ch uint32, f *os.File) {
	defer l.wg.Done()
	buf := make([]byte, 6+65536)
	for {
		n, err := f.Read(buf[6:])
		if err != nil {
			if l.ctx.Err() == nil && !errors.Is(err, os.ErrClosed) {
				l.log.Warn("tap read failed", "channel", ch, "error", err)
			}
			return
		}
		if n > 0xffff {
			continue // cannot be framed; a tap MTU that large is not supported
		}
		binary.BigEndian.PutUint32(buf[0:4], ch)
		binary.BigEndian.PutUint16(buf[4:6], uint16(n))
		l.mu.Lock()
		c := l.conn
		l.mu.Unlock()
		if c == nil {
			l.mu.Lock()
			l.dropped++
			l.mu.Unlock()
			continue
		}
		l.wmu.Lock()
		_ = c.SetWriteDeadline(time.Now().Add(5 * time.Second))
		_, err = c.Write(buf[:6+n])
		l.wmu.Unlock()
		if err != nil {
			l.drop(c, err)
		}
	}
}

// attach makes c the stream (replacing any older one) and reads from it.
func (l *tapLink) attach(c net.Conn) {
	l.mu.Lock()
	if l.ctx.Err() != nil {
		l.mu.Unlock()
		_ = c.Close()
		return
	}
	old := l.conn
	l.conn = c
	l.connGen++
	l.mu.Unlock()
	if old != nil {
		_ = old.Close()
	}
	l.wg.Add(1)
	go l.toTAP(c)
}

func (l *tapLink) connected() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.conn != nil
}

func (l *tapLink) drop(c net.Conn, err error) {
	l.mu.Lock()
	if l.conn == c {
		l.conn = nil
	}
	l.mu.Unlock()
	_ = c.Close()
	if l.ctx.Err() == nil && err != nil && !errors.Is(err, net.ErrClosed) && !errors.Is(err, io.EOF) {
		l.log.Warn("tap stream lost", "error", err)
	}
}

// toTAP writes frames from the stream into the taps.
func (l *tapLink) toTAP(c net.Conn) {
	defer l.wg.Done()
	r := bufio.NewReaderSize(c, 1<<16)
	var hdr [6]byte
	buf := make([]byte, 65536)
	for {
		_ = c.SetReadDeadline(time.Time{})
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			l.drop(c, err)
			return
		}
		n := int(binary.BigEndian.Uint16(hdr[4:6]))
		if _, err := io.ReadFull(r, buf[:n]); err != nil {
			l.drop(c, err)
			return
		}
		name, ok := l.chans[binary.BigEndian.Uint32(hdr[0:4])]
		if !ok {
			continue
		}
		if f := l.plane.file(name); f != nil {
			if _, err := f.Write(buf[:n]); err == nil {
				l.mu.Lock()
				l.frames++
				l.mu.Unlock()
			}
		}
	}
}

// dialLoop keeps a stream to the destination up (source side).
func (l *tapLink) dialLoop(dial func(ctx context.Context) (net.Conn, error)) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			if !l.connected() {
				c, err := dial(l.ctx)
				if err == nil {
					l.attach(c)
				} else if l.ctx.Err() == nil {
					l.log.Debug("tap stream dial failed", "error", err)
				}
				if err == nil {
					l.log.Debug("tap stream dialled")
				}
			}
			select {
			case <-l.ctx.Done():
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
}

func (l *tapLink) close() {
	l.cancel()
	l.mu.Lock()
	c := l.conn
	l.conn = nil
	l.mu.Unlock()
	if c != nil {
		_ = c.Close()
	}
	// The tap readers end when their descriptors close (plane.remove).
}

// wait waits for every goroutine (after close and the taps' removal).
func (l *tapLink) wait() { l.wg.Wait() }
