package l4aegisproxy

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// copyBufSize is the buffer of the userspace copy (rate limits, TLS).
const copyBufSize = 32 << 10

// bulkBufSize is the buffer a userspace copy moves to while a transfer is
// bulk (a read fills the small buffer): each step then reads and writes
// eight full TLS records at once, a quarter of the system calls and
// deadline updates per byte, which costs some 8% less CPU per byte
// on a TLS download. The copy goes back to the small buffer at the first
// read that the small one would have held, so a connection that goes idle
// holds copyBufSize, not this.
const bulkBufSize = 128 << 10

var (
	copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
	bulkBufs = sync.Pool{New: func() any { b := make([]byte, bulkBufSize); return &b }}
)

// idlePoll is how often a direction that found the connection idle looks
// again while it waits for the other direction to agree.
const idlePoll = 50 * time.Millisecond

const (
	dirUp   = 0 // client → upstream
	dirDown = 1 // upstream → client
)

// relay moves bytes both ways between a client and an upstream. With
// half set, one side's end is passed on to the other side and the
// relay runs until both directions end; otherwise the first end (a read of
// EOF) ends both directions: the guard's slot is freed, the other direction
// writes out what it has already read and stops, and the caller closes
// both sides. With raw set, both conns are raw *net.TCPConn and the
// relay drives the sockets itself: small transfers are read and written,
// bulk ones spliced by the kernel, and bytes are counted at every step, so
// counters move during a long transfer. Otherwise it copies through the
// client's wrapper (rate limits, TLS), which counts.
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
	raw    bool                 // both sides are raw *net.TCPConn
	half   bool                 // pass one side's end on instead of ending both
	idle   time.Duration
	client net.Conn
	up     net.Conn

	last  [2]atomic.Int64 // unix nanoseconds of the last byte per direction
	votes atomic.Uint32   // bit per direction: timed out with nothing to move
	done  atomic.Uint32   // bit per direction: ended
	wg    sync.WaitGroup
	dirs  [2]rawDir
}

// relays recycles relays, whose raw directions keep their bound callbacks.
var relays = sync.Pool{New: func() any {
	r := new(relay)
	r.dirs[dirUp].bind(r, dirUp)
	r.dirs[dirDown].bind(r, dirDown)
	return r
}}

// getRelay returns a relay ready for a new connection.
func getRelay(ss *streamstate.Session, client, up net.Conn) *relay {
	r := relays.Get().(*relay)
	r.ss, r.client, r.up = ss, client, up
	r.count, r.raw, r.half, r.idle = false, false, false, 0
	r.votes.Store(0)
	r.done.Store(0)
	return r
}

// put returns the relay to the pool once both directions have ended.
func (r *relay) put() {
	r.ss, r.client, r.up = nil, nil, nil
	r.dirs[dirUp].release()
	r.dirs[dirDown].release()
	relays.Put(r)
}

func (r *relay) run() {
	now := time.Now().UnixNano()
	r.last[dirUp].Store(now)
	r.last[dirDown].Store(now)
	r.wg.Add(1)
	go r.runDown()
	r.pump(dirUp, r.up, r.client)
	r.wg.Wait()
}

func (r *relay) runDown() {
	defer r.wg.Done()
	r.pump(dirDown, r.client, r.up)
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
	if r.raw {
		r.pumpRaw(dir, dst, src)
	} else {
		r.pumpCopy(dir, dst, src)
	}
}

