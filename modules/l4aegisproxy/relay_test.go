package l4aegisproxy

import (
	"io"
	"net"
	"slices"
	"testing"
	"time"
)

// scriptConn is a connection whose reads return the sizes in reads, in
// turn, then EOF, and record the size of the buffer each was handed. Writes
// are taken whole.
type scriptConn struct {
	net.Conn // nil: the relay calls nothing else
	reads    []int
	bufs     []int
}

func (c *scriptConn) Read(p []byte) (int, error) {
	c.bufs = append(c.bufs, len(p))
	if len(c.reads) == 0 {
		return 0, io.EOF
	}
	n := min(c.reads[0], len(p))
	c.reads = c.reads[1:]
	return n, nil
}

func (c *scriptConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// The copy path reads a bulk transfer through the big buffer, and goes back
// to the small one at a read that it would have held, so an idle
// connection holds only the small one.
func TestCopyPathBufferFollowsTheTransfer(t *testing.T) {
	const small, bulk = copyBufSize, bulkBufSize
	up := &scriptConn{reads: []int{small, bulk, bulk, 1000, small, 100 << 10}}
	client := &scriptConn{}
	r := getRelay(nil, client, up)
	defer r.put()
	r.pumpCopy(dirDown, client, up)
	want := []int{small, bulk, bulk, bulk, small, bulk, bulk}
	if !slices.Equal(up.bufs, want) {
		t.Fatalf("buffer sizes per read %v, want %v", up.bufs, want)
	}
}
