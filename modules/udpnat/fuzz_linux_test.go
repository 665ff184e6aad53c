package udpnat

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"

	proxyproto "github.com/pires/go-proxyproto"
	"golang.org/x/sys/unix"
)

// FuzzParseDst feeds arbitrary control-message bytes to the parser that
// reads a datagram's destination: it must never panic or read past the
// buffer, and an address it finds must be bytes of the input (never made
// up). The input also seeds well-formed packet info, IPv4 and IPv6, alone
// and after another control message, in which the parser must find exactly
// the destination address (ipi_addr, in6_pktinfo.addr).
func FuzzParseDst(f *testing.F) {
	v4 := unix.PktInfo4(&unix.Inet4Pktinfo{Ifindex: 1, Spec_dst: [4]byte{127, 0, 0, 1}, Addr: [4]byte{127, 0, 0, 7}})
	v6 := unix.PktInfo6(&unix.Inet6Pktinfo{Addr: netip.MustParseAddr("::ffff:127.0.0.9").As16(), Ifindex: 1})
	f.Add(v4)
	f.Add(v6)
	f.Add(append(append([]byte{}, v6...), v4...))
	f.Add(v4[:len(v4)-4])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, oob []byte) {
		a, ok := parseDst(oob)
		if ok {
			if !a.IsValid() {
				t.Fatalf("parseDst(%x) = %v, true: an invalid address", oob, a)
			}
			if !bytes.Contains(oob, a.AsSlice()) {
				t.Fatalf("parseDst(%x) = %v: not an address the input holds", oob, a)
			}
		}

		// Well-formed packet info made from the input's bytes.
		var b [16]byte
		copy(b[:], oob)
		want4, want6 := netip.AddrFrom4([4]byte(b[:4])), netip.AddrFrom16(b)
		info4 := unix.PktInfo4(&unix.Inet4Pktinfo{Ifindex: 2, Spec_dst: [4]byte{b[4], b[5], b[6], b[7]}, Addr: want4.As4()})
		info6 := unix.PktInfo6(&unix.Inet6Pktinfo{Addr: want6.As16(), Ifindex: 2})
		// A control message of another kind (SCM_RIGHTS with one fd)
		// that the parser must step over.
		other := unix.UnixRights(int(binary.NativeEndian.Uint32(b[:4]) & 0x7fffffff))
		for _, tc := range []struct {
			oob  []byte
			want netip.Addr
		}{
			{info4, want4},
			{info6, want6},
			{append(append([]byte{}, other...), info4...), want4},
			{append(append([]byte{}, other...), info6...), want6},
			{append(append([]byte{}, info6...), info4...), want6},
		} {
			if got, ok := parseDst(tc.oob); !ok || got != tc.want {
				t.Fatalf("parseDst(%x) = %v, %v; want %v", tc.oob, got, ok, tc.want)
			}
		}
	})
}

// FuzzProxyHeader builds the PROXY v2 header of arbitrary client and
// destination addresses and reads it back with go-proxyproto.
func FuzzProxyHeader(f *testing.F) {
	f.Add([]byte{192, 0, 2, 1}, uint16(5000), []byte{198, 51, 100, 2}, uint16(53))
	f.Add(netip.MustParseAddr("2001:db8::1").AsSlice(), uint16(1), netip.MustParseAddr("::ffff:10.0.0.1").AsSlice(), uint16(65535))
	f.Add([]byte{0, 0, 0, 0}, uint16(0), netip.MustParseAddr("::").AsSlice(), uint16(0))
	f.Fuzz(func(t *testing.T, src []byte, sport uint16, dst []byte, dport uint16) {
		sa, ok1 := netip.AddrFromSlice(src)
		da, ok2 := netip.AddrFromSlice(dst)
		if !ok1 || !ok2 {
			return
		}
		s, d := netip.AddrPortFrom(sa, sport), netip.AddrPortFrom(da, dport)
		hdr, err := proxyHeader(s, d)
		if err != nil {
			t.Fatalf("%s → %s: %v", s, d, err)
		}
		if len(hdr) > headroom {
			t.Fatalf("%s → %s: %d-byte header exceeds the headroom", s, d, len(hdr))
		}
		h, err := proxyproto.Read(bufio.NewReader(bytes.NewReader(hdr)))
		if err != nil {
			t.Fatalf("%s → %s: header %x does not parse: %v", s, d, hdr, err)
		}
		gs, gd := h.SourceAddr.(*net.UDPAddr).AddrPort(), h.DestinationAddr.(*net.UDPAddr).AddrPort()
		if gs.Addr().Unmap() != sa.Unmap() || gs.Port() != sport || gd.Addr().Unmap() != da.Unmap() || gd.Port() != dport {
			t.Fatalf("%s → %s came back as %s → %s", s, d, gs, gd)
		}
		// Two IPv4 ends (mapped or not) make an IPv4 header (16 + 12
		// bytes); any IPv6 end makes both IPv6 (16 + 36).
		wantTP, wantLen := proxyproto.UDPv4, 28
		if !sa.Unmap().Is4() || !da.Unmap().Is4() {
			wantTP, wantLen = proxyproto.UDPv6, 52
		}
		if h.Version != 2 || h.Command != proxyproto.PROXY || h.TransportProtocol != wantTP || len(hdr) != wantLen {
			t.Fatalf("%s → %s: version %d, command %v, transport %v, %d bytes; want 2, PROXY, %v, %d bytes",
				s, d, h.Version, h.Command, h.TransportProtocol, len(hdr), wantTP, wantLen)
		}
	})
}
