package testenv

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Dial connects to 127.0.0.1:port over TCP; the connection is closed when
// the test ends.
func Dial(t testing.TB, port int) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// RoundTrip writes msg and returns as many bytes as it reads back, within
// 5 seconds.
func RoundTrip(t testing.TB, c net.Conn, msg string) string {
	t.Helper()
	got, err := TryRoundTrip(c, msg)
	if err != nil {
		t.Fatalf("round trip of %q: %v", msg, err)
	}
	return got
}

// TryRoundTrip is RoundTrip for other goroutines than the test's.
func TryRoundTrip(c net.Conn, msg string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	defer c.SetDeadline(time.Time{})
	if _, err := c.Write([]byte(msg)); err != nil {
		return "", err
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil {
		return "", err
	}
	return string(buf), nil
}

// ExpectClosed fails the test unless the peer closes c (EOF or reset)
// within the time given, without sending anything.
func ExpectClosed(t testing.TB, c net.Conn, within time.Duration) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	n, err := c.Read(make([]byte, 16))
	if n != 0 || err == nil || IsTimeout(err) {
		t.Fatalf("want the proxy to close the connection within %s, got n=%d err=%v", within, n, err)
	}
}

// IsTimeout reports whether err is a timeout, such as a passed deadline.
func IsTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// Refused reports whether nothing listens for TCP on 127.0.0.1:port.
func Refused(t testing.TB, port int) bool {
	t.Helper()
	c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 2*time.Second)
	if err == nil {
		c.Close()
		return false
	}
	return errors.Is(err, syscall.ECONNREFUSED)
}

// DialUDP returns a UDP socket from src (an IP address, "" for any)
// connected to dst:port; it is closed when the test ends.
func DialUDP(t testing.TB, src, dst string, port int) *net.UDPConn {
	t.Helper()
	var laddr *net.UDPAddr
	if src != "" {
		laddr = &net.UDPAddr{IP: net.ParseIP(src)}
	}
	c, err := net.DialUDP("udp", laddr, &net.UDPAddr{IP: net.ParseIP(dst), Port: port})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// UDPRoundTrip sends msg and returns the first reply, or "" if none came
// within the time given.
func UDPRoundTrip(t testing.TB, c *net.UDPConn, msg string, within time.Duration) string {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("udp write: %v", err)
	}
	return UDPRead(t, c, within)
}

// UDPRead returns the next datagram c receives, or "" if none came within
// the time given or the peer's port is closed (ICMP port unreachable).
func UDPRead(t testing.TB, c *net.UDPConn, within time.Duration) string {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(within))
	buf := make([]byte, 65535)
	n, err := c.Read(buf)
	if err != nil {
		if IsTimeout(err) || errors.Is(err, syscall.ECONNREFUSED) {
			return ""
		}
		t.Fatalf("udp read: %v", err)
	}
	return string(buf[:n])
}

// PrefixEdges are p's first and last addresses, the addresses just outside
// them, and the IPv4-mapped form of each IPv4 one: where a CIDR check is
// most likely wrong.
func PrefixEdges(p netip.Prefix) []netip.Addr {
	first := p.Addr()
	b := first.AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 1 << (7 - i%8)
	}
	last, _ := netip.AddrFromSlice(b)
	out := []netip.Addr{first, last}
	if a := first.Prev(); a.IsValid() {
		out = append(out, a)
	}
	if a := last.Next(); a.IsValid() {
		out = append(out, a)
	}
	for _, a := range out {
		if a.Is4() {
			out = append(out, netip.AddrFrom16(a.As16()))
		}
	}
	return out
}

// RefEntry is a whitelist or blacklist entry as the standard library's
// net package reads it, independently of net/netip: the reference that
// fuzz targets check the CIDR parsers against.
type RefEntry struct {
	network *net.IPNet // a CIDR
	ip      net.IP     // a bare address
}

// ParseRefEntry reads s with net.ParseCIDR or net.ParseIP.
func ParseRefEntry(s string) (RefEntry, bool) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "/") {
		_, n, err := net.ParseCIDR(s)
		return RefEntry{network: n}, err == nil
	}
	ip := net.ParseIP(s)
	return RefEntry{ip: ip}, ip != nil
}

// Contains reports whether a is in the entry, as net.IPNet.Contains and
// net.IP.Equal see it.
func (r RefEntry) Contains(a netip.Addr) bool {
	ip := net.IP(a.AsSlice())
	if r.network != nil {
		return r.network.Contains(ip)
	}
	return r.ip != nil && r.ip.Equal(ip)
}

// ProbeAddrs are addresses every CIDR check tries: the ends of both
// families, loopback, documentation, link-local and IPv4-mapped ones.
var ProbeAddrs = []netip.Addr{
	netip.MustParseAddr("0.0.0.0"), netip.MustParseAddr("255.255.255.255"),
	netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("192.0.2.7"),
	netip.MustParseAddr("::"), netip.MustParseAddr("::1"), netip.MustParseAddr("2001:db8::1"),
	netip.MustParseAddr("fe80::1"), netip.MustParseAddr("::ffff:10.0.0.1"), netip.MustParseAddr("::ffff:0:0"),
	netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
}

// TCPPair returns the two ends of a real loopback TCP connection; both are
// closed when the test ends.
func TCPPair(t testing.TB) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s := <-accepted
	if s == nil {
		c.Close()
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c.(*net.TCPConn), s.(*net.TCPConn)
}
