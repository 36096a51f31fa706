package wan

import (
	"context"
	"fmt"
)

// Block is one block-channel message as seen by the receiver.
type Block struct {
	Off    int64
	Length int64
	Data   []byte // nil when Zero
	Zero   bool   // the range is all zeroes (elided on the wire)
}

// ApplyFunc durably applies one block at the receiver (for example an NBD
// write followed by a flush). A message is acknowledged to the sender only
// after ApplyFunc returns nil. It is called from one goroutine per channel,
// in the sender's order; open several channels for parallel applies. An
// error resets the channel: the sender's calls fail with ErrReset.
type ApplyFunc func(ctx context.Context, b Block) error

// BlockSender writes offset+data messages to a named block channel.
type BlockSender struct {
	s  *Session
	ch *channel
}

// OpenBlockChannel opens a block channel to the peer's sink of the same
// name. onAck, if not nil, is called (in order, from a session goroutine; it
// must not block) for every extent the receiver has durably applied.
func (s *Session) OpenBlockChannel(ctx context.Context, name string, onAck func(off, length int64)) (*BlockSender, error) {
	ch, err := s.newLocalChannel(chBlockSend, name)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	ch.onAck = onAck
	s.mu.Unlock()
	if err := s.submit(ctx, ch, &outFrame{kind: kindOpenBlock, name: name}); err != nil {
		return nil, err
	}
	return &BlockSender{s: s, ch: ch}, nil
}

// Write sends data for offset off. data is copied; all-zero pieces are sent
// as zero messages. It blocks while the channel window is full and returns
// once queued (use Flush to wait for durable application).
func (b *BlockSender) Write(ctx context.Context, off int64, data []byte) error {
	for len(data) > 0 {
		n := min(len(data), b.s.cfg.MaxFrame)
		f := &outFrame{kind: kindBlock, off: off, n: n}
		if isZero(data[:n]) {
			f.zero = true
		} else {
			f.data = append([]byte(nil), data[:n]...)
		}
		if err := b.s.submit(ctx, b.ch, f); err != nil {
			return fmt.Errorf("wan: block write at %d: %w", off, err)
		}
		off += int64(n)
		data = data[n:]
	}
	return nil
}

// WriteZeroes sends a zero range without any data.
func (b *BlockSender) WriteZeroes(ctx context.Context, off, length int64) error {
	const maxZero = 1 << 30
	for length > 0 {
		n := min(length, maxZero)
		f := &outFrame{kind: kindBlock, off: off, n: int(n), zero: true}
		if err := b.s.submit(ctx, b.ch, f); err != nil {
			return fmt.Errorf("wan: block zero at %d: %w", off, err)
		}
		off += n
		length -= n
	}
	return nil
}

// Flush waits until the receiver has applied everything written so far.
func (b *BlockSender) Flush(ctx context.Context) error {
	if err := b.s.waitAcked(ctx, b.ch); err != nil {
		return fmt.Errorf("wan: block flush: %w", err)
	}
	return nil
}

// Acked returns the number of bytes (data and zero ranges) the receiver has
// durably applied.
func (b *BlockSender) Acked() int64 {
	b.s.mu.Lock()
	defer b.s.mu.Unlock()
	return b.ch.ackedBytes
}

// Close flushes, then ends the channel; the receiver's sink completes.
func (b *BlockSender) Close(ctx context.Context) error {
	if err := b.Flush(ctx); err != nil {
		return err
	}
	b.s.mu.Lock()
	if b.ch.finQueued {
		b.s.mu.Unlock()
		return nil
	}
	b.ch.finQueued = true
	b.s.mu.Unlock()
	if err := b.s.submit(ctx, b.ch, &outFrame{kind: kindFin}); err != nil {
		return err
	}
	return b.Flush(ctx)
}

// BlockSink receives one named block channel.
type BlockSink struct {
	s       *Session
	name    string
	apply   ApplyFunc
	done    chan struct{}
	err     error
	applied int64
}

// AcceptBlockChannel registers apply for the block channel the peer opens
// (or has opened) under name. It returns at once; Wait tells when the sender
// has closed the channel and everything is applied.
func (s *Session) AcceptBlockChannel(ctx context.Context, name string, apply ApplyFunc) (*BlockSink, error) {
	sink := &BlockSink{s: s, name: name, apply: apply, done: make(chan struct{})}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return nil, s.err
	}
	if _, dup := s.sinks[name]; dup {
		return nil, fmt.Errorf("wan: block sink %q already registered", name)
	}
	if ch := s.blockWait[name]; ch != nil {
		delete(s.blockWait, name)
		s.bindSink(ch, sink)
	} else {
		s.sinks[name] = sink
	}
	return sink, nil
}

// bindSink starts applying a channel's blocks. Caller holds s.mu.
func (s *Session) bindSink(ch *channel, sink *BlockSink) {
	ch.sink = sink
	s.wg.Add(1)
	go s.applyLoop(ch, sink)
}

func (s *Session) applyLoop(ch *channel, sink *BlockSink) {
	defer s.wg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	finish := func(err error) {
		s.mu.Lock()
		sink.err = err
		s.mu.Unlock()
		close(sink.done)
	}
	for {
		s.mu.Lock()
		for len(ch.rq) == 0 && ch.rerr == nil && s.err == nil {
			sig := ch.sig
			s.mu.Unlock()
			<-sig
			s.mu.Lock()
		}
		if s.err != nil || ch.rerr != nil {
			err := s.err
			if ch.rerr != nil {
				err = ch.rerr
			}
			s.mu.Unlock()
			finish(err)
			return
		}
		f := ch.popRQ()
		if f.kind == kindFin {
			ch.rfin = true
			s.consume(ch, f.seq)
			s.maybeRemove(ch)
			s.mu.Unlock()
			finish(nil)
			return
		}
		s.mu.Unlock()
		if f.kind != kindBlock {
			continue
		}
		b := Block{Off: f.off, Length: int64(f.n), Data: f.data, Zero: f.zero}
		if err := sink.apply(ctx, b); err != nil {
			s.log.Warn("block apply failed", "channel", sink.name, "offset", f.off, "error", err)
			s.mu.Lock()
			ch.rerr = fmt.Errorf("wan: apply at %d: %w", f.off, err)
			ch.dropRQ()
			s.mu.Unlock()
			_ = s.submit(context.Background(), ch, &outFrame{kind: kindReset, name: "apply failed: " + err.Error()})
			finish(fmt.Errorf("wan: apply at %d: %w", f.off, err))
			return
		}
		s.mu.Lock()
		sink.applied += int64(f.n)
		s.consume(ch, f.seq)
		s.mu.Unlock()
	}
}

// Wait blocks until the sender closed the channel and every block was
// applied (nil), or the channel or session failed.
func (k *BlockSink) Wait(ctx context.Context) error {
	select {
	case <-k.done:
		k.s.mu.Lock()
		defer k.s.mu.Unlock()
		return k.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Applied returns the bytes applied so far.
func (k *BlockSink) Applied() int64 {
	k.s.mu.Lock()
	defer k.s.mu.Unlock()
	return k.applied
}
