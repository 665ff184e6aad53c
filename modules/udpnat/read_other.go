//go:build !linux

package udpnat

import (
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// readLoop reads one datagram per call until the socket is closed.
func (s *socket) readLoop() {
	buf := make([]byte, headroom+maxDatagram)
	var oob []byte
	if s.wildcard && oobSize > 0 {
		oob = make([]byte, oobSize)
	}
	var backoff time.Duration
	for {
		n, oobn, flags, src, err := s.pc.ReadMsgUDPAddrPort(buf[headroom:], oob)
		if err != nil {
			if readError(err, &backoff) {
				return
			}
			continue
		}
		backoff = 0
		if flags&msgTrunc != 0 {
			s.r.state.DropDatagrams(streamstate.DropTruncated, 1)
			continue
		}
		s.r.datagram(s, buf, n, src, oob[:oobn])
	}
}
