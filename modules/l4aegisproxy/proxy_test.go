package l4aegisproxy_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	proxyproto "github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// ---- fixtures ------------------------------------------------------------

func newCtx(t testing.TB) caddy.Context {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	return ctx
}

// chain serves guard → proxy on a loopback listener the way a plain
// layer4 server does: each accepted connection goes through
// layer4.WrapConnection and the compiled handler chain.
type chain struct {
	guard *l4aegisguard.Handler
	proxy *l4aegisproxy.Handler
	addr  string
}

func startChain(t testing.TB, listen string, guard *l4aegisguard.Handler, proxy *l4aegisproxy.Handler) *chain {
	t.Helper()
	h := provisionChain(t, guard, proxy)
	srv := loopback.Serve(t, listen, func(conn net.Conn) {
		_ = h.Handle(layer4.WrapConnection(conn, nil, zap.NewNop()))
	})
	c := &chain{guard: guard, proxy: proxy, addr: srv.Addr}
	return c
}

// provisionChain provisions guard (if any) and proxy and compiles them
// into one handler; the test's cleanup cleans them up.
func provisionChain(t testing.TB, guard *l4aegisguard.Handler, proxy *l4aegisproxy.Handler) layer4.Handler {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	var hs layer4.Handlers
	if guard != nil {
		if err := guard.Provision(ctx); err != nil {
			cancel()
			t.Fatal(err)
		}
		hs = append(hs, guard)
	}
	if err := proxy.Provision(ctx); err != nil {
		cancel()
		t.Fatal(err)
	}
	hs = append(hs, proxy)
	h := hs.Compile()
	// Registered first, so it runs after the server's own cleanup has
	// closed the connections and waited for their handlers.
	t.Cleanup(func() {
		_ = proxy.Cleanup()
		if guard != nil {
			_ = guard.Cleanup()
		}
		cancel()
	})
	return h
}

// state is the stream state the guard counts into.
func (c *chain) state() *streamstate.State { return c.guard.State() }

// session waits for the one open connection's session.
func (c *chain) session(t *testing.T) *streamstate.Session {
	t.Helper()
	var ss *streamstate.Session
	waitFor(t, "an open session", func() bool {
		c.state().Sessions(func(s *streamstate.Session) bool { ss = s; return false })
		return ss != nil
	})
	return ss
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func newUpstream(t testing.TB, listen string, serve func(net.Conn)) *loopback.Server {
	t.Helper()
	return loopback.Serve(t, listen, serve)
}

func dial(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.TCPConn)
}

// procIO returns this process's rchar and wchar from /proc/self/io: the
// bytes passed through read(2)/write(2) and the like. splice(2) does not
// count there, which tells a spliced relay from a copying one.
func procIO() (rchar int64, ok bool) {
	b, err := os.ReadFile("/proc/self/io")
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, found := strings.CutPrefix(line, "rchar: "); found {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n, err == nil
		}
	}
	return 0, false
}

// stream writes n deterministic bytes to w in chunks and returns their hash.
func stream(w io.Writer, n int64, seed uint64) ([32]byte, error) {
	h := sha256.New()
	rng := rand.NewChaCha8([32]byte{byte(seed)})
	buf := make([]byte, 64<<10)
	for n > 0 {
		chunk := buf[:min(int64(len(buf)), n)]
		_, _ = rng.Read(chunk)
		h.Write(chunk)
		m, err := w.Write(chunk)
		n -= int64(m)
		if err != nil {
			return [32]byte{}, err
		}
	}
	return [32]byte(h.Sum(nil)), nil
}

// drain reads r to EOF and returns the count and hash.
func drain(r io.Reader) (int64, [32]byte, error) {
	h := sha256.New()
	n, err := io.CopyBuffer(h, r, make([]byte, 64<<10))
	return n, [32]byte(h.Sum(nil)), err
}

// ---- splice and copy paths -------------------------------------------------

// starter starts a guard and proxy on a listener: through the chain
// (startChain) or on the event loop (startLoop).
type starter func(t testing.TB, listen string, guard *l4aegisguard.Handler, proxy *l4aegisproxy.Handler) *chain

