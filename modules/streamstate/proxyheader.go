package streamstate

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// ProxyAccept says whether a stream takes PROXY protocol headers (v1 or v2)
// from a front proxy (accept_proxy_protocol).
type ProxyAccept uint8

const (
	// ProxyOff reads no header: the connection's own address is the
	// client's.
	ProxyOff ProxyAccept = iota
	// ProxyOptional takes a header from a trusted source when there is
	// one.
	ProxyOptional
	// ProxyRequired needs a header on every connection (UDP: datagram),
	// which only a trusted source may send.
	ProxyRequired
)

var proxyAcceptNames = [...]string{ProxyOff: "off", ProxyOptional: "optional", ProxyRequired: "required"}

func (a ProxyAccept) String() string {
	if int(a) < len(proxyAcceptNames) {
		return proxyAcceptNames[a]
	}
	return "unknown"
}

// ParseProxyAccept reads an accept_proxy_protocol value: "off" (or ""),
// "optional" or "required".
func ParseProxyAccept(s string) (ProxyAccept, error) {
	switch s {
	case "", "off":
		return ProxyOff, nil
	case "optional":
		return ProxyOptional, nil
	case "required":
		return ProxyRequired, nil
	}
	return ProxyOff, fmt.Errorf("accept_proxy_protocol %q: must be off, optional or required", s)
}

// DefaultProxyHeaderTimeout is how long a connection from a front proxy
// has to send its whole PROXY header, when the stream sets no
// proxy_header_timeout.
const DefaultProxyHeaderTimeout = 5 * time.Second

const (
	// maxV1Header is the longest v1 header the protocol allows, CRLF
	// included.
	maxV1Header = 107
	// maxProxyHeader bounds a v2 header with its TLVs (16 + length).
	maxProxyHeader = 16 + 4096
)

var (
	sigV1 = []byte("PROXY ")
	sigV2 = proxyproto.SIGV2
)

// headerState is what the first bytes of a connection say about a PROXY
// header.
type headerState uint8

const (
	headerNone     headerState = iota // no header: the bytes are the client's
	headerMore                        // the start of a header: more bytes are needed
	headerComplete                    // a whole header of the returned length
	headerInvalid                     // a header start that cannot become a valid header
)

// headerLen looks at the first bytes b of a connection or datagram and
// says whether they start with a PROXY header and, when it is all there,
// its length. It does not check the header's contents (parseHeader does).
func headerLen(b []byte) (int, headerState) {
	if len(b) == 0 {
		return 0, headerMore
	}
	switch {
	case b[0] == sigV1[0]:
		if n := min(len(b), len(sigV1)); !bytes.Equal(b[:n], sigV1[:n]) {
			return 0, headerNone
		}
		if i := bytes.Index(b[:min(len(b), maxV1Header)], []byte("\r\n")); i >= 0 {
			return i + 2, headerComplete
		}
		if len(b) >= maxV1Header {
			return 0, headerInvalid
		}
		return 0, headerMore
	case b[0] == sigV2[0]:
		if n := min(len(b), len(sigV2)); !bytes.Equal(b[:n], sigV2[:n]) {
			return 0, headerNone
		}
		if len(b) < 16 {
			return 0, headerMore
		}
		n := 16 + int(binary.BigEndian.Uint16(b[14:16]))
		if n > maxProxyHeader {
			return 0, headerInvalid
		}
		if len(b) < n {
			return 0, headerMore
		}
		return n, headerComplete
	}
	return 0, headerNone
}

// ProxyAddrs are the addresses a PROXY header gives: the client's and the
// one it connected to. Both are invalid for a header that keeps the
// connection's own addresses (v2 LOCAL, v1 UNKNOWN).
type ProxyAddrs struct {
	Source, Dest netip.AddrPort
}

// headerParser reads one header out of a byte slice with go-proxyproto;
// parsers are pooled, so a header costs no buffer.
type headerParser struct {
	r  bytes.Reader
	br *bufio.Reader
}

var headerParsers = sync.Pool{New: func() any {
	p := new(headerParser)
	p.br = bufio.NewReaderSize(&p.r, maxProxyHeader)
	return p
}}

var errUnixHeader = errors.New("a PROXY header with unix socket addresses")

// parseHeader parses b, one whole header as headerLen measured it.
func parseHeader(b []byte) (ProxyAddrs, error) {
	p := headerParsers.Get().(*headerParser)
	p.r.Reset(b)
	p.br.Reset(&p.r)
	h, err := proxyproto.Read(p.br)
	p.r.Reset(nil)
	p.br.Reset(&p.r)
	headerParsers.Put(p)
	if err != nil {
		return ProxyAddrs{}, err
	}
	if h.Command.IsLocal() {
		return ProxyAddrs{}, nil
	}
	switch {
	case h.TransportProtocol.IsUnspec():
		return ProxyAddrs{}, nil // v1 UNKNOWN, v2 UNSPEC: the proxy's own
	case h.TransportProtocol.IsUnix():
		return ProxyAddrs{}, errUnixHeader
	}
	return ProxyAddrs{Source: addrPort(h.SourceAddr), Dest: addrPort(h.DestinationAddr)}, nil
}

