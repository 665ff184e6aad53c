//go:build !linux

package udpnat

import (
	"net"
	"net/netip"
)

// dial opens a new entry's upstream socket, connected to target.
func (e *entry) dial(target netip.AddrPort) error {
	c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		return err
	}
	e.conn = c
	e.rc, _ = c.SyscallConn()
	e.readFn = e.read
	e.sendFn = e.send
	return nil
}

// spareSockets makes no socket ahead here: each entry dials its own.
type spareSockets struct{}

func (*spareSockets) close() {}
