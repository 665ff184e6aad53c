//go:build !linux

package l4aegisproxy

import (
	"errors"
	"net"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// Direct is the event loop's way to serve a stream; there is none here.
type Direct struct{}

// NewDirect returns nil here: the chain serves every connection.
func NewDirect(*streamstate.Policy, *streamstate.State, *Handler) *Direct { return nil }

// Accepter is not used here.
type Accepter struct{}

// Accepted is not used here.
type Accepted struct{}

// NewAccepter fails here.
func NewAccepter(*net.TCPListener) (*Accepter, error) { return nil, errors.ErrUnsupported }

// Close is not used here.
func (*Accepter) Close() error { return nil }

// Run is not used here.
func (*Accepter) Run(func([]Accepted) bool) error { return errors.ErrUnsupported }

// Close is not used here.
func (Accepted) Close() {}

// Conn is not used here.
func (Accepted) Conn() (net.Conn, error) { return nil, errors.ErrUnsupported }

// Serve is not used here.
func (*Direct) Serve(*Accepter, Accepted, func()) {}

// LoopConns is 0 here.
func LoopConns() int { return 0 }
