package udpnat

import (
	"encoding/binary"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"
)

// oobSize holds one IPv4 or IPv6 packet-info control message.
const oobSize = 128

const msgTrunc = unix.MSG_TRUNC

// rcvBuf is the receive buffer asked for on listening sockets, so a burst
// of datagrams waits in the kernel instead of being dropped. The kernel
// caps it at net.core.rmem_max.
const rcvBuf = 4 << 20

// ListenControl sets up a stream's listening UDP socket: a larger receive
// buffer and, on a wildcard address, packet info, so that the relay learns
// which address each client sent to (for the PROXY header) and replies
// from that same address.
func ListenControl(_, _ string, c syscall.RawConn) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		s := int(fd)
		_ = unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_RCVBUF, rcvBuf)
		domain, err := unix.GetsockoptInt(s, unix.SOL_SOCKET, unix.SO_DOMAIN)
		if err != nil {
			serr = err
			return
		}
		// Packet info costs little, and the bound address is not known
		// here in a form worth parsing: ask for it on every socket.
		if domain == unix.AF_INET6 {
			serr = unix.SetsockoptInt(s, unix.IPPROTO_IPV6, unix.IPV6_RECVPKTINFO, 1)
		} else {
			serr = unix.SetsockoptInt(s, unix.IPPROTO_IP, unix.IP_PKTINFO, 1)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// parseDst finds the destination address of a received datagram in its
// control messages (IP_PKTINFO or IPV6_PKTINFO).
func parseDst(oob []byte) (netip.Addr, bool) {
	const hdr = unix.SizeofCmsghdr
	for len(oob) >= hdr {
		var n int
		if hdr == 16 {
			n = int(min(binary.NativeEndian.Uint64(oob), uint64(len(oob))))
		} else {
			n = int(binary.NativeEndian.Uint32(oob))
		}
		level := int32(binary.NativeEndian.Uint32(oob[hdr-8:]))
		typ := int32(binary.NativeEndian.Uint32(oob[hdr-4:]))
		if n < hdr || n > len(oob) {
			return netip.Addr{}, false
		}
		data := oob[hdr:n]
		switch {
		case level == unix.IPPROTO_IP && typ == unix.IP_PKTINFO && len(data) >= unix.SizeofInet4Pktinfo:
			// struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
			return netip.AddrFrom4([4]byte(data[8:12])), true
		case level == unix.IPPROTO_IPV6 && typ == unix.IPV6_PKTINFO && len(data) >= unix.SizeofInet6Pktinfo:
			// struct in6_pktinfo { in6_addr addr; int ifindex; }
			return netip.AddrFrom16([16]byte(data[:16])), true
		}
		next := unix.CmsgSpace(n - hdr)
		if next <= 0 || next > len(oob) {
			return netip.Addr{}, false
		}
		oob = oob[next:]
	}
	return netip.Addr{}, false
}

// pktinfo is the control message that makes a reply leave from dst.
func pktinfo(dst netip.Addr, v6 bool) []byte {
	if !dst.IsValid() || dst.IsUnspecified() {
		return nil
	}
	if v6 {
		return unix.PktInfo6(&unix.Inet6Pktinfo{Addr: dst.As16()})
	}
	return unix.PktInfo4(&unix.Inet4Pktinfo{Spec_dst: dst.Unmap().As4()})
}
