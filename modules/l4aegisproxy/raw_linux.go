package l4aegisproxy

import (
	"errors"
	"net"
	"os"
	"runtime"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// canRaw is true where the relay can move bytes between raw sockets itself:
// read/write for small transfers and splice(2) for bulk ones.
const canRaw = true

// pipeSize is the pipe buffer: the most one splice call moves.
const pipeSize = 1 << 20

// bulkStep is the size of a step from which the next step of the same
// direction splices: below it a plain read and write cost less than two
// splice calls through a pipe.
const bulkStep = 16 << 10

const spliceFlags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK

// pipe is a kernel pipe that splice moves bytes through.
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

// rawDir is one direction of a relay between two raw TCP sockets. A pipe or
// a buffer is taken from its pool only once the source has bytes and given
// back once they are written, so an idle connection holds neither.
type rawDir struct {
	r        *relay
	dir      int
	src, dst syscall.RawConn
	dstConn  *net.TCPConn
	bulk     bool

	// State of the step in progress, shared with the callbacks below,
	// which are bound once so that a step allocates nothing.
	pipe            *pipe
	buf             *[]byte
	n, inPipe       int
	err             error
	readFn, writeFn func(uintptr) bool
	spInFn, spOutFn func(uintptr) bool
	out             []byte
	wrote           int

	// quiet: the direction found nothing to move for parkDelay and waits
	// (relay.votePark). fd is the source's descriptor, read when parking.
	quiet bool
	fd    int32
	fdFn  func(uintptr)
}

// bind ties d to its relay and direction once, for the relay's whole life
// in the pool, so that its callbacks are allocated only then.
func (d *rawDir) bind(r *relay, dir int) {
	d.r, d.dir = r, dir
	d.readFn, d.writeFn = d.readCB, d.writeCB
	d.spInFn, d.spOutFn = d.spliceInCB, d.spliceOutCB
	d.fdFn = d.fdCB
}

// started reports whether start readied d for its connection.
func (d *rawDir) started() bool { return d.src != nil }

func (d *rawDir) fdCB(fd uintptr) { d.fd = int32(fd) }

// srcFD is the source's descriptor, or -1 if it is closed.
func (d *rawDir) srcFD() int32 {
	d.fd = -1
	if d.src.Control(d.fdFn) != nil {
		return -1
	}
	return d.fd
}

// start readies d to move bytes from src to dst.
func (d *rawDir) start(dst, src *net.TCPConn) error {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return err
	}
	d.src, d.dst, d.dstConn, d.bulk = srcRC, dstRC, dst, false
	return nil
}

// release drops d's references to the connection.
func (d *rawDir) release() {
	d.src, d.dst, d.dstConn, d.err = nil, nil, nil, nil
	d.quiet = false
}

// step waits until the source has bytes and moves what it has to the
// destination, counting each part written. It returns the bytes read, and
// (0, false, nil) at EOF. The read deadline on the source ends the wait
// with os.ErrDeadlineExceeded. With an idle timeout, a write that makes no
// progress until its deadline asks the relay whether the connection is
// idle and gives up only then; writeErr says the error came from writing.
func (d *rawDir) step() (n int, writeErr bool, err error) {
	if d.bulk {
		n, writeErr, err = d.spliceStep()
	} else {
		n, writeErr, err = d.copyStep()
	}
	d.bulk = n >= bulkStep
	return n, writeErr, err
}

func (d *rawDir) readCB(fd uintptr) bool {
	if d.buf == nil {
		d.buf = copyBufs.Get().(*[]byte)
	}
	for {
		d.n, d.err = rawRead(int(fd), *d.buf)
		if d.err != syscall.EINTR {
			break
		}
	}
	if d.err == syscall.EAGAIN {
		// Nothing to read: wait without holding the buffer.
		copyBufs.Put(d.buf)
		d.buf = nil
		return false
	}
	return true
}

func (d *rawDir) copyStep() (int, bool, error) {
	d.n, d.err = 0, nil
	err := d.src.Read(d.readFn)
	if err == nil {
		err = d.err
	}
	n := d.n
	if err != nil || n <= 0 {
		if d.buf != nil {
			copyBufs.Put(d.buf)
			d.buf = nil
		}
		return 0, false, err
	}
	werr := d.r.write(d.dir, d, (*d.buf)[:n])
	copyBufs.Put(d.buf)
	d.buf = nil
	return n, werr != nil, werr
}