// transfer sends up bytes client→upstream and down bytes upstream→client
// at the same time through what start starts, half-closing each side when
// done, and checks that every byte arrived intact and was counted. It
// returns the rchar growth of the process over the transfer (-1 without
// /proc/self/io) and how long the upload took.
func transfer(t *testing.T, start starter, guard *l4aegisguard.Handler, up, down int64) (rchar int64, upload time.Duration) {
	t.Helper()
	type result struct {
		n    int64
		hash [32]byte
		err  error
	}
	got := make(chan result, 1)
	sentDown := make(chan [32]byte, 1)
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		written := make(chan struct{})
		go func() {
			defer close(written)
			h, err := stream(c, down, 2)
			if err != nil {
				t.Errorf("upstream writing: %v", err)
			}
			_ = c.(*net.TCPConn).CloseWrite()
			sentDown <- h
		}()
		n, h, err := drain(c)
		got <- result{n, h, err}
		// The server closes c when this returns: an upload that ends
		// first must not cut the download still being written.
		<-written
	})
	// Each side half-closes when done and reads on to the other's end.
	ch := start(t, "127.0.0.1:0", guard, &l4aegisproxy.Handler{Upstream: u.Addr, HalfClose: true})

	before, ok := procIO()
	c := dial(t, ch.addr)
	_ = c.SetDeadline(time.Now().Add(20 * time.Second))
	began := time.Now()
	recv := make(chan result, 1)
	go func() {
		n, h, err := drain(c)
		recv <- result{n, h, err}
	}()
	sentUp, err := stream(c, up, 1)
	if err != nil {
		t.Fatalf("client writing: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	gu := <-got
	upload = time.Since(began)
	gd, hd := <-recv, <-sentDown
	after, _ := procIO()
	if gu.err != nil || gu.n != up || gu.hash != sentUp {
		t.Fatalf("upload: upstream got %d bytes (err %v), want %d intact", gu.n, gu.err, up)
	}
	if gd.err != nil || gd.n != down || gd.hash != hd {
		t.Fatalf("download: client got %d bytes (err %v), want %d intact", gd.n, gd.err, down)
	}
	st := ch.state()
	waitFor(t, "the connection to end", func() bool { return st.Active.Load() == 0 })
	if tot := st.SinceReload(); tot.BytesSent != uint64(up) || tot.BytesReceived != uint64(down) {
		t.Fatalf("counters: bytes sent %d received %d, want %d and %d", tot.BytesSent, tot.BytesReceived, up, down)
	}
	if !ok {
		return -1, upload
	}
	return after - before, upload
}

func TestSplicePathWithoutLimits(t *testing.T) {
	const up, down = 24 << 20, 16 << 20
	rchar, _ := transfer(t, startChain, &l4aegisguard.Handler{}, up, down)
	if rchar < 0 {
		t.Skip("no /proc/self/io here: cannot tell a spliced relay from a copying one")
	}
	// The test's own ends read up+down bytes. A copying relay would read
	// them all once more; a spliced one never brings them to user space.
	t.Logf("rchar grew by %d for %d relayed bytes", rchar, up+down)
	if rchar > (up+down)*5/4 {
		t.Fatalf("relay without limits read %d bytes in user space for %d relayed: want splice(2) between the raw sockets", rchar-(up+down), up+down)
	}
}

func TestCopyPathWithRateLimit(t *testing.T) {
	const up, down = 8 << 20, 8 << 20
	const rate = 32 << 20 // bytes per second, upload only
	rchar, took := transfer(t, startChain, &l4aegisguard.Handler{UploadRateBytes: rate}, up, down)
	// The bucket starts empty: 8 MiB at 32 MiB/s takes 250 ms.
	if min := time.Duration(float64(up) / rate * 0.9 * float64(time.Second)); took < min {
		t.Fatalf("upload of %d bytes at %d B/s took %s, want at least %s", up, rate, took, min)
	}
	if rchar < 0 {
		t.Skip("no /proc/self/io here: cannot tell a spliced relay from a copying one")
	}
	t.Logf("rchar grew by %d for %d relayed bytes", rchar, up+down)
	if rchar < (up+down)*7/4 {
		t.Fatalf("relay with a rate limit read only %d bytes in user space for %d relayed: want the copy path through the limiting wrapper", rchar-(up+down), up+down)
	}
}

// ---- idle voting -----------------------------------------------------------

// idleUpstream serves modes chosen by the client's first byte:
//
//	'U' read and discard (slow upload)
//	'D' write one byte every 150 ms, 6 times (slow download)
//	'S' stall: never read or write again
//	'F' flood: write as fast as possible until the connection breaks
//	'Q' quiet: read until EOF without writing
func idleUpstream(t *testing.T, stop <-chan struct{}, floodErr chan<- error) *loopback.Server {
	return newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		mode := make([]byte, 1)
		if _, err := io.ReadFull(c, mode); err != nil {
			return
		}
		switch mode[0] {
		case 'U', 'Q':
			_, _ = io.Copy(io.Discard, c)
		case 'D':
			for i := 0; i < 6; i++ {
				select {
				case <-stop:
					return
				case <-time.After(150 * time.Millisecond):
				}
				if _, err := c.Write([]byte{'d'}); err != nil {
					return
				}
			}
			_, _ = io.Copy(io.Discard, c)
		case 'S':
			select {
			case <-stop:
			case <-time.After(15 * time.Second):
			}
		case 'F':
			buf := make([]byte, 64<<10)
			var err error
			for i := 0; i < 4096 && err == nil; i++ { // at most 256 MiB
				_, err = c.Write(buf)
			}
			floodErr <- err
		}
	})
}

