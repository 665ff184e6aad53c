package streamstate

import (
	"errors"
	"net"
	"os"
	"time"
)

// Conn is the wrapper that the guard handler puts around an accepted
// connection. Reads are client→upstream bytes and writes upstream→client
// bytes: it counts them, applies the per-connection rate limits and, unless
// the relay took it over, the idle timeout. CloseWrite passes through, so
// half-close keeps working behind it.
//
// Policy.Wrap makes it. A relay that the session allows the raw path
// (Session.RawPath) bypasses it to splice between the raw sockets, and
// counts through the session instead.
type Conn struct {
	net.Conn
	S *Session

	up, down *Bucket // nil: unlimited

	// remote and local, when set, are the addresses a PROXY header gave
	// (SetProxyAddrs); the connection's own otherwise.
	remote, local net.Addr
}

// SetProxyAddrs makes the connection report the client's addresses from a
// PROXY header as its remote and local ones, so that whatever comes after
// the guard (TLS, the PROXY header sent upstream) sees the real client.
// An invalid address keeps the connection's own.
func (c *Conn) SetProxyAddrs(a ProxyAddrs) {
	if a.Source.IsValid() {
		c.remote = net.TCPAddrFromAddrPort(a.Source)
	}
	if a.Dest.IsValid() {
		c.local = net.TCPAddrFromAddrPort(a.Dest)
	}
}

// RemoteAddr is the client's address: the PROXY header's, if one gave it.
func (c *Conn) RemoteAddr() net.Addr {
	if c.remote != nil {
		return c.remote
	}
	return c.Conn.RemoteAddr()
}

// LocalAddr is the address the client connected to: the PROXY header's,
// if one gave it.
func (c *Conn) LocalAddr() net.Addr {
	if c.local != nil {
		return c.local
	}
	return c.Conn.LocalAddr()
}

// newConn wraps c for session ss with the given rate buckets (nil:
// unlimited), and makes it the session's wrapper.
func newConn(c net.Conn, ss *Session, up, down *Bucket) *Conn {
	cc := &Conn{Conn: c, S: ss, up: up, down: down}
	ss.conn = cc
	ss.touch()
	return cc
}

// limited reports whether a rate limit applies in either direction.
func (c *Conn) limited() bool { return c.up != nil || c.down != nil }

// Read reads client bytes, counting and limiting them.
func (c *Conn) Read(p []byte) (int, error) {
	if c.up != nil && len(p) > c.up.Size() {
		p = p[:c.up.Size()]
	}
	idle := c.S.IdleTimeout
	if c.S.idleTaken.Load() {
		idle = 0
	}
	for {
		if idle > 0 {
			_ = c.Conn.SetReadDeadline(time.Unix(0, c.S.lastActive.Load()).Add(idle))
		}
		n, err := c.Conn.Read(p)
		if n > 0 {
			c.S.touch()
			if c.up != nil {
				if werr := c.up.Wait(c.S.State.ctx, n); werr != nil && err == nil {
					err = net.ErrClosed
				}
			}
			c.S.AddSent(int64(n))
			return n, err
		}
		if idle > 0 && errors.Is(err, os.ErrDeadlineExceeded) {
			if time.Since(time.Unix(0, c.S.lastActive.Load())) < idle {
				continue // the other direction moved bytes meanwhile
			}
			c.S.SetReason(ReasonIdleTimeout)
		}
		return n, err
	}
}

// Write writes upstream bytes to the client, counting and limiting them.
func (c *Conn) Write(p []byte) (int, error) {
	if c.down == nil {
		n, err := c.Conn.Write(p)
		if n > 0 {
			c.S.touch()
			c.S.AddReceived(int64(n))
		}
		return n, err
	}
	var written int
	for len(p) > 0 {
		chunk := min(len(p), c.down.Size())
		if err := c.down.Wait(c.S.State.ctx, chunk); err != nil {
			return written, net.ErrClosed
		}
		n, err := c.Conn.Write(p[:chunk])
		written += n
		if n > 0 {
			c.S.touch()
			c.S.AddReceived(int64(n))
		}
		if err != nil {
			return written, err
		}
		p = p[chunk:]
	}
	return written, nil
}

// CloseWrite shuts the write half of the client connection.
func (c *Conn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
