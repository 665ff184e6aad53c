package udpnat

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// TestUpstreamSocketFamily: an entry's upstream socket is of the
// upstream's own family: an IPv4 upstream gets an IPv4 socket (not a
// dual-stack IPv6 one with a mapped address), an IPv6 upstream an IPv6
// one; and the socket is connected to it. The same for the spare socket
// made after the first (spareSockets), which the second entry takes.
func TestUpstreamSocketFamily(t *testing.T) {
	for _, tc := range []struct {
		upstream string
		family   int
	}{
		{"127.0.0.1", unix.AF_INET},
		{"::1", unix.AF_INET6},
	} {
		up, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.ParseIP(tc.upstream)})
		if err != nil {
			if tc.family == unix.AF_INET6 {
				t.Logf("IPv6 loopback unavailable, skipped: %v", err)
				continue
			}
			t.Fatal(err)
		}
		defer up.Close()
		target := up.LocalAddr().(*net.UDPAddr).AddrPort()
		target = netip.AddrPortFrom(target.Addr().Unmap(), target.Port())
		r := &Relay{}
		for i := range 2 {
			spare := r.spare.fd[spareSlot(tc.family)].Load() - 1
			if i == 1 && spare < 0 {
				t.Fatalf("upstream %s: no spare socket after refill", tc.upstream)
			}
			c := &entry{r: r}
			if err := c.dial(target); err != nil {
				t.Fatal(err)
			}
			if i == 1 && int64(c.fd) != spare {
				t.Errorf("upstream %s: the second entry has socket %d, not the spare %d", tc.upstream, c.fd, spare)
			}
			checkUpstreamSocket(t, c.fd, up, tc.upstream, tc.family, target)
			unix.Close(c.fd)
			r.spare.refill()
		}
		r.spare.close()
		if fd := r.spare.fd[spareSlot(tc.family)].Load(); fd != 0 {
			t.Errorf("upstream %s: spare socket %d left after close", tc.upstream, fd-1)
		}
	}
}

// checkUpstreamSocket checks that fd is a socket of family connected to
// target, where up reads.
func checkUpstreamSocket(t *testing.T, fd int, up *net.UDPConn, upstream string, wantFamily int, target netip.AddrPort) {
	t.Helper()
	family, serr := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	peer, perr := unix.Getpeername(fd)
	if serr != nil || perr != nil || family != wantFamily {
		t.Errorf("upstream %s: family %d (%v), want %d", upstream, family, serr, wantFamily)
	}
	var port int
	switch sa := peer.(type) {
	case *unix.SockaddrInet4:
		port = sa.Port
	case *unix.SockaddrInet6:
		port = sa.Port
	}
	if port != int(target.Port()) {
		t.Errorf("upstream %s: connected to %#v, want port %d", upstream, peer, target.Port())
	}
	// It works as a socket: a datagram reaches the upstream.
	if _, err := unix.Write(fd, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 8)
	_ = up.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, _, err := up.ReadFromUDP(buf); err != nil || string(buf[:n]) != "hi" {
		t.Errorf("upstream %s: read %q, %v", upstream, buf[:n], err)
	}
}

// TestNewEntriesTakeSpareSockets: once a flow was relayed, the relay has a
// spare upstream socket, which the next new entry takes; and the relay
// closes the spare it holds when it goes.
func TestNewEntriesTakeSpareSockets(t *testing.T) {
	// Go's poller opens its descriptors with the first socket.
	warm, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	warm.Close()
	before := openFDs(t)
	t.Run("flows", func(t *testing.T) {
		started := make(chan int, 8)
		t.Cleanup(func() { startEntry = (*Relay).start }) // after the relay's
		startEntry = func(r *Relay, e *entry) error {
			started <- e.fd
			return r.start(e)
		}
		tr := newTestRelay(t, Config{Responses: 1, Policy: limits(t, streamstate.Limits{MaxConnections: 8, MaxConnectionsPerIP: 8})})
		p, buf := []byte("question"), make([]byte, 64)
		for i := range 5 {
			spare := int64(-1)
			if i > 0 {
				// The reader makes it after its batch, while the answer
				// may already be with the client.
				deadline := time.Now().Add(2 * time.Second)
				for spare < 0 && time.Now().Before(deadline) {
					if spare = tr.r.spare.fd[0].Load() - 1; spare < 0 {
						time.Sleep(time.Millisecond)
					}
				}
				if spare < 0 {
					t.Fatalf("no spare socket after flow %d", i)
				}
			}
			tr.flow(t, p, buf)
			if fd := <-started; i > 0 && int64(fd) != spare {
				t.Errorf("flow %d: its entry has socket %d, not the spare %d", i+1, fd, spare)
			}
		}
	})
	// The relay is gone, with its entries and its spare socket.
	deadline := time.Now().Add(5 * time.Second)
	for openFDs(t) > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := openFDs(t); n != before {
		t.Fatalf("%d descriptors open after the relay went, %d before it", n, before)
	}
}
