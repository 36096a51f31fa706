package nbdstore

import (
	"context"
	"crypto/subtle"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/wanmotion/wanmotion/nbd"
	"github.com/wanmotion/wanmotion/plugins/contract"
	"github.com/wanmotion/wanmotion/xapi"
)

// receiver is the destination's NBD server on the replica device.
type receiver struct {
	file    *nbd.FileBackend
	size    int64
	j       *journal
	ln      net.Listener
	cancel  context.CancelFunc
	done    chan struct{}
	syncMu  sync.Mutex
	rxBytes atomic.Int64

	stopOnce sync.Once
}

// Export names, under the receiver's secret token:
//
//	<token>/data/<round>/<snapshot-uuid>  the writable replica (journal keyed by round+snapshot)
//	<token>/journal                       read-only: the msgpack journal record
//	<token>/hash                          read-only: SHA-256 per 64 KiB block of the replica
func dataExport(token string, round int, snapshot string) string {
	return token + "/data/" + strconv.Itoa(round) + "/" + snapshot
}

func (r *receiver) exports(token string) nbd.ExportFunc {
	return func(_ context.Context, name string) (*nbd.Export, error) {
		tok, rest, _ := strings.Cut(name, "/")
		if subtle.ConstantTimeCompare([]byte(tok), []byte(token)) != 1 {
			return nil, fmt.Errorf("%w: wrong token", nbd.ErrPolicy)
		}
		switch {
		case rest == "journal":
			b, err := r.j.encoded()
			if err != nil {
				return nil, err
			}
			mem := nbd.NewMemBackend(int64(len(b)))
			if _, err := mem.WriteAt(b, 0); err != nil {
				return nil, err
			}
			return &nbd.Export{Name: name, Backend: mem, ReadOnly: true}, nil
		case rest == "hash":
			return &nbd.Export{Name: name, Backend: newHashBackend(r.file, r.size), ReadOnly: true, MultiConn: true}, nil
		case strings.HasPrefix(rest, "data/"):
			roundStr, snap, ok := strings.Cut(strings.TrimPrefix(rest, "data/"), "/")
			round, err := strconv.Atoi(roundStr)
			if !ok || err != nil || round < 0 {
				return nil, fmt.Errorf("%w: bad data export %q", nbd.ErrUnknownExport, rest)
			}
			gen := r.j.begin(round, snap)
			return &nbd.Export{Name: name, Backend: &replicaBackend{f: r.file, j: r.j, gen: gen, size: r.size, syncMu: &r.syncMu},
				MultiConn: true}, nil
		}
		return nil, fmt.Errorf("%w: %q", nbd.ErrUnknownExport, rest)
	}
}

// countingListener counts bytes received on accepted connections.
type countingListener struct {
	net.Listener
	n *atomic.Int64
}

func (l countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, n: l.n}, nil
}

type countingConn struct {
	net.Conn
	n *atomic.Int64
}