func TestIdleVoting(t *testing.T) {
	for _, path := range []struct {
		name string
		rate int64
	}{
		{"splice", 0},
		{"copy", 64 << 20}, // a limit far above what the test moves forces the copy path
	} {
		t.Run(path.name, func(t *testing.T) {
			const idle = 400 * time.Millisecond
			stop := make(chan struct{})
			floodErr := make(chan error, 1)
			u := idleUpstream(t, stop, floodErr)
			t.Cleanup(func() { close(stop) })
			newChain := func() *chain {
				g := &l4aegisguard.Handler{IdleTimeout: caddy.Duration(idle), UploadRateBytes: path.rate, DownloadRateBytes: path.rate}
				return startChain(t, "127.0.0.1:0", g, &l4aegisproxy.Handler{Upstream: u.Addr})
			}

			t.Run("slow upload is not cut", func(t *testing.T) {
				ch := newChain()
				c := dial(t, ch.addr)
				for i := 0; i < 6; i++ { // 6 × 150 ms: over 2 idle timeouts
					if _, err := c.Write([]byte("U")); err != nil {
						t.Fatalf("write %d: %v", i, err)
					}
					time.Sleep(150 * time.Millisecond)
				}
				ss := ch.session(t)
				if ss.Closed() || ss.Reason() != streamstate.ReasonNone || ss.Sent() != 6 {
					t.Fatalf("after a slow upload: closed %v, reason %q, sent %d", ss.Closed(), ss.Reason(), ss.Sent())
				}
				if _, err := c.Write([]byte("x")); err != nil {
					t.Fatal(err)
				}
			})

			t.Run("slow download is not cut", func(t *testing.T) {
				ch := newChain()
				c := dial(t, ch.addr)
				if _, err := c.Write([]byte("D")); err != nil {
					t.Fatal(err)
				}
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				got := make([]byte, 6)
				if _, err := io.ReadFull(c, got); err != nil {
					t.Fatalf("slow download cut after %q: %v", got, err)
				}
				ss := ch.session(t)
				// The relay counts a write once it returns, which can be just
				// after the client has read the bytes.
				waitFor(t, "6 bytes counted", func() bool { return ss.Received() == 6 })
				if ss.Closed() || ss.Reason() != streamstate.ReasonNone {
					t.Fatalf("after a slow download: closed %v, reason %q", ss.Closed(), ss.Reason())
				}
			})

			t.Run("quiet connection is cut", func(t *testing.T) {
				ch := newChain()
				c := dial(t, ch.addr)
				start := time.Now() // the last byte moves after this
				if _, err := c.Write([]byte("Q")); err != nil {
					t.Fatal(err)
				}
				ss := ch.session(t)
				_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
				n, err := c.Read(make([]byte, 1))
				took := time.Since(start)
				if n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("quiet connection: read n=%d err=%v, want it closed", n, err)
				}
				if took < idle || took > idle+2*time.Second {
					t.Fatalf("quiet connection closed after %s, want about %s", took, idle)
				}
				waitFor(t, "the session to end", func() bool { return ch.state().Active.Load() == 0 })
				if ss.Reason() != streamstate.ReasonIdleTimeout {
					t.Fatalf("reason %q, want idle_timeout", ss.Reason())
				}
			})

			t.Run("upstream stops reading while the client writes", func(t *testing.T) {
				ch := newChain()
				c := dial(t, ch.addr)
				if _, err := c.Write([]byte("S")); err != nil {
					t.Fatal(err)
				}
				ss := ch.session(t)
				start := time.Now()
				buf := make([]byte, 64<<10)
				var err error
				for i := 0; i < 4096 && err == nil; i++ { // at most 256 MiB
					_ = c.SetWriteDeadline(time.Now().Add(4 * time.Second))
					_, err = c.Write(buf)
				}
				if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatalf("client kept writing to an upstream that stopped reading for %s (err %v): want the connection cut after the %s idle timeout",
						time.Since(start).Round(time.Millisecond), err, idle)
				}
				waitFor(t, "the session to end", func() bool { return ch.state().Active.Load() == 0 })
				if ss.Reason() != streamstate.ReasonIdleTimeout {
					t.Fatalf("reason %q, want idle_timeout", ss.Reason())
				}
			})

			t.Run("client stops reading while the upstream writes", func(t *testing.T) {
				ch := newChain()
				c := dial(t, ch.addr)
				if _, err := c.Write([]byte("F")); err != nil {
					t.Fatal(err)
				}
				ss := ch.session(t)
				select {
				case err := <-floodErr:
					if err == nil {
						t.Fatal("the upstream wrote 256 MiB to a client that reads nothing")
					}
				case <-time.After(5 * time.Second):
					t.Fatalf("upstream still writing to a client that stopped reading after 5s: want the connection cut after the %s idle timeout", idle)
				}
				waitFor(t, "the session to end", func() bool { return ch.state().Active.Load() == 0 })
				if ss.Reason() != streamstate.ReasonIdleTimeout {
					t.Fatalf("reason %q, want idle_timeout", ss.Reason())
				}
			})
		})
	}
}

