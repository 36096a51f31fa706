package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/wanmotion/wanmotion/plugins/contract"
)

// The wire protocol between sender and receiver (over the WAN gateway
// channel): a hello line "FILECOPY1 <token>\n", then frames of
// op(1) offset(8) length(4) [data]. Ops: 'R' round start (offset = round),
// 'W' write data, 'Z' zero range, 'F' flush (the receiver syncs and
// answers 'K').
const (
	hello     = "FILECOPY1 "
	frameHead = 13
	opRound   = 'R'
	opWrite   = 'W'
	opZero    = 'Z'
	opFlush   = 'F'
	ack       = 'K'
	maxFrame  = 16 << 20
)

// SyncRound implements contract.Storage.
func (b *Backend) SyncRound(ctx context.Context, req contract.SyncRoundRequest) (contract.SyncRoundResponse, error) {
	h, err := b.get(req.Handle)
	if err != nil {
		return contract.SyncRoundResponse{}, err
	}
	if h.role != contract.RoleSource {
		return contract.SyncRoundResponse{}, fmt.Errorf("SyncRound on a %s handle: %w", h.role, contract.ErrInvalidArgument)
	}
	bs := req.BlockSize
	if bs == 0 {
		bs = contract.DefaultBlockSize
	}
	if bs < 512 || bs > maxFrame || req.Round < 0 || (!req.Full && len(req.ChangedBlocks) == 0) || req.Snapshot.UUID == "" {
		return contract.SyncRoundResponse{}, fmt.Errorf("need a snapshot, a round >= 0, a sane block size and Full or ChangedBlocks: %w", contract.ErrInvalidArgument)
	}
	b.mu.Lock()
	srcDir := b.cfg.SourceDir
	b.mu.Unlock()
	f, err := os.Open(filepath.Join(srcDir, filepath.Base(req.Snapshot.UUID)+".img"))
	if errors.Is(err, os.ErrNotExist) {
		return contract.SyncRoundResponse{}, fmt.Errorf("snapshot %s: %w", req.Snapshot.UUID, contract.ErrNotFound)
	}
	if err != nil {
		return contract.SyncRoundResponse{}, fmt.Errorf("snapshot: %w", err)
	}
	defer f.Close()

	h.mu.Lock()
	switch h.state {
	case contract.StateSyncing:
		h.mu.Unlock()
		return contract.SyncRoundResponse{}, fmt.Errorf("a round is already running: %w", contract.ErrFailedPrecondition)
	case contract.StateAborted:
		h.mu.Unlock()
		return contract.SyncRoundResponse{}, fmt.Errorf("handle aborted: %w", contract.ErrFailedPrecondition)
	}
	size := h.st.VirtualSize
	blocks := changed(req, size, bs)
	toCopy := int64(0)
	for _, i := range blocks {
		toCopy += min(bs, size-i*bs)
	}
	rctx, cancel := context.WithCancel(ctx)
	defer cancel()
	h.cancel, h.state, h.round, h.started, h.lastErr = cancel, contract.StateSyncing, req.Round, time.Now(), ""
	h.toCopy.Store(toCopy)
	h.copied.Store(0)
	h.onWire.Store(0)
	peer, token, rate := h.st.PeerAddress, h.st.PeerToken, h.st.RateLimit
	h.mu.Unlock()

	err = h.send(rctx, f, peer, token, req.Round, blocks, bs, size, rate)

	h.mu.Lock()
	h.cancel = nil
	aborted := h.state == contract.StateAborted
	switch {
	case aborted:
		err = fmt.Errorf("round %d aborted: %w", req.Round, contract.ErrCancelled)
	case err != nil && ctx.Err() != nil:
		err = fmt.Errorf("round %d: %w", req.Round, ctx.Err())
		h.state = contract.StateIdle
	case err != nil:
		h.state, h.lastErr = contract.StateFailed, err.Error()
	default:
		h.state = contract.StateIdle
		h.st.Round, h.st.Snapshot = req.Round, req.Snapshot.UUID
	}
	h.mu.Unlock()
	if err != nil {
		return contract.SyncRoundResponse{}, err
	}
	hd, err := h.handle()
	stats := contract.RoundStats{Round: req.Round, BytesToCopy: toCopy, BytesCopied: h.copied.Load(),
		BytesOnWire: h.onWire.Load(), Duration: time.Since(h.started)}
	return contract.SyncRoundResponse{Stats: stats, State: hd.State}, err
}

// changed lists the block numbers the round copies.
func changed(req contract.SyncRoundRequest, size, bs int64) []int64 {
	n := (size + bs - 1) / bs
	var out []int64
	for i := int64(0); i < n; i++ {
		if req.Full {
			out = append(out, i)
			continue
		}
		if i/8 < int64(len(req.ChangedBlocks)) && req.ChangedBlocks[i/8]&(0x80>>(i%8)) != 0 {
			out = append(out, i)
		}
	}
	return out
}