func (c *countingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// stop ends serving and makes everything durable; idempotent.
func (r *receiver) stop() {
	r.stopOnce.Do(func() {
		r.cancel()
		<-r.done
		r.syncMu.Lock()
		pending := r.j.takePending()
		if r.file.Sync() == nil {
			_ = r.j.commit(pending)
		}
		r.syncMu.Unlock()
		_ = r.file.Close()
	})
}

// startReceiver opens the replica device and serves it on listen.
func (b *Backend) startReceiver(h *handle, fallbackListen bool) error {
	_, dir := b.config()
	f, err := nbd.OpenFile(h.st.DevicePath, false)
	if err != nil {
		return fmt.Errorf("open replica device %s: %v: %w", h.st.DevicePath, err, contract.ErrFailedPrecondition)
	}
	size := h.st.ReplicaSize
	if fs, err := f.Size(); err == nil && fs > 0 && (size <= 0 || fs < size) {
		size = fs
	}
	addr := h.st.Listen
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil && fallbackListen {
		ln, err = net.Listen("tcp", "127.0.0.1:0") // the old port is taken: move
	}
	if err != nil {
		_ = f.Close()
		return fmt.Errorf("listen %s: %v: %w", addr, err, contract.ErrUnavailable)
	}
	r := &receiver{file: f, size: size, j: loadJournal(journalPath(dir, h.id), size), ln: ln, done: make(chan struct{})}
	srv, err := nbd.NewServer(nbd.ServerOptions{Exports: r.exports(h.st.Token), Logger: h.log.Named("nbd-server"),
		MaxInFlight: 64, MaxBufferBytes: 128 << 20})
	if err != nil {
		_ = ln.Close()
		_ = f.Close()
		return fmt.Errorf("nbd server: %v: %w", err, contract.ErrInternal)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	go func() {
		defer close(r.done)
		if err := srv.Serve(ctx, countingListener{Listener: ln, n: &r.rxBytes}); err != nil {
			h.log.Warn("nbd server stopped", "error", err)
		}
	}()
	h.mu.Lock()
	h.recv = r
	h.st.Listen = ln.Addr().String()
	h.mu.Unlock()
	return nil
}

func (h *handle) endpointLocked() contract.Endpoint {
	params, _ := contract.EncodeOpaque(EndpointParams{Protocol: Protocol, Size: h.st.ReplicaSize, BlockSize: blockSize})
	return contract.Endpoint{Network: "tcp", Address: h.st.Listen, Token: contract.Secret(h.st.Token), Params: params}
}

// PrepareReceiver implements contract.Storage.
func (b *Backend) PrepareReceiver(ctx context.Context, req contract.PrepareReceiverRequest) (contract.PrepareReceiverResponse, error) {
	var zero contract.PrepareReceiverResponse
	if err := ctx.Err(); err != nil {
		return zero, fmt.Errorf("prepare receiver: %w: %v", contract.ErrCancelled, err)
	}
	if req.MigrationID == "" || req.Disk.VDIUUID == "" || req.Disk.VirtualSize <= 0 {
		return zero, fmt.Errorf("need MigrationID, Disk.VDIUUID and a positive Disk.VirtualSize: %w", contract.ErrInvalidArgument)
	}
	if req.ReplicaVDIUUID == "" && req.DestSRUUID == "" {
		return zero, fmt.Errorf("need ReplicaVDIUUID or DestSRUUID: %w", contract.ErrInvalidArgument)
	}
	cfg, dir := b.config()
	if dir == "" {
		return zero, fmt.Errorf("no state directory configured: %w", contract.ErrFailedPrecondition)
	}
	key := req
	key.XAPI = contract.XAPIAccess{}
	id := handleID(contract.RoleDestination, req.MigrationID, req.Disk.VDIUUID)
	b.prepMu.Lock()
	defer b.prepMu.Unlock()
	if old, err := b.existing(id, key); err != nil {
		return zero, err
	} else if old != nil {
		return old.receiverResponse(true)
	}
	x, err := openXAPI(req.XAPI.URL, string(req.XAPI.Session), req.XAPI.TLSPin, b.log)
	if err != nil {
		return zero, err
	}
	h := &handle{id: id, migration: req.MigrationID, role: contract.RoleDestination, request: key,
		state: contract.StatePrepared, round: -1, x: x, log: b.log.With("handle", id),
		st: stateV1{Role: string(contract.RoleDestination), VirtualSize: req.Disk.VirtualSize, VDIUUID: req.Disk.VDIUUID,
			XAPIURL: req.XAPI.URL, Session: string(req.XAPI.Session), XAPIPin: req.XAPI.TLSPin, HostUUID: req.XAPI.HostUUID,
			Listen: req.Listen, Token: randomHex(16), Round: -1}}
	ok := false
	defer func() {
		if !ok {
			b.undoReceiver(h)
		}
	}()
	if err := b.takeReplica(ctx, h, req, cfg); err != nil {
		return zero, err
	}
	vbd, path, err := attachToDom0(ctx, x, h.st.HostUUID, xapi.VDIRef(h.st.ReplicaRef), xapi.VBDModeRW, "replica:"+req.MigrationID)
	if err != nil {
		return zero, fmt.Errorf("attach replica: %w", err)
	}
	h.st.VBDRef, h.st.DevicePath = string(vbd), path
	if err := b.startReceiver(h, false); err != nil {
		return zero, err
	}
	ok = true
	b.put(h)
	h.log.Info("receiver prepared", "replica", h.st.ReplicaUUID, "listen", h.st.Listen, "created", h.st.Created)
	return h.receiverResponse(false)
}

// undoReceiver releases what a failed prepare made.
func (b *Backend) undoReceiver(h *handle) {
	ctx := context.Background()
	h.mu.Lock()
	r := h.recv
	h.recv = nil
	h.mu.Unlock()
	if r != nil {
		r.stop()
	}
	detachFromDom0(ctx, h.x, xapi.VBDRef(h.st.VBDRef))
	if h.st.Created && h.st.ReplicaRef != "" {
		_ = h.x.VDIDestroy(ctx, xapi.VDIRef(h.st.ReplicaRef))
	}
	closeXAPI(h.x)
}

// takeReplica finds the named replica or creates one on DestSRUUID,
// checking sizes and free space.
func (b *Backend) takeReplica(ctx context.Context, h *handle, req contract.PrepareReceiverRequest, cfg Config) error {
	x := h.x
	if req.ReplicaVDIUUID != "" {
		ref, err := x.VDIGetByUUID(ctx, req.ReplicaVDIUUID)
		if err != nil {
			return xapiErr("replica VDI "+req.ReplicaVDIUUID, err)
		}
		rec, err := x.VDIGetRecord(ctx, ref)
		if err != nil {
			return xapiErr("replica VDI record", err)
		}
		if rec.VirtualSize < req.Disk.VirtualSize {
			return fmt.Errorf("replica VDI %s is %d bytes, smaller than the source disk (%d bytes): %w",
				req.ReplicaVDIUUID, rec.VirtualSize, req.Disk.VirtualSize, contract.ErrFailedPrecondition)
		}
		if rec.ReadOnly || rec.IsASnapshot {
			return fmt.Errorf("replica VDI %s is read-only or a snapshot: %w", req.ReplicaVDIUUID, contract.ErrInvalidArgument)
		}
		h.st.ReplicaUUID, h.st.ReplicaRef, h.st.ReplicaSize = rec.UUID, string(ref), rec.VirtualSize
		return nil
	}
	sr, err := x.SRGetByUUID(ctx, req.DestSRUUID)
	if err != nil {
		return xapiErr("destination SR "+req.DestSRUUID, err)
	}
	srec, err := x.SRGetRecord(ctx, sr)
	if err != nil {
		return xapiErr("destination SR record", err)
	}
	if free := srec.PhysicalSize - srec.PhysicalUtilisation; !cfg.SkipSRSpaceCheck && srec.PhysicalSize > 0 && free < req.Disk.VirtualSize {
		return fmt.Errorf("destination SR %s has %d bytes free, the disk needs up to %d: %w",
			srec.NameLabel, free, req.Disk.VirtualSize, contract.ErrFailedPrecondition)
	}
	name := req.Disk.Name
	if name == "" {
		name = req.Disk.VDIUUID
	}
	ref, err := x.VDICreate(ctx, xapi.VDICreateSpec{NameLabel: "wanmotion replica of " + name,
		NameDescription: "seeded by wanmotion (storage nbd)", SR: sr, VirtualSize: req.Disk.VirtualSize,
		OtherConfig: map[string]string{"wanmotion:migration_id": req.MigrationID, "wanmotion:source_vdi": req.Disk.VDIUUID}})
	if err != nil {
		return xapiErr("create replica VDI", err)
	}
	h.st.Created, h.st.ReplicaRef, h.st.ReplicaSize = true, string(ref), req.Disk.VirtualSize
	rec, err := x.VDIGetRecord(ctx, ref)
	if err != nil {
		return xapiErr("replica VDI record", err)
	}
	h.st.ReplicaUUID = rec.UUID
	return nil
}

func (h *handle) receiverResponse(existing bool) (contract.PrepareReceiverResponse, error) {
	hd, err := h.handle()
	if err != nil {
		return contract.PrepareReceiverResponse{}, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	return contract.PrepareReceiverResponse{Handle: hd, Endpoint: h.endpointLocked(), ReplicaVDIUUID: h.st.ReplicaUUID,
		ReplicaVDIRef: h.st.ReplicaRef, Existing: existing}, nil
}

// reopenReceiver re-attaches (if needed) and serves the replica after a
// restart.
func (b *Backend) reopenReceiver(ctx context.Context, h *handle) error {
	if h.st.XAPIURL != "" && h.st.Session != "" {
		x, err := openXAPI(h.st.XAPIURL, h.st.Session, h.st.XAPIPin, b.log)
		if err == nil {
			h.x = x
		}
	}
	if h.x != nil && h.st.VBDRef != "" {
		path, err := vbdDevicePath(ctx, h.x, xapi.VBDRef(h.st.VBDRef))
		if err != nil {
			// Unplugged or gone: attach again.
			detachFromDom0(ctx, h.x, xapi.VBDRef(h.st.VBDRef))
			vbd, p, err := attachToDom0(ctx, h.x, h.st.HostUUID, xapi.VDIRef(h.st.ReplicaRef), xapi.VBDModeRW, "replica:"+h.migration)
			if err != nil {
				return fmt.Errorf("re-attach replica: %w", err)
			}
			h.st.VBDRef, path = string(vbd), p
		}
		h.st.DevicePath = path
	}
	return b.startReceiver(h, true)
}

// Finalize implements contract.Storage: it stops serving, makes the
// replica durable, detaches it from dom0 and keeps it.
func (b *Backend) Finalize(ctx context.Context, req contract.FinalizeRequest) (contract.FinalizeResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.FinalizeResponse{}, err
	}
	if h.role != contract.RoleDestination {
		return contract.FinalizeResponse{}, fmt.Errorf("finalize on a %s handle: %w", h.role, contract.ErrInvalidArgument)
	}
	h.mu.Lock()
	if h.state == contract.StateAborted {
		h.mu.Unlock()
		return contract.FinalizeResponse{}, fmt.Errorf("handle %s was aborted: %w", h.id, contract.ErrFailedPrecondition)
	}
	r, x, vbd := h.recv, h.x, h.st.VBDRef
	h.mu.Unlock()
	if r != nil {
		r.stop()
	}
	if vbd != "" && x != nil {
		if err := x.VBDUnplug(ctx, xapi.VBDRef(vbd)); err != nil && !isGone(err) && !xapi.IsCode(err, "DEVICE_ALREADY_DETACHED") {
			return contract.FinalizeResponse{}, xapiErr("unplug replica", err)
		}
		if err := x.VBDDestroy(ctx, xapi.VBDRef(vbd)); err != nil && !isGone(err) {
			return contract.FinalizeResponse{}, xapiErr("destroy replica VBD", err)
		}
	}
	h.mu.Lock()
	h.state = contract.StateFinalized
	h.st.Finalized = true
	h.st.VBDRef, h.st.DevicePath = "", ""
	uuid, ref := h.st.ReplicaUUID, h.st.ReplicaRef
	h.mu.Unlock()
	hd, err := h.handle()
	return contract.FinalizeResponse{ReplicaVDIUUID: uuid, ReplicaVDIRef: ref, State: hd.State}, err
}