// ---- PROXY protocol --------------------------------------------------------

// wantHeader builds the PROXY header for a TCP connection from src to dst
// by hand, from the HAProxy spec rather than from go-proxyproto's writer.
func wantHeader(t *testing.T, version int, src, dst *net.TCPAddr) []byte {
	t.Helper()
	v4 := src.IP.To4() != nil && dst.IP.To4() != nil
	if version == 1 {
		fam := "TCP6"
		if v4 {
			fam = "TCP4"
		}
		return fmt.Appendf(nil, "PROXY %s %s %s %d %d\r\n", fam, src.IP, dst.IP, src.Port, dst.Port)
	}
	b := []byte("\r\n\r\n\x00\r\nQUIT\n")
	b = append(b, 0x21) // version 2, PROXY command
	var addrs []byte
	if v4 {
		b = append(b, 0x11) // AF_INET, STREAM
		addrs = append(append(addrs, src.IP.To4()...), dst.IP.To4()...)
	} else {
		b = append(b, 0x21) // AF_INET6, STREAM
		addrs = append(append(addrs, src.IP.To16()...), dst.IP.To16()...)
	}
	addrs = binary.BigEndian.AppendUint16(addrs, uint16(src.Port))
	addrs = binary.BigEndian.AppendUint16(addrs, uint16(dst.Port))
	b = binary.BigEndian.AppendUint16(b, uint16(len(addrs)))
	return append(b, addrs...)
}