// pumpRaw moves one direction between raw TCP sockets: read/write for
// small transfers, splice(2) for bulk ones.
func (r *relay) pumpRaw(dir int, dst, src net.Conn) {
	d := &r.dirs[dir]
	if err := d.start(dst.(*net.TCPConn), src.(*net.TCPConn)); err != nil {
		r.abort(streamstate.ReasonNone)
		return
	}
	for {
		if r.idle > 0 {
			_ = src.SetReadDeadline(r.deadline())
		}
		if r.ended(dir) {
			return
		}
		n, writeErr, err := d.step()
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
// a wrapper (rate limits, TLS) that must see the bytes. A read that fills
// the buffer moves the copy to a bulk buffer, and a read that the small
// one would have held moves it back (bulkBufSize).
func (r *relay) pumpCopy(dir int, dst, src net.Conn) {
	small := copyBufs.Get().(*[]byte)
	defer copyBufs.Put(small)
	var bulk *[]byte
	defer func() {
		if bulk != nil {
			bulkBufs.Put(bulk)
		}
	}()
	buf := *small
	for {
		if r.idle > 0 {
			_ = src.SetReadDeadline(r.deadline())
		}
		if r.ended(dir) {
			return
		}
		nr, err := src.Read(buf)
		writeErr := false
		if nr > 0 {
			if werr := r.write(dir, dst, buf[:nr]); werr != nil {
				err, writeErr = werr, true
			}
		}
		if err != nil && r.stop(dir, dst, nr, writeErr, err) {
			return
		}
		switch {
		case bulk == nil && nr == len(buf):
			bulk = bulkBufs.Get().(*[]byte)
			buf = *bulk
		case bulk != nil && nr <= copyBufSize:
			bulkBufs.Put(bulk)
			bulk, buf = nil, *small
		}
	}
}

// deadlineWriter is what relay.write drives: a net.Conn, or one direction
// of the raw relay.
type deadlineWriter interface {
	Write([]byte) (int, error)
	SetWriteDeadline(time.Time) error
}

// write writes b to dst for direction dir, counting each part written. With
// an idle timeout, a write that makes no progress until its deadline asks
// whether the connection is idle, and gives up only then, as spliceStep
// does: a peer that stopped reading must not hold the connection forever.
func (r *relay) write(dir int, dst deadlineWriter, b []byte) error {
	for {
		if r.idle > 0 {
			_ = dst.SetWriteDeadline(r.deadline())
		}
		n, err := dst.Write(b)
		if n > 0 {
			b = b[n:]
			r.moved(dir, int64(n))
		}
		if err == nil || len(b) == 0 {
			return err
		}
		if r.idle > 0 && errors.Is(err, os.ErrDeadlineExceeded) && !r.voteIdle(dir) {
			continue // the peer is slow, but the connection is not idle
		}
		return err
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
	case !writeErr && r.ended(dir) && errors.Is(err, os.ErrDeadlineExceeded):
		// endBoth stopped the read: the other side has ended.
		return true
	case r.idle > 0 && errors.Is(err, os.ErrDeadlineExceeded):
		// A write that timed out has already been judged idle by write or
		// spliceStep.
		if !writeErr && (n > 0 || !r.voteIdle(dir)) {
			return false
		}
		r.abort(streamstate.ReasonIdleTimeout)
		return true
	case err == io.EOF && !writeErr:
		// This side finished sending: with half-close, pass the end on and
		// let the other direction run to its end; otherwise end both.
		if dir == dirUp {
			r.setReason(streamstate.ReasonClientClose)
		} else {
			r.setReason(streamstate.ReasonUpstreamClose)
		}
		if r.done.Or(1<<dir)|1<<dir == 3 {
			return true
		}
		if !r.half {
			r.endBoth(dst)
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
		if r.ss != nil {
			if srcIsClient {
				r.ss.SetFailure(streamstate.ReasonClientError, streamstate.ReasonClientClose)
			} else {
				r.ss.SetFailure(streamstate.ReasonUpstreamError, streamstate.ReasonUpstreamClose)
			}
		}
		r.abort(streamstate.ReasonNone)
		return true
	}
}

// aLongTimeAgo is a read deadline that has passed: a read waiting with it
// returns at once.
var aLongTimeAgo = time.Unix(1, 0)

// endBoth ends the connection after one side's end, without half-close.
// It frees the guard's slot first, so that a client which reconnects as
// soon as it sees the end finds it free, then stops the other direction,
// which reads from dst: its read returns at once, and ended keeps it from
// reading again. A write that direction has in progress goes on (bounded
// by the idle timeout), so the bytes it read still arrive; when it
// returns, the relay returns and its caller closes both sides.
func (r *relay) endBoth(dst net.Conn) {
	if r.ss != nil {
		r.ss.ReleaseSlot()
	}
	_ = dst.SetReadDeadline(aLongTimeAgo)
}

// ended reports whether, without half-close, the other direction has seen
// its side's end, which ends direction dir too. A direction checks it
// after setting its read deadline and before reading; endBoth records the
// end before it moves that deadline, so one of the two sees the other.
func (r *relay) ended(dir int) bool {
	return !r.half && r.done.Load()&(1<<(1-dir)) != 0
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
