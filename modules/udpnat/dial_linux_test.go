package udpnat

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestUpstreamSocketFamily: an entry's upstream socket is of the
// upstream's own family: an IPv4 upstream gets an IPv4 socket (not a
// dual-stack IPv6 one with a mapped address), an IPv6 upstream an IPv6
// one; and the socket is connected to it.
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
		c := &entry{}
		if err := c.dial(target); err != nil {
			t.Fatal(err)
		}
		family, serr := unix.GetsockoptInt(c.fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
		peer, perr := unix.Getpeername(c.fd)
		if serr != nil || perr != nil || family != tc.family {
			t.Errorf("upstream %s: family %d (%v), want %d", tc.upstream, family, serr, tc.family)
		}
		var port int
		switch sa := peer.(type) {
		case *unix.SockaddrInet4:
			port = sa.Port
		case *unix.SockaddrInet6:
			port = sa.Port
		}
		if port != int(target.Port()) {
			t.Errorf("upstream %s: connected to %#v, want port %d", tc.upstream, peer, target.Port())
		}
		// It works as a socket: a datagram reaches the upstream.
		if _, err := unix.Write(c.fd, []byte("hi")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 8)
		_ = up.SetReadDeadline(time.Now().Add(2 * time.Second))
		if n, _, err := up.ReadFromUDP(buf); err != nil || string(buf[:n]) != "hi" {
			t.Errorf("upstream %s: read %q, %v", tc.upstream, buf[:n], err)
		}
		unix.Close(c.fd)
	}
}
