//go:build !linux

package udpnat

import (
	"sync"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// burst is unused where replies go out one by one.
type burst struct{}

var bufPool = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// deliver sends one reply datagram to the client.
func (e *entry) deliver(p []byte) {
	now := time.Now()
	e.last.Store(now.UnixNano())
	if e.down != nil && !e.down.Allow(now, len(p)) {
		e.r.state.DropDatagrams(streamstate.DropRateLimit, 1)
		return
	}
	s := e.r.reply.Load()
	if s == nil {
		e.r.state.DropDatagrams(streamstate.DropListenerClosed, 1)
		return
	}
	if err := e.sendReply(s, p); err != nil {
		e.r.state.DropDatagrams(streamstate.DropBufferFull, 1)
		return
	}
	e.ss.AddDatagramReceived(len(p))
}
