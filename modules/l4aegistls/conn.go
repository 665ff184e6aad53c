package l4aegistls

import (
	"crypto/tls"
	"errors"
	"net"
	"os"
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

// Write writes to the client through TLS.
func (c *Conn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	if err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		if c.ss != nil {
			c.ss.SetReason(streamstate.ReasonIdleTimeout)
		}
		err = errClientStalled
	}
	return n, err
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