func TestProxyHeaderBytes(t *testing.T) {
	checkProxyHeaders(t, startChain, []proxyCase{
		{1, "127.0.0.1:0"}, {2, "127.0.0.1:0"}, {1, "[::1]:0"}, {2, "[::1]:0"},
	})
}

// proxyCase is a PROXY header version and the address the proxy listens on.
type proxyCase struct {
	version int
	listen  string
}

// checkProxyHeaders relays a payload through what start starts with each
// case's proxy_protocol version and listen address, and checks that the
// upstream gets the exact header, naming the client and the address it
// connected to, which go-proxyproto reads back, then the payload.
func checkProxyHeaders(t *testing.T, start starter, cases []proxyCase) {
	payload := []byte("client bytes after the header\n")
	for _, tc := range cases {
		t.Run(fmt.Sprintf("v%d %s", tc.version, tc.listen), func(t *testing.T) {
			raw := make(chan []byte, 1)
			u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				b, _ := io.ReadAll(c) // until the client's half-close reaches it
				raw <- b
			})
			ch := start(t, tc.listen, &l4aegisguard.Handler{LogConnections: true},
				&l4aegisproxy.Handler{Upstream: u.Addr, ProxyProtocol: tc.version})
			logged := make(chan streamstate.LogRecord, 1)
			ch.state().SetLogSink(func(r streamstate.LogRecord) bool { logged <- r; return true })
			c := dial(t, ch.addr)
			if _, err := c.Write(payload); err != nil {
				t.Fatal(err)
			}
			_ = c.CloseWrite()
			var got []byte
			select {
			case got = <-raw:
			case <-time.After(5 * time.Second):
				t.Fatal("upstream got nothing within 5s")
			}
			src, dst := c.LocalAddr().(*net.TCPAddr), c.RemoteAddr().(*net.TCPAddr)
			want := append(wantHeader(t, tc.version, src, dst), payload...)
			if !bytes.Equal(got, want) {
				t.Fatalf("upstream got\n%q\nwant\n%q", got, want)
			}

			// go-proxyproto reads the same header back, and the payload follows.
			br := bufio.NewReader(bytes.NewReader(got))
			hdr, err := proxyproto.Read(br)
			if err != nil {
				t.Fatalf("go-proxyproto cannot read the header: %v", err)
			}
			hs, hd, ok := hdr.TCPAddrs()
			if !ok || int(hdr.Version) != tc.version || hdr.Command != proxyproto.PROXY ||
				!hs.IP.Equal(src.IP) || hs.Port != src.Port || !hd.IP.Equal(dst.IP) || hd.Port != dst.Port {
				t.Fatalf("parsed header %+v (%v → %v), want v%d %v → %v", hdr, hs, hd, tc.version, src, dst)
			}
			if rest, _ := io.ReadAll(br); !bytes.Equal(rest, payload) {
				t.Fatalf("payload after the header: %q", rest)
			}
			// bytes_sent counts the client's bytes, not the header.
			select {
			case r := <-logged:
				if r.BytesSent != uint64(len(payload)) {
					t.Fatalf("bytes_sent %d, want the client's %d (the header is not the client's)", r.BytesSent, len(payload))
				}
			case <-time.After(5 * time.Second):
				t.Fatal("the connection was not logged within 5s")
			}
		})
	}
}

// addrConn is one end of a net.Pipe that reports the given addresses, so a
// fuzzer can choose what the proxy sees as the client's source and the
// listener's address.
type addrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c addrConn) LocalAddr() net.Addr  { return c.local }
func (c addrConn) RemoteAddr() net.Addr { return c.remote }

// fuzzIP turns fuzz bytes into an address of the chosen family: 4 bytes for
// IPv4 (16 in the IPv4-mapped form a dual-stack socket reports, when
// mapped), 16 bytes for IPv6.
func fuzzIP(b []byte, v6, mapped bool) net.IP {
	n := 4
	if v6 {
		n = 16
	}
	ip := make(net.IP, n)
	copy(ip, b)
	if !v6 && mapped {
		return ip.To16()
	}
	return ip
}

