package streams_test

// The data path of a plain TCP stream (protocol tcp; no TLS, rate limit,
// accept_proxy_protocol or sni; an IP-literal upstream), whatever carries
// its bytes: the relay goroutines with parking, or an event loop (issue
// 15). The loop_*_test.go files test what the other tests of this package
// leave out; each goes through the streams app on such plain streams.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// randomBytes returns n bytes of a generator seeded with seed, so that a
// byte out of place or lost shows.
func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// in is inst for the subtest t: its helpers fail t, not the parent test.
func (inst *testCaddy) in(t *testing.T) *testCaddy {
	c := *inst
	c.t = t
	return &c
}

// connEnd is what the connection log says of one connection.
type connEnd struct {
	sent, received uint64
	reason         string
}

func (e connEnd) String() string { return fmt.Sprintf("%d/%d %s", e.sent, e.received, e.reason) }

// expectEnds waits for one connection-log entry of stream id per wanted
// end and fails unless the entries are exactly those (in any order):
// bytes each way and disconnect_reason.
func (inst *testCaddy) expectEnds(id int64, want []connEnd) {
	inst.t.Helper()
	entries := inst.waitLogs(id, len(want), 10*time.Second)
	got := make([]connEnd, 0, len(entries))
	for _, e := range entries {
		if e.Action == "allowed" {
			got = append(got, connEnd{e.BytesSent, e.BytesReceived, e.DisconnectReason})
		}
	}
	order := func(a, b connEnd) int {
		if c := cmpU(a.sent, b.sent); c != 0 {
			return c
		}
		if c := cmpU(a.received, b.received); c != 0 {
			return c
		}
		return bytes.Compare([]byte(a.reason), []byte(b.reason))
	}
	want = slices.Clone(want)
	slices.SortFunc(got, order)
	slices.SortFunc(want, order)
	if !slices.Equal(got, want) {
		inst.t.Fatalf("stream %d: connection log (sent/received reason)\n got %v\nwant %v", id, got, want)
	}
}

