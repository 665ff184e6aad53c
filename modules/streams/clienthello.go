package streams

import (
	"errors"
	"io"
	"strings"
)

// The TLS ClientHello reader of a port that streams share by server name
// (sni.go): it reads the client's first handshake message, at most
// maxHelloBytes, and finds the server_name extension. Its bytes go on to
// the stream picked, which terminates TLS or passes them through.

// maxHelloBytes bounds what is read of a ClientHello.
const maxHelloBytes = 16 << 10

// errNotTLS: the client's first bytes are not a TLS handshake record.
var errNotTLS = errors.New("not a TLS ClientHello")

// readClientHello reads the ClientHello from r and returns the server
// name it asks for ("" if none) and every byte read. On error the bytes
// read so far are returned too, for a stream that takes clients without
// TLS.
func readClientHello(r io.Reader) (name string, read []byte, err error) {
	buf := make([]byte, 0, 1024)
	var msg []byte // the handshake message, across records
	for {
		// A record: type, version, length, then the fragment. The type
		// is looked at as soon as a byte came: a client that is not TLS
		// (whose first message may be shorter than a record header) is
		// told apart at once, not after the read times out. A TLS
		// client's header comes whole, in one read.
		start := len(buf)
		buf = append(buf, make([]byte, 5)...)
		m, err := io.ReadAtLeast(r, buf[start:], 1)
		buf = buf[:start+m]
		if err != nil {
			return "", buf, err
		}
		if buf[start] != 22 {
			return "", buf, errNotTLS
		}
		if buf, err = readN(r, buf, 5-m); err != nil {
			return "", buf, err
		}
		hdr := buf[start:]
		if hdr[0] != 22 || hdr[1] != 3 { // handshake, TLS 1.x
			return "", buf, errNotTLS
		}
		n := int(hdr[3])<<8 | int(hdr[4])
		if n == 0 || len(buf)+n > maxHelloBytes {
			return "", buf, errNotTLS
		}
		if buf, err = readN(r, buf, n); err != nil {
			return "", buf, err
		}
		msg = append(msg, buf[len(buf)-n:]...)
		if len(msg) < 4 {
			continue
		}
		if msg[0] != 1 { // client_hello
			return "", buf, errNotTLS
		}
		need := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
		if len(msg) >= need {
			name, ok := serverName(msg[4:need])
			if !ok {
				return "", buf, errNotTLS
			}
			return name, buf, nil
		}
	}
}

// readN appends n bytes read from r to buf.
func readN(r io.Reader, buf []byte, n int) ([]byte, error) {
	start := len(buf)
	buf = append(buf, make([]byte, n)...)
	m, err := io.ReadFull(r, buf[start:])
	return buf[:start+m], err
}

// serverName parses a ClientHello body and returns its server name,
// lowercased ("" without one); ok is false if it is malformed.
func serverName(b []byte) (string, bool) {
	p := parser{b: b}
	p.skip(2 + 32)       // version, random
	p.skip(int(p.u8()))  // session id
	p.skip(int(p.u16())) // cipher suites
	p.skip(int(p.u8()))  // compression methods
	if p.bad || p.left() == 0 {
		return "", !p.bad // no extensions
	}
	exts := parser{b: p.bytes(int(p.u16()))}
	for !p.bad && !exts.bad && exts.left() > 0 {
		typ, body := exts.u16(), exts.bytes(int(exts.u16()))
		if exts.bad || typ != 0 { // server_name
			continue
		}
		list := parser{b: body}
		names := parser{b: list.bytes(int(list.u16()))}
		for !names.bad && names.left() > 0 {
			kind, name := names.u8(), names.bytes(int(names.u16()))
			if !names.bad && kind == 0 { // host_name
				return strings.ToLower(strings.TrimSuffix(string(name), ".")), !list.bad
			}
		}
		return "", !names.bad && !list.bad
	}
	return "", !p.bad && !exts.bad
}

// parser reads big-endian fields; any read past the end sets bad.
type parser struct {
	b   []byte
	bad bool
}

func (p *parser) left() int { return len(p.b) }

func (p *parser) bytes(n int) []byte {
	if p.bad || n > len(p.b) {
		p.bad = true
		return nil
	}
	out := p.b[:n]
	p.b = p.b[n:]
	return out
}

func (p *parser) skip(n int) { p.bytes(n) }

func (p *parser) u8() uint8 {
	b := p.bytes(1)
	if b == nil {
		return 0
	}
	return b[0]
}

func (p *parser) u16() uint16 {
	b := p.bytes(2)
	if b == nil {
		return 0
	}
	return uint16(b[0])<<8 | uint16(b[1])
}