func FuzzProxyHeader(f *testing.F) {
	// The seed corpus is in testdata/fuzz/FuzzProxyHeader.

	// One upstream and one proxy per version serve every input.
	accepted := make(chan net.Conn, 1)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- c
		}
	}()
	f.Cleanup(func() { ln.Close(); wg.Wait() })
	var chains [3]layer4.Handler
	for v := 1; v <= 2; v++ {
		h := &l4aegisproxy.Handler{Upstream: ln.Addr().String(), ProxyProtocol: v, DialTimeout: caddy.Duration(2 * time.Second)}
		if err := h.Provision(newCtx(f)); err != nil {
			f.Fatal(err)
		}
		f.Cleanup(func() { _ = h.Cleanup() })
		chains[v] = layer4.Handlers{h}.Compile()
	}

	var runs atomic.Int64
	f.Fuzz(func(t *testing.T, version uint8, v6 bool, srcIP []byte, sport uint16, dstIP []byte, dport uint16, payload []byte) {
		runs.Add(1)
		ver := 1 + int(version&1)
		mapped := version&0x80 != 0
		src := &net.TCPAddr{IP: fuzzIP(srcIP, v6, mapped), Port: int(sport)}
		dst := &net.TCPAddr{IP: fuzzIP(dstIP, v6, mapped), Port: int(dport)}
		if (src.IP.To4() != nil) != (dst.IP.To4() != nil) {
			// A TCP socket's two ends are of one family; a v6 socket
			// reports IPv4 peers as mapped addresses on both ends.
			return
		}
		if len(payload) > 4096 {
			payload = payload[:4096]
		}

		client, server := net.Pipe()
		defer client.Close()
		handled := make(chan error, 1)
		go func() {
			cx := layer4.WrapConnection(addrConn{server, dst, src}, nil, zap.NewNop())
			handled <- chains[ver].Handle(cx)
			server.Close()
		}()
		go func() {
			_, _ = client.Write(payload)
			_ = client.Close()
		}()

		var up net.Conn
		select {
		case up = <-accepted:
		case <-time.After(5 * time.Second):
			t.Fatal("the proxy did not dial the upstream")
		}
		defer up.Close()
		_ = up.SetDeadline(time.Now().Add(5 * time.Second))
		br := bufio.NewReader(up)
		hdr, err := proxyproto.Read(br)
		if err != nil {
			t.Fatalf("v%d %v → %v: go-proxyproto cannot read our header: %v", ver, src, dst, err)
		}
		hs, hd, ok := hdr.TCPAddrs()
		if !ok || int(hdr.Version) != ver || hdr.Command != proxyproto.PROXY ||
			!hs.IP.Equal(src.IP) || hs.Port != src.Port || !hd.IP.Equal(dst.IP) || hd.Port != dst.Port {
			t.Fatalf("v%d %v → %v: parsed back as %+v (%v → %v)", ver, src, dst, hdr, hs, hd)
		}
		wantFam := proxyproto.TCPv6
		if src.IP.To4() != nil {
			wantFam = proxyproto.TCPv4
		}
		if hdr.TransportProtocol != wantFam {
			t.Fatalf("v%d %v → %v: transport %v, want %v", ver, src, dst, hdr.TransportProtocol, wantFam)
		}
		rest, err := io.ReadAll(br)
		if err != nil || !bytes.Equal(rest, payload) {
			t.Fatalf("payload after the header: got %q (err %v), want %q", rest, err, payload)
		}
		// A reset leaves no TIME_WAIT behind: thousands of iterations
		// would otherwise use up the loopback's ephemeral ports.
		_ = up.(*net.TCPConn).SetLinger(0)
		up.Close()
		select {
		case <-handled:
		case <-time.After(5 * time.Second):
			t.Fatal("Handle did not return after both sides closed")
		}
	})
}

// ---- configuration ---------------------------------------------------------

