package l4aegisproxy

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// pipeSize is the pipe buffer: the most one splice call moves.
const pipeSize = 1 << 20

// canSplice is true where splice(2) moves bytes between sockets.
const canSplice = true

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// pipe is a kernel pipe that splice moves bytes through. One is taken from
// the pool only while bytes are in flight, so idle connections hold no
// pipe descriptors.
type pipe struct {
	r, w    int
	cleanup runtime.Cleanup
}

var pipes = sync.Pool{New: func() any {
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil
	}
	// A larger pipe lets one splice call move more; the kernel may refuse
	// it (pipe-max-size), which only costs more calls.
	_, _ = unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	p := &pipe{r: fds[0], w: fds[1]}
	p.cleanup = runtime.AddCleanup(p, closePipe, fds)
	return p
}}

func closePipe(fds [2]int) {
	unix.Close(fds[0])
	unix.Close(fds[1])
}

// discard closes a pipe that may still hold bytes.
func (p *pipe) discard() {
	p.cleanup.Stop()
	closePipe([2]int{p.r, p.w})
}

var errNoPipe = errors.New("splice: cannot create a pipe")

// spliceStep waits until src has bytes, then moves what it has (up to the
// pipe's size) to dst through a pipe, counting each part written. It
// returns the bytes moved, and (0, nil) at EOF. The read deadline on src
// ends the wait with os.ErrDeadlineExceeded. With an idle timeout, a write
// that makes no progress until its deadline asks the relay whether the
// connection is idle, and gives up only then; writeErr says whether the
// error came from writing to dst.
func (r *relay) spliceStep(dir int, src, dst syscall.RawConn, dstConn interface{ SetWriteDeadline(time.Time) error }) (n int, writeErr bool, err error) {
	var (
		p    *pipe
		serr error
	)
	err = src.Read(func(fd uintptr) bool {
		if p == nil {
			if p, _ = pipes.Get().(*pipe); p == nil {
				serr = errNoPipe
				return true
			}
		}
		for {
			var moved int64
			moved, serr = unix.Splice(int(fd), nil, p.w, nil, pipeSize, spliceFlags)
			n = int(moved)
			if serr != unix.EINTR {
				break
			}
		}
		if serr == unix.EAGAIN {
			// Nothing to read: wait without holding the pipe.
			pipes.Put(p)
			p = nil
			return false
		}
		return true
	})
	if err == nil {
		err = serr
	}
	if err != nil || n <= 0 {
		if p != nil {
			pipes.Put(p) // empty: nothing was moved into it
		}
		return 0, false, err
	}

	for inPipe := n; inPipe > 0; {
		if r.idle > 0 {
			_ = dstConn.SetWriteDeadline(r.deadline())
		}
		var (
			m    int
			werr error
		)
		err = dst.Write(func(fd uintptr) bool {
			for {
				var moved int64
				moved, werr = unix.Splice(p.r, nil, int(fd), nil, inPipe, spliceFlags)
				m = int(moved)
				if werr != unix.EINTR {
					break
				}
			}
			return werr != unix.EAGAIN
		})
		if err == nil {
			err = werr
		}
		if m > 0 {
			inPipe -= m
			r.moved(dir, int64(m))
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !r.voteIdle(dir) {
				continue // the peer is slow, but the connection is not idle
			}
			p.discard()
			return n - inPipe, true, err
		}
	}
	pipes.Put(p)
	return n, false, nil
}