func cmpU(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// expectTotals waits until stream id has no open connection and fails
// unless its counters are exactly these.
func (inst *testCaddy) expectTotals(id int64, total, sent, received uint64) {
	inst.t.Helper()
	st := inst.waitStats(id, "no open connection", func(s spec.Status) bool { return s.ActiveConnections == 0 })
	if st.TotalConnections != total || st.BytesSent != sent || st.BytesReceived != received {
		inst.t.Fatalf("stream %d: %d connections, %d bytes sent, %d received; want %d, %d, %d",
			id, st.TotalConnections, st.BytesSent, st.BytesReceived, total, sent, received)
	}
}

// relaySizes are the transfer sizes of the byte-exact tests: single bytes,
// the edges of a segment, a page, a relay buffer and a pipe, and several
// MB.
var relaySizes = []int{1, 2, 7, 100, 1448, 1449, 4095, 4096, 16384, 65535, 65536, 65537, 200_003, 1<<20 + 13, 3<<20 + 7, 6 << 20}

// echoAll writes p to c in pieces of random sizes while it reads the echo,
// and reports whether the echo is p, byte for byte.
func echoAll(c net.Conn, p []byte, seed uint64) error {
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	werr := make(chan error, 1)
	go func() {
		rng := rand.New(rand.NewPCG(seed, 1))
		for off := 0; off < len(p); {
			n := min(len(p)-off, 1+rng.IntN(256<<10))
			if _, err := c.Write(p[off : off+n]); err != nil {
				werr <- err
				return
			}
			off += n
		}
		werr <- nil
	}()
	got := make([]byte, len(p))
	_, rerr := io.ReadFull(c, got)
	if err := <-werr; err != nil {
		return fmt.Errorf("writing %d bytes: %v", len(p), err)
	}
	if rerr != nil {
		return fmt.Errorf("reading the echo of %d bytes: %v", len(p), rerr)
	}
	if i := mismatch(got, p); i >= 0 {
		return fmt.Errorf("echo of %d bytes differs from byte %d", len(p), i)
	}
	return nil
}

// mismatch is the first index where a and b differ, or -1.
func mismatch(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

// Byte-exact relay of every size from 1 byte to 6 MiB, all connections at
// once: echoed both ways through one stream; downloads the upstream sends
// and then closes (upstream_close: every byte reaches the client before
// the end); uploads the client sends and then closes (client_close: every
// byte reaches the upstream before its end). The stats and each
// connection's log entry count exactly the bytes moved.
func TestLoopRelaySizesConcurrent(t *testing.T) {
	checkNoLeaksOrFDs(t)
	// The download upstream reads a size and a seed, sends that many
	// bytes and closes. The upload upstream reads a size and a seed, then
	// everything until EOF, and reports what it read.
	download := newUpstream(t, func(c net.Conn) {
		var hdr [16]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		_ = c.SetWriteDeadline(time.Now().Add(15 * time.Second))
		_, _ = c.Write(randomBytes(binary.LittleEndian.Uint64(hdr[8:]), int(binary.LittleEndian.Uint64(hdr[:8]))))
	})
	type upload struct {
		seed uint64
		ok   bool
		n    int
	}
	uploads := make(chan upload, len(relaySizes))
	sink := newUpstream(t, func(c net.Conn) {
		var hdr [16]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
		got, err := io.ReadAll(c)
		seed, n := binary.LittleEndian.Uint64(hdr[8:]), int(binary.LittleEndian.Uint64(hdr[:8]))
		uploads <- upload{seed, err == nil && bytes.Equal(got, randomBytes(seed, n)), len(got)}
	})
	echoUp := newUpstream(t, echo)
	pEcho, pDown, pUp := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, hosts(host(1, pEcho, echoUp.Port, nil), host(2, pDown, download.Port, nil), host(3, pUp, sink.Port, nil)))

	header := func(n int, seed uint64) []byte {
		var hdr [16]byte
		binary.LittleEndian.PutUint64(hdr[:8], uint64(n))
		binary.LittleEndian.PutUint64(hdr[8:], seed)
		return hdr[:]
	}
	var wg sync.WaitGroup
	errs := make(chan error, 3*len(relaySizes))
	var wantEcho, wantDown, wantUp []connEnd
	var sumEcho, sumDown, sumUp uint64
	for i, n := range relaySizes {
		seed := uint64(1000 + i)
		wantEcho = append(wantEcho, connEnd{uint64(n), uint64(n), "client_close"})
		wantDown = append(wantDown, connEnd{16, uint64(n), "upstream_close"})
		wantUp = append(wantUp, connEnd{16 + uint64(n), 0, "client_close"})
		sumEcho += uint64(n)
		sumDown += uint64(n)
		sumUp += 16 + uint64(n)
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", pEcho), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			if err := echoAll(c, randomBytes(seed, n), seed); err != nil {
				errs <- fmt.Errorf("echo: %v", err)
			}
		})
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", pDown), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err := c.Write(header(n, seed)); err != nil {
				errs <- err
				return
			}
			got, err := io.ReadAll(c)
			if err != nil {
				errs <- fmt.Errorf("download of %d bytes: read %d, then %v", n, len(got), err)
			} else if i := mismatch(got, randomBytes(seed, n)); i >= 0 {
				errs <- fmt.Errorf("download of %d bytes: read %d, differing from byte %d", n, len(got), i)
			}
		})
		wg.Go(func() {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", pUp), 5*time.Second)
			if err != nil {
				errs <- err
				return
			}
			_ = c.SetDeadline(time.Now().Add(15 * time.Second))
			_, err = c.Write(append(header(n, seed), randomBytes(seed, n)...))
			c.Close()
			if err != nil {
				errs <- fmt.Errorf("upload of %d bytes: %v", n, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for range relaySizes {
		select {
		case u := <-uploads:
			if !u.ok {
				t.Errorf("upload %d: the upstream read %d bytes, not the %d sent", u.seed, u.n, relaySizes[u.seed-1000])
			}
		case <-time.After(10 * time.Second):
			t.Fatal("an upload never reached its end at the upstream")
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	n := uint64(len(relaySizes))
	inst.expectTotals(1, n, sumEcho, sumEcho)
	inst.expectTotals(2, n, 16*n, sumDown)
	inst.expectTotals(3, n, sumUp, 0)
	inst.expectEnds(1, wantEcho)
	inst.expectEnds(2, wantDown)
	inst.expectEnds(3, wantUp)
}
