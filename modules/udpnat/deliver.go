//go:build !linux

package udpnat

import (
	"sync"
	"time"
)

// burst is unused where replies go out one by one.
type burst struct{}

var bufPool = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// deliver sends one reply datagram to the client.
func (e *entry) deliver(p []byte) {
	now := time.Now()
	e.last.Store(now.UnixNano())
	if e.down != nil && !e.down.AllowN(now, len(p)) {
		e.r.state.DatagramsDropped.Add(1)
		return
	}
	s := e.r.reply.Load()
	if s == nil {
		e.r.state.DatagramsDropped.Add(1)
		return
	}
	if err := e.sendReply(s, p); err != nil {
		e.r.state.DatagramsDropped.Add(1)
		return
	}
	e.ss.AddDatagramReceived(len(p))
}
