package l4aegistls

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// errClientStalled replaces the timeout of a write to the client: a TLS
// connection whose write timed out is unusable, so the error must not look
// like a timeout worth retrying.
var errClientStalled = errors.New("tls: the client took no byte within the write deadline")

// Conn is the connection the handlers after aegis_tls see: the TLS
// connection to the client, with these changes to *tls.Conn.
//
// CloseWrite sends close_notify and then half-closes the socket below, so
// that a client which watches the socket rather than the TLS layer sees the
// end of the stream too; the client can still send, and its bytes are
// still read. (*tls.Conn.CloseWrite only sends close_notify.)
//
// Close closes the socket below without sending close_notify, and never
// waits: a relay closes the client this way when something went wrong,
// and close_notify would tell the client that the stream ended cleanly (and
// could block for seconds on a client that does not read). When the
// handlers after aegis_tls return without having closed the connection,
// aegis_tls sends close_notify itself.
//
// A write deadline is a bound on a write that makes no progress, at least
// the session's idle timeout: a write that the client keeps accepting,
// slowly, goes on. *tls.Conn cannot go on after a write timed out, so a
// timeout is final: Write then returns an error that is not a timeout and
// records the reason idle_timeout.
type Conn struct {
	*tls.Conn

	wire   *wire
	ss     *streamstate.Session // nil without the guard
	closed atomic.Bool
}

// maxRecord is the most plaintext one TLS record carries.
const maxRecord = 16 << 10

// Write writes to the client through TLS. A write that takes several
// records goes to the socket in one system call instead of one per record.
func (c *Conn) Write(p []byte) (int, error) {
	if len(p) <= maxRecord {
		return c.write(p)
	}
	c.wire.begin(len(p))
	n, err := c.write(p)
	if ferr := c.wire.flush(); ferr != nil && err == nil {
		n, err = 0, c.wireError(ferr)
	}
	return n, err
}

func (c *Conn) write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	return n, c.wireError(err)
}

// wireError turns a timed-out write, after which *tls.Conn is unusable,
// into a final error.
func (c *Conn) wireError(err error) error {
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		if c.ss != nil {
			c.ss.SetReason(streamstate.ReasonIdleTimeout)
		}
		return errClientStalled
	}
	return err
}

// SetDeadline sets the read deadline and the write deadline.
func (c *Conn) SetDeadline(t time.Time) error {
	err := c.Conn.SetReadDeadline(t)
	if werr := c.SetWriteDeadline(t); err == nil {
		err = werr
	}
	return err
}

// SetWriteDeadline bounds each write by the time until t (at least the
// session's idle timeout) without progress; the zero time removes the
// bound.
func (c *Conn) SetWriteDeadline(t time.Time) error {
	if t.IsZero() {
		c.wire.window.Store(0)
		return c.wire.Conn.SetWriteDeadline(time.Time{})
	}
	w := time.Until(t)
	if c.ss != nil {
		w = max(w, c.ss.IdleTimeout)
	}
	c.wire.window.Store(int64(max(w, time.Millisecond)))
	return nil
}

// CloseWrite ends the stream to the client: close_notify, then a
// half-close of the socket below when it supports one.
func (c *Conn) CloseWrite() error {
	err := c.Conn.CloseWrite()
	if cw, ok := c.wire.Conn.(interface{ CloseWrite() error }); ok {
		if werr := cw.CloseWrite(); err == nil {
			err = werr
		}
	}
	return err
}

// Close closes the connection below TLS at once, without close_notify.
func (c *Conn) Close() error {
	c.closed.Store(true)
	return c.wire.Conn.Close()
}

// finish sends close_notify unless the connection was closed: the handlers
// after aegis_tls ended the connection normally.
func (c *Conn) finish() {
	if !c.closed.Load() {
		c.wire.window.Store(0)  // *tls.Conn bounds close_notify by 5s itself
		_ = c.Conn.CloseWrite() // no-op when already sent
	}
}

// wire is the connection TLS runs over: the connection below (the guard's
// wrapper or the socket), with the bytes a layer4 matcher already read
// served first, and writes that time out only after a window without
// progress (0: deadlines as set on the connection below).
type wire struct {
	net.Conn
	pre    []byte
	window atomic.Int64 // nanoseconds

	// While a large write is in progress, the records TLS writes are
	// gathered in batch and written together by flush. mu guards batching
	// and batch; out keeps socket writes in the order TLS made them.
	mu       sync.Mutex
	out      sync.Mutex
	batching bool
	batch    *[]byte
}

// recordOverhead is more than the bytes a record adds to its plaintext
// (header, explicit nonce, tag), so that a batch sized by it holds the
// records of a write without growing.
const recordOverhead = 64

// maxBatch is the largest batch kept for reuse: the records of a write of
// the relay's bulk buffer (l4aegisproxy's bulkBufSize, 128 KiB) fit, with
// room to spare.
const maxBatch = 16*maxRecord + 16*recordOverhead

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, 2*(maxRecord+recordOverhead)); return &b }}

// begin gathers the records written from now on, for a write of n bytes.
func (w *wire) begin(n int) {
	b := batchPool.Get().(*[]byte)
	if need := n + (n/maxRecord+1)*recordOverhead; cap(*b) < need {
		*b = make([]byte, 0, need)
	}
	*b = (*b)[:0]
	w.mu.Lock()
	w.batching = true
	w.batch = b
	w.mu.Unlock()
}

// flush writes the gathered records in one write and stops gathering.
func (w *wire) flush() error {
	w.mu.Lock()
	b := w.batch
	w.batching, w.batch = false, nil
	w.out.Lock() // before mu is released: no later record can overtake
	w.mu.Unlock()
	defer w.out.Unlock()
	var err error
	if len(*b) > 0 {
		_, err = w.send(*b)
	}
	if cap(*b) <= maxBatch {
		batchPool.Put(b)
	}
	return err
}

func (w *wire) Read(p []byte) (int, error) {
	if len(w.pre) > 0 {
		n := copy(p, w.pre)
		w.pre = w.pre[n:]
		return n, nil
	}
	return w.Conn.Read(p)
}

func (w *wire) Write(p []byte) (int, error) {
	w.mu.Lock()
	if w.batching {
		*w.batch = append(*w.batch, p...)
		w.mu.Unlock()
		return len(p), nil
	}
	w.out.Lock()
	w.mu.Unlock()
	defer w.out.Unlock()
	return w.send(p)
}

// send writes p to the connection below, bounded by the write window.
func (w *wire) send(p []byte) (int, error) {
	win := time.Duration(w.window.Load())
	if win <= 0 {
		return w.Conn.Write(p)
	}
	var written int
	for {
		_ = w.Conn.SetWriteDeadline(time.Now().Add(win))
		n, err := w.Conn.Write(p[written:])
		written += n
		if err != nil && n > 0 && written < len(p) && errors.Is(err, os.ErrDeadlineExceeded) {
			continue // the client is slow, not stalled
		}
		return written, err
	}
}
