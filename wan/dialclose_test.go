package wan

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Dial, Session.Close and Listener.Close hammered concurrently: every
// session goroutine (monitor, slots, stream readers and writers) must be
// started before Close waits for them, none may start after, and nothing
// may leak. Run with -race: a wg.Add racing Close's Wait is reported.
func TestDialCloseConcurrently(t *testing.T) {
	noLeaks(t)
	pk := newPKI(t)
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	defer cancel()
	scfg := pk.serverConfig(t)
	scfg.MaxOutage = 200 * time.Millisecond
	l, err := Listen(ctx, "127.0.0.1:0", scfg)
	require.NoError(t, err)
	addr := l.Addr().String()

	// The destination side closes every session as soon as it has it, so
	// its Close races the dialler's monitor and slots starting.
	var accWG sync.WaitGroup
	accWG.Add(1)
	accepted := 0
	go func() {
		defer accWG.Done()
		for {
			s, err := l.Accept(ctx)
			if err != nil {
				return
			}
			accepted++
			go func() { _ = s.Close() }()
		}
	}()

	ccfg := pk.clientConfig(t)
	ccfg.Streams = 4 // three slots dial while Close runs
	ccfg.MaxOutage = 200 * time.Millisecond
	const workers, rounds = 4, 4
	var wg sync.WaitGroup
	var mu sync.Mutex
	dialled := 0
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := range rounds {
				s, err := Dial(ctx, addr, ccfg)
				if err != nil {
					// The peer may close the session before Dial returns.
					assert.ErrorIs(t, err, ErrPeerClosed, "worker %d round %d", w, r)
					continue
				}
				mu.Lock()
				dialled++
				mu.Unlock()
				// Two Closes at once, racing the slots' re-dials.
				var cw sync.WaitGroup
				cw.Add(2)
				for range 2 {
					go func() {
						defer cw.Done()
						assert.NoError(t, s.Close())
					}()
				}
				cw.Wait()
				select {
				case <-s.Done():
				default:
					t.Errorf("session not done after Close")
				}
				assert.Error(t, s.Err())
				_, err = s.OpenConn(ctx, "127.0.0.1:1")
				assert.Error(t, err, "a closed session opens nothing")
			}
		}()
	}
	wg.Wait()
	assert.Positive(t, dialled, "some dials succeeded")

	// Now close the listener while dials are in flight: sessions it set up
	// but never handed out are closed, none is left running.
	var lw sync.WaitGroup
	for range workers {
		lw.Add(1)
		go func() {
			defer lw.Done()
			s, err := Dial(ctx, addr, ccfg)
			if err == nil {
				_ = s.Close()
			}
		}()
	}
	time.Sleep(5 * time.Millisecond)
	require.NoError(t, l.Close())
	require.NoError(t, l.Close(), "Close is idempotent")
	lw.Wait()
	accWG.Wait()
	_, err = l.Accept(ctx)
	assert.True(t, errors.Is(err, ErrClosed), "Accept after Close: %v", err)
	assert.Positive(t, accepted)
}

// start refuses once the session is closing or ended and then starts
// nothing; before that it runs every function under the WaitGroup.
func TestSessionStartAfterClose(t *testing.T) {
	s := newSession(Config{}.withDefaults(), true, make([]byte, 16))
	ran := make(chan int, 3)
	require.True(t, s.start(func() { ran <- 1 }, func() { ran <- 2 }))
	s.wg.Wait()
	assert.Len(t, ran, 2)

	require.NoError(t, s.Close())
	assert.False(t, s.start(func() { ran <- 3 }), "no goroutine starts after Close")
	s.wg.Wait()
	assert.Len(t, ran, 2)

	s2 := newSession(Config{}.withDefaults(), true, make([]byte, 16))
	s2.mu.Lock()
	s2.closing = true // Close has begun but not failed the session yet
	s2.mu.Unlock()
	assert.False(t, s2.start(func() { ran <- 4 }))
	s2.fail(ErrClosed)
	s2.wg.Wait()
	assert.Len(t, ran, 2)
}
