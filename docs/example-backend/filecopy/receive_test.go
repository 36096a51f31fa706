package main

import (
	"bytes"
	"encoding/binary"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func frame(op byte, off int64, data []byte, n int) []byte {
	var b bytes.Buffer
	_ = writeFrame(&b, op, off, data, int64(n))
	return b.Bytes()
}

// FuzzReceive feeds arbitrary bytes to the receiver as if a peer sent
// them: it must never panic, hang or grow the replica past its size.
func FuzzReceive(f *testing.F) {
	const size = 4096
	good := append([]byte(hello+"tok\n"), frame(opRound, 1, nil, 0)...)
	good = append(good, frame(opWrite, 0, []byte("abcd"), 4)...)
	good = append(good, frame(opZero, 100, nil, 50)...)
	good = append(good, frame(opFlush, 0, nil, 0)...)
	f.Add(good)
	f.Add([]byte(hello + "wrong\n"))
	f.Add(append([]byte(hello+"tok\n"), frame(opWrite, size-2, []byte("abcd"), 4)...))
	f.Add(append([]byte(hello+"tok\n"), frame(opZero, -1, nil, 1)...))
	long := append([]byte(hello+"tok\n"), frame(opWrite, 0, nil, 0)...)
	binary.BigEndian.PutUint32(long[len(long)-4:], 1<<31)
	f.Add(long)
	f.Add(append([]byte(hello+"tok\n"), 'Q'))
	f.Fuzz(func(t *testing.T, in []byte) {
		path := filepath.Join(t.TempDir(), "replica")
		file, err := os.Create(path)
		require.NoError(t, err)
		defer file.Close()
		require.NoError(t, file.Truncate(size))
		h := &handle{st: stateV1{Token: "tok", VirtualSize: size}}
		a, b := net.Pipe()
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = receive(b, h, file)
			_ = b.Close()
		}()
		go func() {
			_ = a.SetWriteDeadline(time.Now().Add(5 * time.Second))
			_, _ = a.Write(in)
			_ = a.Close()
		}()
		go func() { _, _ = bytes.NewBuffer(nil).ReadFrom(a) }() // drain acks
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("receive hung")
		}
		fi, err := file.Stat()
		require.NoError(t, err)
		require.Equal(t, int64(size), fi.Size(), "the replica never grows")
	})
}
