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

// Bits of relay.done beside one per direction.
const (
	parkBit  = 1 << 2 // both directions stop at a step boundary to park
	abortBit = 1 << 3 // abort closed both sides
)

// parkDelay is how long both directions of a relay that may park must have
// moved nothing before it parks the connection (park_linux.go). A quarter
// of a second is far above the gaps within an exchange (a query and its
// answer, a handshake's round trips), so a busy connection does not park
// between them, while a connection quiet that long (a pooled database
// connection, an MQTT client between keepalives, an idle SSH session)
// mostly stays quiet for far longer; one that does not pays a park and a
// resume, four epoll_ctl calls, a wake of the parker and two new
// goroutines, some microseconds. It is short for memory: until it parks,
// a connection holds two goroutine stacks, and a burst of new connections
// that all go quiet leaves the stacks of those not yet parked in the
// process's resident memory, which Go gives back to the system only
// slowly (RSS per connection measured 1 s after a burst of 2,000 that
// each made one round trip: 14.7 KB with 1 s, 12.5 KB with 500 ms, 8.7 KB
// with 250 ms, 6.5 KB with 100 ms, 16 KB without parking; of 4,500: 12.4,
// 7.5, 5.1, 4.6 KB, 15.6 KB without). A variable for tests.
var parkDelay = 250 * time.Millisecond

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
//
// Parking: on the raw path, when the session allows it (CanDetach: the
// streams app, not a plain layer4 server), a connection on which nothing
// moved either way for parkDelay is parked: each direction stops at a
// step boundary (holding no buffer or pipe), the sockets are handed to the
// parker's epoll, the relay goes back to its pool and both goroutines
// return, the chain's all the way up without ending the connection
// (Session.Detach). A readable socket resumes both directions on a new
// goroutine (parkedConn.resume). The end of a connection that parked is
// finish, which runs what the handlers would have run (Session.Finish).
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
	done  atomic.Uint32   // bit per direction: ended; parkBit, abortBit
	wg    sync.WaitGroup
	dirs  [2]rawDir

	// canPark: the relay may park the connection (raw, counted, and the
	// session may be detached). quiet has a bit per direction that waits
	// in a read after finding nothing to move for parkDelay.
	canPark bool
	quiet   atomic.Uint32
	pc      *parkedConn // the connection's park record, once it parked
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
	r.count, r.raw, r.half, r.idle, r.canPark = false, false, false, 0, false
	r.votes.Store(0)
	r.done.Store(0)
	r.quiet.Store(0)
	return r
}

// put returns the relay to the pool once both directions have ended.
func (r *relay) put() {
	r.ss, r.client, r.up, r.pc = nil, nil, nil, nil
	r.dirs[dirUp].release()
	r.dirs[dirDown].release()
	relays.Put(r)
}

// run relays on the caller's goroutine and one more until the connection
// ends, or until it parks (reported true, only with canPark): the
// connection is detached then, its parkedConn holds what it needs, and the
// caller must not touch the connection again. Either way the caller puts
// the relay back.
func (r *relay) run() (parked bool) {
	now := time.Now().UnixNano()
	r.last[dirUp].Store(now)
	r.last[dirDown].Store(now)
	return r.serve()
}

// serve runs the directions that have not ended, until the relay ends
// (false) or parks (true; only with canPark).
func (r *relay) serve() bool {
	for {
		switch r.done.Load() & 3 { // with half-close, one may have ended before a park
		case 0:
			r.wg.Add(1)
			go r.runDown()
			r.pump(dirUp, r.up, r.client)
			r.wg.Wait()
		case 1 << dirUp:
			r.pump(dirDown, r.client, r.up)
		case 1 << dirDown:
			r.pump(dirUp, r.up, r.client)
		}
		d := r.done.Load()
		if d&parkBit == 0 || d&abortBit != 0 || d&3 == 3 || !r.half && d&3 != 0 {
			return false
		}
		if r.park() {
			return true
		}
		if r.ss.Closed() {
			return false
		}
		// No parker (no epoll here): relay on as before, without parking.
		r.canPark = false
		r.done.And(^uint32(parkBit))
		_ = r.client.SetReadDeadline(time.Time{})
		_ = r.up.SetReadDeadline(time.Time{})
	}
}

// relayDetached relays a parked connection again (parkedConn.resume), on
// the parker's new goroutine and one more, until it ends or parks again:
// the relay goes back to its pool then, and the connection's parkedConn
// holds what it needs.
func (r *relay) relayDetached() {
	if r.serve() {
		r.put()
		return
	}
	r.finish()
}