func TestUnmarshalCaddyfile(t *testing.T) {
	var h l4aegisproxy.Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`aegis_proxy db.internal:5432 {
		stream_id 3
		dial_timeout 2s
		proxy_protocol 2
		health_check_interval 30s
		half_close
	}`))
	if err != nil {
		t.Fatal(err)
	}
	if h.Upstream != "db.internal:5432" || h.StreamID != 3 || h.DialTimeout != caddy.Duration(2*time.Second) ||
		h.ProxyProtocol != 2 || h.HealthCheckInterval != caddy.Duration(30*time.Second) || !h.HalfClose {
		t.Fatalf("got %+v", h)
	}
	var bare l4aegisproxy.Handler
	if err := bare.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_proxy [::1]:22")); err != nil || bare.Upstream != "[::1]:22" {
		t.Fatalf("bare: %+v, %v", bare, err)
	}
	var off l4aegisproxy.Handler
	if err := off.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_proxy a:1 {\n half_close false\n}")); err != nil || off.HalfClose {
		t.Fatalf("half_close false: %+v, %v", off, err)
	}
	var withTLS l4aegisproxy.Handler
	err = withTLS.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_proxy 10.0.0.5:5432 {\n tls_server_name db.internal\n tls_client_cert_id 4\n tls_insecure_skip_verify\n tls_ca <<PEM\n  -----BEGIN CERTIFICATE-----\n  PEM\n}"))
	if want := (l4aegisproxy.UpstreamTLS{ServerName: "db.internal", ClientCertID: 4, InsecureSkipVerify: true, CA: "-----BEGIN CERTIFICATE-----"}); err != nil || withTLS.TLS == nil || *withTLS.TLS != want {
		t.Fatalf("tls options: %+v, %v", withTLS.TLS, err)
	}
	var plainTLS l4aegisproxy.Handler
	if err := plainTLS.UnmarshalCaddyfile(caddyfile.NewTestDispenser("aegis_proxy a:1 {\n tls\n}")); err != nil || plainTLS.TLS == nil || *plainTLS.TLS != (l4aegisproxy.UpstreamTLS{}) {
		t.Fatalf("tls alone: %+v, %v", plainTLS.TLS, err)
	}

	for _, tc := range []struct{ in, want string }{
		{"aegis_proxy", "aegis_proxy"},
		{"aegis_proxy a:1 b:2", "b:2"},
		{"aegis_proxy a:1 {\n stream_id x\n}", `stream_id "x"`},
		{"aegis_proxy a:1 {\n proxy_protocol two\n}", `proxy_protocol "two"`},
		{"aegis_proxy a:1 {\n dial_timeout forever\n}", `dial_timeout "forever"`},
		{"aegis_proxy a:1 {\n health_check_interval often\n}", `health_check_interval "often"`},
		{"aegis_proxy a:1 {\n dial_timeout\n}", "dial_timeout"},
		{"aegis_proxy a:1 {\n dial_timeout 1s 2s\n}", "dial_timeout"},
		{"aegis_proxy a:1 {\n upstream b:2\n}", `"upstream"`},
		{"aegis_proxy a:1 {\n half_close yes\n}", `half_close "yes"`},
		{"aegis_proxy a:1 {\n tls maybe\n}", `tls "maybe"`},
		{"aegis_proxy a:1 {\n tls_client_cert_id one\n}", `tls_client_cert_id "one"`},
		{"aegis_proxy a:1 {\n tls_server_name\n}", "tls_server_name"},
		{"aegis_proxy a:1 {\n half_close true false\n}", `half_close "true false"`},
		{"aegis_proxy a:1 {\n stream_id 1\n stream_id 2\n}", `aegis_proxy option "stream_id" given twice`},
		{"aegis_proxy a:1 {\n half_close\n half_close false\n}", `aegis_proxy option "half_close" given twice`},
		{"aegis_proxy a:1 {\n dial_timeout 1s {\n x\n }\n}", `aegis_proxy option "dial_timeout": blocks are not supported`},
		{"aegis_proxy a:1 {\n half_close {\n x\n }\n}", `aegis_proxy option "half_close": blocks are not supported`},
		{"aegis_proxy a:1 {\n dial_timeout {\n 1s\n }\n}", "dial_timeout: want one value, got 0"},
	} {
		var h l4aegisproxy.Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got error %v, want one naming %s", tc.in, err, tc.want)
		}
	}
}

