//go:build !linux

package udpnat

import (
	"net/netip"
	"syscall"
)

// oobSize is 0: packet info is read on Linux only. Elsewhere a wildcard
// socket's replies leave from the address the system picks, and a PROXY
// header names the wildcard address as the destination.
const oobSize = 0

const msgTrunc = 0

// ListenControl sets up a stream's listening UDP socket (nothing to do on
// this platform).
func ListenControl(_, _ string, _ syscall.RawConn) error { return nil }

func parseDst([]byte) (netip.Addr, bool) { return netip.Addr{}, false }

func pktinfo(netip.Addr, bool) []byte { return nil }
