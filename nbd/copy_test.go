package nbd

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestCopy(t *testing.T) {
	checkNoLeak(t)
	const size = 16 << 20
	for _, tc := range []struct {
		name        string
		noStructure bool // source without block status
		destIsZero  bool
		dirtyDest   bool // destination has old data that must be overwritten by zeroes
	}{
		{name: "sparse"},
		{name: "no block status", noStructure: true},
		{name: "dest is zero", destIsZero: true},
		{name: "dirty dest", dirtyDest: true},
		{name: "dirty dest without block status", dirtyDest: true, noStructure: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := NewMemBackend(size)
			_, err := src.WriteAt(randomData(3<<20, 1), 1<<20)
			require.NoError(t, err)
			_, err = src.WriteAt(make([]byte, 2<<20), 8<<20) // allocated zeroes
			require.NoError(t, err)
			_, err = src.WriteAt(randomData(100, 2), size-100)
			require.NoError(t, err)
			dst := NewMemBackend(size)
			if tc.dirtyDest {
				_, err = dst.WriteAt(randomData(size, 3), 0)
				require.NoError(t, err)
			}
			ts := startStatic(t, nil, false, &Export{Name: "s", Backend: src, ReadOnly: true}, &Export{Name: "d", Backend: dst, MultiConn: true})
			ctx := context.Background()
			from, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "s", DisableStructuredReplies: tc.noStructure})
			require.NoError(t, err)
			defer from.Close()
			to, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "d"}, 2)
			require.NoError(t, err)
			defer to.Close()
			st, err := Copy(ctx, to, from, CopyOptions{ChunkSize: 1 << 20, Workers: 4, DestIsZero: tc.destIsZero})
			require.NoError(t, err)
			assert.Equal(t, int64(size), st.Bytes)
			assert.Equal(t, int64(size), st.DataBytes+st.ZeroBytes)
			if tc.noStructure {
				assert.Equal(t, int64(4<<20), st.DataBytes, "whole chunks read; zero chunks detected")
			} else {
				assert.Equal(t, int64(3<<20+64<<10), st.DataBytes, "data extents only (64 KiB blocks); allocated zeroes detected")
			}
			assert.True(t, bytesEqual(src.Bytes(), dst.Bytes()), "copy differs")
		})
	}
	t.Run("destination too small", func(t *testing.T) {
		ts := startStatic(t, nil, false, &Export{Name: "s", Backend: NewMemBackend(2 << 20)}, &Export{Name: "d", Backend: NewMemBackend(1 << 20)})
		ctx := context.Background()
		from, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "s"})
		require.NoError(t, err)
		defer from.Close()
		to, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "d"})
		require.NoError(t, err)
		defer to.Close()
		_, err = Copy(ctx, to, from, CopyOptions{})
		assert.Error(t, err)
	})
	t.Run("source error stops the copy", func(t *testing.T) {
		fb := &faultBackend{MemBackend: NewMemBackend(8 << 20), readErr: fmt.Errorf("bad sector")}
		_, err := fb.MemBackend.WriteAt(randomData(8<<20, 4), 0)
		require.NoError(t, err)
		ts := startStatic(t, nil, false, &Export{Name: "s", Backend: fb}, &Export{Name: "d", Backend: NewMemBackend(8 << 20)})
		ctx := context.Background()
		from, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "s"})
		require.NoError(t, err)
		defer from.Close()
		to, err := Dial(ctx, "tcp", ts.addr, DialOptions{Export: "d"})
		require.NoError(t, err)
		defer to.Close()
		_, err = Copy(ctx, to, from, CopyOptions{ChunkSize: 1 << 20})
		assert.ErrorIs(t, err, ErrIO)
	})
}

func TestDialPool(t *testing.T) {
	checkNoLeak(t)
	ctx := context.Background()
	mem := NewMemBackend(1 << 20)
	t.Run("opens n connections", func(t *testing.T) {
		ts := startStatic(t, nil, false, &Export{Name: "d", Backend: mem, MultiConn: true})
		pool, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "d"}, 5)
		require.NoError(t, err)
		defer pool.Close()
		require.Len(t, pool.Clients(), 5)
		for _, c := range pool.Clients() {
			require.NoError(t, c.WriteAt(ctx, []byte{1}, 0, false), "every connection works")
		}
	})
	t.Run("one connection without multi-conn", func(t *testing.T) {
		ts := startStatic(t, nil, false, &Export{Name: "d", Backend: mem})
		pool, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "d"}, 5)
		require.NoError(t, err)
		defer pool.Close()
		assert.Len(t, pool.Clients(), 1)
	})
	t.Run("a refused later connection closes the others", func(t *testing.T) {
		var mu sync.Mutex
		opened, released := 0, 0
		ts := startServer(t, ServerOptions{Exports: func(context.Context, string) (*Export, error) {
			mu.Lock()
			defer mu.Unlock()
			if opened == 3 {
				return nil, fmt.Errorf("full: %w", ErrUnknownExport)
			}
			opened++
			return &Export{Name: "d", Backend: mem, MultiConn: true, Release: func() {
				mu.Lock()
				released++
				mu.Unlock()
			}}, nil
		}})
		_, err := DialPool(ctx, "tcp", ts.addr, DialOptions{Export: "d"}, 5)
		require.ErrorIs(t, err, ErrUnknownExport)
		assert.Eventually(t, func() bool {
			mu.Lock()
			defer mu.Unlock()
			return released == opened
		}, 5*time.Second, 10*time.Millisecond, "the server saw every opened connection closed")
	})
}