// finish ends a relay resumed from a park, whose handlers have returned: it
// closes the upstream, as aegis_proxy's Handle would, and the session does
// the rest (Session.Finish: the guard's end, closing the client, the
// caller's end). The relay goes back to its pool.
func (r *relay) finish() {
	ss, up := r.ss, r.up
	r.put()
	up.Close()
	ss.Finish()
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
	r.done.Or(abortBit)
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
	if !d.started() { // a resumed direction is started already
		if err := d.start(dst.(*net.TCPConn), src.(*net.TCPConn)); err != nil {
			r.abort(streamstate.ReasonNone)
			return
		}
	}
	// armed: without an idle timeout, src has the park deadline (or none,
	// once quiet); it is set again only after it fired.
	armed := false
	for {
		if r.idle > 0 {
			_ = src.SetReadDeadline(r.readDeadline(d.quiet))
		} else if r.canPark && !armed {
			_ = src.SetReadDeadline(r.parkDeadline(d.quiet))
			armed = true
		}
		if r.ended(dir) {
			return
		}
		n, writeErr, err := d.step()
		if err == nil {
			if n > 0 {
				if d.quiet {
					d.quiet, armed = false, false
					r.quiet.And(^uint32(1 << dir))
				}
				continue
			}
			err = io.EOF
		}
		if r.canPark && !writeErr && errors.Is(err, os.ErrDeadlineExceeded) && !r.ended(dir) {
			armed = false
			since := time.Duration(time.Now().UnixNano() - max(r.last[dirUp].Load(), r.last[dirDown].Load()))
			if since >= parkDelay && (r.idle == 0 || since < r.idle) {
				d.quiet = true
				if r.votePark(dir) {
					return
				}
				continue
			}
			if r.idle == 0 || since < r.idle {
				continue // the park deadline of bytes that moved since
			}
		}
		if r.stop(dir, dst, n, writeErr, err) {
			return
		}
	}
}

// votePark records that direction dir found nothing to move for
// parkDelay and waits in a read. It reports whether the connection parks:
// the other direction waits so too, or has ended (half-close). The first
// to find so sets parkBit and moves the other's read deadline, as endBoth
// does, so that it stops at its next step boundary.
func (r *relay) votePark(dir int) bool {
	q := r.quiet.Or(1<<dir) | 1<<dir
	if (q|r.done.Load())&3 != 3 {
		return false
	}
	if r.done.Or(parkBit)&parkBit == 0 {
		other := r.up // what the other direction reads
		if dir == dirDown {
			other = r.client
		}
		_ = other.SetReadDeadline(aLongTimeAgo)
	}
	return true
}

// parkDeadline is the read deadline of a direction without an idle
// timeout: parkDelay after the last byte either way, or none once the
// direction is quiet (it waits for bytes or for the other direction).
func (r *relay) parkDeadline(quiet bool) time.Time {
	if quiet {
		return time.Time{}
	}
	last := max(r.last[dirUp].Load(), r.last[dirDown].Load())
	d := time.Unix(0, last).Add(parkDelay)
	if now := time.Now(); !d.After(now) {
		d = now.Add(idlePoll) // a resumed relay reads what woke it first
	}
	return d
}

// readDeadline is the read deadline of a direction with an idle timeout:
// the idle deadline, or the park deadline if the relay may park and that
// comes first.
func (r *relay) readDeadline(quiet bool) time.Time {
	if !r.canPark || quiet || parkDelay >= r.idle {
		return r.deadline()
	}
	return r.parkDeadline(false)
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
		// With half-close the connection goes on, so the end is its
		// reason only if nothing cuts it later (Session.SetHalfClose).
		reason := streamstate.ReasonClientClose
		if dir == dirDown {
			reason = streamstate.ReasonUpstreamClose
		}
		if !r.half {
			r.setReason(reason)
		} else if r.ss != nil {
			r.ss.SetHalfClose(reason)
		}
		if (r.done.Or(1<<dir)|1<<dir)&3 == 3 {
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
// its side's end, which ends direction dir too, or whether the relay parks.
// A direction checks it after setting its read deadline and before
// reading; endBoth and votePark record the end before they move that
// deadline, so one of the two sees the other.
func (r *relay) ended(dir int) bool {
	d := r.done.Load()
	return d&parkBit != 0 || !r.half && d&(1<<(1-dir)) != 0
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
