package wan

import "time"

// Stats is a snapshot of a session's counters, from this side's view.
type Stats struct {
	// BytesOffered: payload bytes handed to channels for sending (data and
	// zero ranges), before compression, excluding retransmissions.
	BytesOffered int64
	// BytesOnWire: TCP bytes written (frames, TLS, handshakes, resends).
	BytesOnWire int64
	// BytesReceivedOnWire: TCP bytes read.
	BytesReceivedOnWire int64
	// PayloadOnWire: payload bytes of first transmissions after compression
	// and zero elision.
	PayloadOnWire int64
	// CompressionRatio: logical bytes of first transmissions ÷ PayloadOnWire
	// (zero elision included; 1 when nothing was sent).
	CompressionRatio float64
	// ZeroBytesElided: logical bytes sent as length-only zero frames.
	ZeroBytesElided int64
	// RetransmittedBytes: payload bytes sent again after a stream failed.
	RetransmittedBytes int64
	// BytesDelivered: payload bytes received from the peer in order.
	BytesDelivered int64
	// DuplicatesReceived: frames received twice and dropped.
	DuplicatesReceived int64
	// Reconnects: streams re-established after a failure.
	Reconnects int64
	// Connected: streams currently up; Streams: per stream detail.
	Connected int
	Streams   []StreamStats
	// RateLimit: the current cap in bytes/s (0 = unlimited).
	RateLimit int64
	// HandshakeRTT: round-trip time of the first stream's hello.
	HandshakeRTT time.Duration
}

// StreamStats describes one TCP stream.
type StreamStats struct {
	Index       int
	Connected   bool
	RTT         time.Duration // latest heartbeat round trip (includes queueing)
	BytesOnWire int64         // TCP bytes written on this connection
	Rate        float64       // bytes/s written over the last second
}

// Stats returns a snapshot of the counters.
func (s *Session) Stats() Stats {
	st := Stats{
		BytesOffered:        s.st.offered.Load(),
		BytesOnWire:         s.st.wireOut.Load(),
		BytesReceivedOnWire: s.st.wireIn.Load(),
		PayloadOnWire:       s.st.payloadFirst.Load(),
		ZeroBytesElided:     s.st.zero.Load(),
		RetransmittedBytes:  s.st.retx.Load(),
		BytesDelivered:      s.st.delivered.Load(),
		DuplicatesReceived:  s.st.dupIn.Load(),
		Reconnects:          s.st.reconnects.Load(),
		RateLimit:           s.lim.Rate(),
		HandshakeRTT:        s.rtt0,
		CompressionRatio:    1,
	}
	if p := st.PayloadOnWire; p > 0 {
		st.CompressionRatio = float64(s.st.offeredFirst.Load()) / float64(p)
	}
	s.mu.Lock()
	st.Connected = s.nconn
	for i, x := range s.streams {
		ss := StreamStats{Index: i}
		if x != nil {
			ss.Connected = !x.dead
			ss.RTT = time.Duration(x.rtt.Load())
			ss.BytesOnWire = x.raw.sout.Load()
			ss.Rate = float64(x.rate.Load())
		}
		st.Streams = append(st.Streams, ss)
	}
	s.mu.Unlock()
	return st
}
