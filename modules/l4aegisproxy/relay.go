package l4aegisproxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// copyBufSize is the buffer of the userspace copy (rate limits, TLS).
const copyBufSize = 32 << 10

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

// idlePoll is how often a direction that found the connection idle looks
// again while it waits for the other direction to agree.
const idlePoll = 50 * time.Millisecond

const (
	dirUp   = 0 // client → upstream
	dirDown = 1 // upstream → client
)

// relay moves bytes both ways between a client and an upstream until both
// directions end. With splice set, both conns are raw *net.TCPConn and the
// kernel moves the bytes (counted at every splice call, so counters move
// during a long transfer); otherwise a pooled buffer does.
//
// Idle timeout: each direction reads with a deadline at the last activity
// of either direction plus the idle timeout. A direction that times out
// without a byte votes "idle"; the connection is idle only when both
// directions have voted (or ended) with no byte since, so a slow transfer
// one way is never cut while the other way is quiet. A write that makes no
// progress for the idle timeout votes too, so a peer that stopped reading
// does not hold the connection forever.
type relay struct {
	ss     *streamstate.Session // nil without the guard
	count  bool                 // count bytes into ss (the guard's wrapper is bypassed)
	splice bool
	idle   time.Duration
	client net.Conn
	up     net.Conn

	last  [2]atomic.Int64 // unix nanoseconds of the last byte per direction
	votes atomic.Uint32   // bit per direction: timed out with nothing to move
	done  atomic.Uint32   // bit per direction: ended
	wg    sync.WaitGroup
}

func (r *relay) run() {
	now := time.Now().UnixNano()
	r.last[dirUp].Store(now)
	r.last[dirDown].Store(now)
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		r.pump(dirDown, r.client, r.up)
	}()
	r.pump(dirUp, r.up, r.client)
	r.wg.Wait()
}

func (r *relay) setReason(reason streamstate.Reason) {
	if r.ss != nil {
		r.ss.SetReason(reason)
	}
}

// abort ends both directions at once.
func (r *relay) abort(reason streamstate.Reason) {
	r.setReason(reason)
	r.client.Close()
	r.up.Close()
}

func (r *relay) pump(dir int, dst, src net.Conn) {
	if r.splice {
		r.pumpSplice(dir, dst, src)
	} else {
		r.pumpCopy(dir, dst, src)
	}
}

// pumpSplice moves one direction with splice(2) between raw TCP sockets.
func (r *relay) pumpSplice(dir int, dst, src net.Conn) {
	srcRC, err1 := src.(syscall.Conn).SyscallConn()
	dstRC, err2 := dst.(syscall.Conn).SyscallConn()
	if err1 != nil || err2 != nil {
		r.abort(streamstate.ReasonNone)
		return
	}
	for {
		if r.idle > 0 {
			_ = src.SetReadDeadline(r.deadline())
		}
		n, writeErr, err := r.spliceStep(dir, srcRC, dstRC, dst)
		if err == nil {
			if n > 0 {
				continue
			}
			err = io.EOF
		}
		if r.stop(dir, dst, n, writeErr, err) {
			return
		}
	}
}

// pumpCopy moves one direction through a pooled buffer: the client side is
// a wrapper (rate limits, TLS) that must see the bytes.
func (r *relay) pumpCopy(dir int, dst, src net.Conn) {
	buf := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(buf)
	for {
		if r.idle > 0 {
			_ = src.SetReadDeadline(r.deadline())
		}
		nr, err := src.Read(*buf)
		writeErr := false
		if nr > 0 {
			nw, werr := dst.Write((*buf)[:nr])
			if nw > 0 {
				r.moved(dir, int64(nw))
			}
			if werr != nil {
				err, writeErr = werr, true
			}
		}
		if err != nil && r.stop(dir, dst, nr, writeErr, err) {
			return
		}
	}
}

// moved records n bytes moved in direction dir.
func (r *relay) moved(dir int, n int64) {
	r.last[dir].Store(time.Now().UnixNano())
	r.votes.Store(0)
	if r.count {
		if dir == dirUp {
			r.ss.AddSent(n)
		} else {
			r.ss.AddReceived(n)
		}
	}
}

// stop handles the error that ended one step of direction dir and reports
// whether the direction is over.
func (r *relay) stop(dir int, dst net.Conn, n int, writeErr bool, err error) bool {
	switch {
	case r.idle > 0 && errors.Is(err, os.ErrDeadlineExceeded):
		// A write that timed out has already been judged idle by spliceStep.
		if !writeErr && (n > 0 || !r.voteIdle(dir)) {
			return false
		}
		r.abort(streamstate.ReasonIdleTimeout)
		return true
	case err == io.EOF && !writeErr:
		// This side finished sending: pass the half-close on and let the
		// other direction run to its end.
		if dir == dirUp {
			r.setReason(streamstate.ReasonClientClose)
		} else {
			r.setReason(streamstate.ReasonUpstreamClose)
		}
		if r.done.Or(1<<dir)|1<<dir == 3 {
			return true
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); !ok || cw.CloseWrite() != nil {
			r.abort(streamstate.ReasonNone)
		}
		return true
	default:
		// A read error is the source side's, a write error the
		// destination's.
		srcIsClient := dir == dirUp
		if writeErr {
			srcIsClient = !srcIsClient
		}
		if srcIsClient {
			r.abort(streamstate.ReasonClientError)
		} else {
			r.abort(streamstate.ReasonUpstreamError)
		}
		return true
	}
}

// deadline is when a read must return for the idle check: the last byte of
// either direction plus the idle timeout, or soon when that has passed.
func (r *relay) deadline() time.Time {
	last := max(r.last[dirUp].Load(), r.last[dirDown].Load())
	d := time.Unix(0, last).Add(r.idle)
	if now := time.Now(); !d.After(now) {
		d = now.Add(min(r.idle, idlePoll))
	}
	return d
}

// voteIdle records that direction dir found nothing to move up to its
// deadline. It reports whether the whole connection is idle: no byte either
// way for the idle timeout, and the other direction agrees or has ended.
func (r *relay) voteIdle(dir int) bool {
	last := max(r.last[dirUp].Load(), r.last[dirDown].Load())
	if time.Since(time.Unix(0, last)) < r.idle {
		return false
	}
	votes := r.votes.Or(1<<dir) | 1<<dir
	return (votes|r.done.Load())&3 == 3
}
