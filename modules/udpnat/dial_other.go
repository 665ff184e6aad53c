//go:build !linux

package udpnat

import (
	"net"
	"net/netip"
)

// dialUpstream opens a new entry's upstream socket, connected to target.
func dialUpstream(target netip.AddrPort) (upConn, error) {
	return net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(target))
}
