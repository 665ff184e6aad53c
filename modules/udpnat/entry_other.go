//go:build !linux

package udpnat

import (
	"io"
	"syscall"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// upConn is an entry's upstream socket.
type upConn interface {
	io.ReadWriteCloser
	SyscallConn() (syscall.RawConn, error)
}

// upSock is an entry's upstream socket where there is no poller of the
// relay's own: a *net.UDPConn, and a goroutine per entry reads it.
type upSock struct {
	conn upConn
	rc   syscall.RawConn

	// The entry goroutine's scratch for reading and replying.
	out    []byte
	rerr   error
	serr   error
	readFn func(uintptr) bool
	sendFn func(uintptr) bool
	burst  burst
}

// poller is unused where each entry has a goroutine.
type poller struct{}

func (*poller) close() {}

func (e *entry) closeSock() { e.conn.Close() }

// wake makes the entry's goroutine see that it ended.
func (e *entry) wake() { e.conn.Close() }

// start starts relaying the new entry's replies.
func (r *Relay) start(e *entry) error {
	go e.run()
	return nil
}

// run relays the upstream's replies to the client until the entry ends.
func (e *entry) run() {
	defer e.r.wg.Done()
	defer e.r.state.ConnDone()
	e.readReplies()
	if e.rerr != nil && isRefused(e.rerr) {
		e.refused(e.rerr)
	}
	reason := streamstate.ReasonUpstreamError
	if e.pending.Load() < 0 {
		reason = streamstate.ReasonResponsesDone // every expected reply came
	}
	e.end(reason)
	e.cfg.Policy.End(e.ss, reason)
}

// startSweep starts the goroutine that ends idle entries: here no poller
// of the relay's own keeps their deadlines.
func (r *Relay) startSweep() {
	r.wg.Add(1)
	go r.sweep()
}

// sweep evicts idle entries until the relay is destructed.
func (r *Relay) sweep() {
	defer r.wg.Done()
	every := time.Second
	t := time.NewTimer(every)
	defer t.Stop()
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now().UnixNano()
		r.entries.Range(func(_, v any) bool {
			e := v.(*entry)
			if now-e.last.Load() >= int64(e.cfg.idle) {
				e.end(streamstate.ReasonIdleTimeout)
			}
			return true
		})
		// Check four times per idle timeout, at most once a second.
		every = time.Second
		if p := r.cfg.Load(); p != nil {
			every = min(every, max(p.idle/4, 50*time.Millisecond))
		}
		t.Reset(every)
	}
}