func addrPort(a net.Addr) netip.AddrPort {
	var ap netip.AddrPort
	switch a := a.(type) {
	case *net.TCPAddr:
		ap = a.AddrPort()
	case *net.UDPAddr:
		ap = a.AddrPort()
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// ParseProxyHeader parses the PROXY header at the start of b (a datagram,
// or the first bytes of a connection). It returns the header's length and
// addresses; n is 0 when b does not start with a header, and err says
// why a header is malformed or incomplete.
func ParseProxyHeader(b []byte) (n int, addrs ProxyAddrs, err error) {
	n, st := headerLen(b)
	switch st {
	case headerNone:
		return 0, ProxyAddrs{}, nil
	case headerMore:
		return 0, ProxyAddrs{}, errors.New("an incomplete PROXY header")
	case headerInvalid:
		return 0, ProxyAddrs{}, errors.New("a PROXY header too long")
	}
	addrs, err = parseHeader(b[:n])
	if err != nil {
		return 0, ProxyAddrs{}, err
	}
	return n, addrs, nil
}

// trusts reports whether src may send a PROXY header.
func (p *Policy) trusts(src netip.Addr) bool { return p.trusted.contains(src.Unmap()) }

// AcceptsProxy reports whether the policy reads PROXY headers.
func (p *Policy) AcceptsProxy() bool { return p.ProxyAccept != ProxyOff }

// ProxyDatagram applies accept_proxy_protocol to datagram b from src on
// stream st. It returns how many bytes of b are the header to take off,
// and with parse the client's addresses from it (invalid: src is the
// client); without parse (the sender's NAT entry is open already) the
// header is only measured, which allocates nothing. ok is false when the
// datagram must be dropped: it is then counted and logged as a refusal of
// src, by reason.
func (p *Policy) ProxyDatagram(st *State, b []byte, src netip.AddrPort, parse bool) (n int, addrs ProxyAddrs, ok bool) {
	hn, st2 := headerLen(b)
	if !p.trusts(src.Addr()) {
		if p.ProxyAccept == ProxyRequired || st2 != headerNone {
			p.refuse(st, src, true, BlockProxyHeaderUntrusted)
			return 0, ProxyAddrs{}, false
		}
		return 0, ProxyAddrs{}, true
	}
	switch st2 {
	case headerNone:
		if p.ProxyAccept == ProxyRequired {
			p.refuse(st, src, true, BlockProxyHeaderMissing)
			return 0, ProxyAddrs{}, false
		}
		return 0, ProxyAddrs{}, true
	case headerComplete:
		if !parse {
			return hn, ProxyAddrs{}, true
		}
		if addrs, err := parseHeader(b[:hn]); err == nil {
			return hn, addrs, true
		}
	}
	p.refuse(st, src, true, BlockProxyHeaderInvalid)
	return 0, ProxyAddrs{}, false
}

// readProxyHeader is set by the platform's file: it reads the PROXY header
// a TCP connection starts with, consuming nothing after it.
var readProxyHeader func(c net.Conn, buf []byte) (n int, st headerState, err error)

var proxyBufs = sync.Pool{New: func() any { b := make([]byte, maxProxyHeader); return &b }}

// ProxyHeader applies accept_proxy_protocol to TCP connection c from src,
// before its admission: it reads the PROXY header a trusted source sends,
// within the header timeout, and consumes nothing after it. It returns the
// client's addresses from the header (invalid: src is the client). ok is
// false when the connection must be closed: it is counted and logged as
// a refusal of src, by reason (proxy_header_untrusted, _missing,
// _invalid).
//
// Optional: a trusted source's first bytes are looked at (waiting for
// them up to the timeout); an untrusted source is not read at all, so
// that a protocol whose server speaks first is not held up, and what it
// sends goes to the upstream as data, never believed.
func (p *Policy) ProxyHeader(st *State, c net.Conn, src netip.AddrPort) (addrs ProxyAddrs, ok bool) {
	if !p.trusts(src.Addr()) {
		if p.ProxyAccept == ProxyRequired {
			p.refuse(st, src, false, BlockProxyHeaderUntrusted)
			return ProxyAddrs{}, false
		}
		return ProxyAddrs{}, true
	}
	bp := proxyBufs.Get().(*[]byte)
	defer proxyBufs.Put(bp)
	_ = c.SetReadDeadline(time.Now().Add(p.ProxyHeaderTimeout))
	n, hs, err := readProxyHeader(c, *bp)
	_ = c.SetReadDeadline(time.Time{})
	reason := BlockProxyHeaderInvalid
	switch {
	case hs == headerComplete:
		if addrs, err = parseHeader((*bp)[:n]); err == nil {
			return addrs, true
		}
	case hs == headerNone && err == nil:
		if p.ProxyAccept == ProxyOptional {
			return ProxyAddrs{}, true
		}
		reason = BlockProxyHeaderMissing
	case n == 0:
		// Nothing came before the timeout or the end.
		if p.ProxyAccept == ProxyOptional && !errors.Is(err, errProxyUnsupported) {
			return ProxyAddrs{}, true
		}
		reason = BlockProxyHeaderMissing
		if errors.Is(err, errProxyUnsupported) {
			reason = BlockProxyHeaderInvalid
		}
	}
	p.refuse(st, src, false, reason)
	return ProxyAddrs{}, false
}

var errProxyUnsupported = errors.New("accept_proxy_protocol needs a socket connection")