func (h *handle) send(ctx context.Context, f *os.File, peer, token string, round int, blocks []int64, bs, size, rate int64) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", peer)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("dial receiver %s: %v: %w", peer, err, contract.ErrUnavailable)
	}
	defer conn.Close()
	stop := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stop()

	w := bufio.NewWriterSize(conn, 256<<10)
	if _, err := w.WriteString(hello + token + "\n"); err != nil {
		return err
	}
	if err := writeFrame(w, opRound, int64(round), nil, 0); err != nil {
		return err
	}
	buf := make([]byte, bs)
	start := time.Now()
	for _, blk := range blocks {
		if err := ctx.Err(); err != nil {
			return err
		}
		off := blk * bs
		n := min(bs, size-off)
		m, err := f.ReadAt(buf[:n], off)
		if err != nil && !errors.Is(err, io.EOF) {
			return fmt.Errorf("read snapshot: %w", err)
		}
		clear(buf[m:n]) // past the end of the image file reads as zeros
		var wire int64
		if isZero(buf[:n]) {
			err = writeFrame(w, opZero, off, nil, n)
			wire = frameHead
		} else {
			err = writeFrame(w, opWrite, off, buf[:n], n)
			wire = frameHead + n
		}
		if err != nil {
			return fmt.Errorf("send: %w", err)
		}
		h.copied.Add(n)
		h.onWire.Add(wire)
		if rate > 0 {
			if err := w.Flush(); err != nil {
				return err
			}
			want := time.Duration(float64(h.copied.Load()) / float64(rate) * float64(time.Second))
			if wait := want - time.Since(start); wait > 0 {
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(wait):
				}
			}
		}
	}
	if err := writeFrame(w, opFlush, 0, nil, 0); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	var a [1]byte
	if _, err := io.ReadFull(conn, a[:]); err != nil || a[0] != ack {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("receiver did not acknowledge the flush: %v: %w", err, contract.ErrUnavailable)
	}
	return nil
}

func isZero(b []byte) bool {
	return len(b) == 0 || (b[0] == 0 && bytes.Equal(b[:len(b)-1], b[1:]))
}

func writeFrame(w io.Writer, op byte, off int64, data []byte, n int64) error {
	var hdr [frameHead]byte
	hdr[0] = op
	binary.BigEndian.PutUint64(hdr[1:], uint64(off))
	binary.BigEndian.PutUint32(hdr[9:], uint32(n))
	if _, err := w.Write(hdr[:]); err != nil {
		return err
	}
	_, err := w.Write(data)
	return err
}

// receive applies one sender connection to the replica file.
func receive(c net.Conn, h *handle, f *os.File) error {
	r := bufio.NewReaderSize(c, 256<<10)
	line, err := r.ReadString('\n')
	if err != nil {
		return fmt.Errorf("hello: %w", err)
	}
	h.mu.Lock()
	want := hello + h.st.Token + "\n"
	size := h.st.VirtualSize
	h.mu.Unlock()
	if subtle.ConstantTimeCompare([]byte(line), []byte(want)) != 1 {
		return errors.New("bad hello or token")
	}
	var hdr [frameHead]byte
	buf := make([]byte, 0, contract.DefaultBlockSize)
	var zeros []byte
	for {
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		op, off, n := hdr[0], int64(binary.BigEndian.Uint64(hdr[1:])), int64(binary.BigEndian.Uint32(hdr[9:]))
		switch op {
		case opRound:
			h.mu.Lock()
			h.round, h.state = int(off), contract.StateSyncing
			h.mu.Unlock()
			h.copied.Store(0)
		case opWrite, opZero:
			if off < 0 || n > maxFrame || off+n > size {
				return fmt.Errorf("frame out of range: off %d len %d size %d", off, n, size)
			}
			var data []byte
			if op == opWrite {
				if int64(cap(buf)) < n {
					buf = make([]byte, n)
				}
				data = buf[:n]
				if _, err := io.ReadFull(r, data); err != nil {
					return err
				}
			} else {
				if int64(len(zeros)) < n {
					zeros = make([]byte, n)
				}
				data = zeros[:n]
			}
			if _, err := f.WriteAt(data, off); err != nil {
				return fmt.Errorf("write replica: %w", err)
			}
			h.copied.Add(n)
		case opFlush:
			if err := f.Sync(); err != nil {
				return fmt.Errorf("sync replica: %w", err)
			}
			h.mu.Lock()
			h.state = contract.StateIdle
			h.st.Round = h.round
			h.mu.Unlock()
			if _, err := c.Write([]byte{ack}); err != nil {
				return err
			}
		default:
			return fmt.Errorf("unknown op %q", op)
		}
	}
}