func (d *rawDir) writeCB(fd uintptr) bool {
	for {
		d.wrote, d.err = rawWrite(int(fd), d.out)
		if d.err != unix.EINTR {
			break
		}
	}
	return d.err != unix.EAGAIN
}

// Write writes b to the destination with one raw write, waiting for the
// socket to take bytes. With SetWriteDeadline it lets relay.write drive the
// raw socket the way it drives a net.Conn.
func (d *rawDir) Write(b []byte) (int, error) {
	d.out, d.wrote, d.err = b, 0, nil
	err := d.dst.Write(d.writeFn)
	d.out = nil
	if err == nil {
		err = d.err
	}
	return d.wrote, err
}

// SetWriteDeadline sets the destination's write deadline.
func (d *rawDir) SetWriteDeadline(t time.Time) error { return d.dstConn.SetWriteDeadline(t) }

func (d *rawDir) spliceInCB(fd uintptr) bool {
	if d.pipe == nil {
		if d.pipe, _ = pipes.Get().(*pipe); d.pipe == nil {
			d.err = errNoPipe
			return true
		}
	}
	for {
		d.n, d.err = rawSplice(int(fd), d.pipe.w, pipeSize)
		if d.err != unix.EINTR {
			break
		}
	}
	if d.err == unix.EAGAIN {
		// Nothing to read: wait without holding the pipe.
		pipes.Put(d.pipe)
		d.pipe = nil
		return false
	}
	return true
}

func (d *rawDir) spliceOutCB(fd uintptr) bool {
	for {
		d.wrote, d.err = rawSplice(d.pipe.r, int(fd), d.inPipe)
		if d.err != unix.EINTR {
			break
		}
	}
	return d.err != unix.EAGAIN
}

func (d *rawDir) spliceStep() (int, bool, error) {
	d.n, d.err = 0, nil
	err := d.src.Read(d.spInFn)
	if err == nil {
		err = d.err
	}
	n := d.n
	if err != nil || n <= 0 {
		if d.pipe != nil {
			pipes.Put(d.pipe) // empty: nothing was moved into it
			d.pipe = nil
		}
		return 0, false, err
	}
	for d.inPipe = n; d.inPipe > 0; {
		if d.r.idle > 0 {
			_ = d.dstConn.SetWriteDeadline(d.r.deadline())
		}
		d.wrote, d.err = 0, nil
		err = d.dst.Write(d.spOutFn)
		if err == nil {
			err = d.err
		}
		if d.wrote > 0 {
			d.inPipe -= d.wrote
			d.r.moved(d.dir, int64(d.wrote))
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && !d.r.voteIdle(d.dir) {
				continue // the peer is slow, but the connection is not idle
			}
			d.pipe.discard()
			d.pipe = nil
			return n - d.inPipe, true, err
		}
	}
	pipes.Put(d.pipe)
	d.pipe = nil
	return n, false, nil
}

// KeepAliveControl turns SO_KEEPALIVE on for a socket before it connects or
// listens (accepted sockets inherit it from their listener), with the
// system's keepalive timings. It fits net.Dialer.Control and
// net.ListenConfig.Control. It is best effort: a socket that refuses it
// still works.
func KeepAliveControl(_, _ string, c syscall.RawConn) error {
	return c.Control(setKeepAlive)
}

// setKeepAlive captures nothing, so passing it allocates nothing.
func setKeepAlive(fd uintptr) {
	_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1)
}

// rawRead, rawWrite and rawSplice call the kernel without telling the Go
// scheduler (RawSyscall). The sockets and pipes are non-blocking, so a call
// cannot block; going through entersyscall/exitsyscall instead lets the
// scheduler hand the P to another thread during a long loopback write,
// which on one CPU only adds context switches.
func rawRead(fd int, b []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func rawWrite(fd int, b []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func rawSplice(in, out, max int) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_SPLICE, uintptr(in), 0, uintptr(out), 0, uintptr(max), spliceFlags)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