func TestProvisionErrors(t *testing.T) {
	for _, tc := range []struct {
		h    l4aegisproxy.Handler
		want string
	}{
		{l4aegisproxy.Handler{}, `upstream ""`},
		{l4aegisproxy.Handler{Upstream: "db.internal"}, `upstream "db.internal"`},
		{l4aegisproxy.Handler{Upstream: "a:1", ProxyProtocol: 3}, "proxy_protocol 3"},
		{l4aegisproxy.Handler{Upstream: "a:1", ProxyProtocol: -1}, "proxy_protocol -1"},
		{l4aegisproxy.Handler{Upstream: "a:1", DialTimeout: caddy.Duration(-time.Second)}, "dial_timeout -1s"},
		{l4aegisproxy.Handler{Upstream: "a:1", HealthCheckInterval: caddy.Duration(-time.Second)}, "health_check_interval -1s"},
	} {
		h := tc.h
		err := h.Provision(newCtx(t))
		if err == nil {
			_ = h.Cleanup()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Provision(%+v): got error %v, want one containing %q", tc.h, err, tc.want)
		}
	}
}

func TestDialFailureClosesClient(t *testing.T) {
	// A port that nothing listens on: the dial is refused at once.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	ch := startChain(t, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{Upstream: dead})
	c := dial(t, ch.addr)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := c.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client of an unreachable upstream: n=%d err=%v, want closed", n, err)
	}
	waitFor(t, "the session to end", func() bool { return ch.state().Active.Load() == 0 })
}

// TestRelayStepsDoNotAllocate: once a connection is relaying, moving a
// message each way allocates nothing in the proxy (buffers, pipes and the
// relay's callbacks are pooled or bound once).
func TestRelayStepsDoNotAllocate(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates; `make test` runs this without it")
	}
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) { _, _ = io.Copy(c, c) })
	ch := startChain(t, "127.0.0.1:0", &l4aegisguard.Handler{IdleTimeout: caddy.Duration(time.Minute)}, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	msg := make([]byte, 64)
	buf := make([]byte, 64)
	roundTrip := func() {
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 50; i++ {
		roundTrip() // warm up the pools
	}
	// The test's own client and the echo upstream allocate nothing per
	// message either, so whatever is counted is the proxy's.
	if allocs := testing.AllocsPerRun(500, roundTrip); allocs > 0.05 {
		t.Fatalf("%.2f allocations per round trip through the relay, want 0", allocs)
	}
}

// Without half_close and without a guard (no session), a client that shuts
// its write side still has both sides closed: the upstream sees the end,
// and the client reads the reply and EOF though the upstream never closed.
func TestEndClosesBothWithoutGuard(t *testing.T) {
	ended := make(chan error, 1)
	hold := make(chan struct{})
	u := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
		_, _ = c.Write([]byte("reply"))
		_, err := io.Copy(io.Discard, c)
		ended <- err
		<-hold
	})
	t.Cleanup(func() { close(hold) }) // before the server's cleanup
	ch := startChain(t, "127.0.0.1:0", nil, &l4aegisproxy.Handler{Upstream: u.Addr})
	c := dial(t, ch.addr)
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the upstream saw no end within 5s")
	}
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Fatalf("client after its end: read %q, %v; want EOF", rest, err)
	}
}

// Cleanup ends the health checks, also when the module's context goes on
// (the streams app provisions the handlers in its own long-lived one).
func TestCleanupEndsHealthChecks(t *testing.T) {
	var dials atomic.Int64
	up := newUpstream(t, "127.0.0.1:0", func(c net.Conn) { dials.Add(1); c.Close() })
	h := l4aegisproxy.Handler{Upstream: up.Addr, HealthCheckInterval: caddy.Duration(5 * time.Millisecond)}
	if err := h.Provision(newCtx(t)); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, "a health check", func() bool { return dials.Load() > 0 })
	_ = h.Cleanup()
	time.Sleep(20 * time.Millisecond) // a check in flight ends
	n := dials.Load()
	time.Sleep(100 * time.Millisecond)
	if got := dials.Load(); got != n {
		t.Fatalf("%d health checks after Cleanup", got-n)
	}
}
