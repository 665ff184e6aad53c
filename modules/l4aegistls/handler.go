// Package l4aegistls is the layer4 handler `aegis_tls`: it terminates TLS
// for a stream with a certificate from a process-wide registry, which can
// be replaced at any time without touching listeners or established
// connections, or in a plain `layer4` config from Caddy's tls app by tag
// (cert_tag), and bounds the time and the number of handshakes in
// progress.
//
// Put it after aegis_guard and before aegis_proxy. The guard's wrapper sits
// below TLS, so the stream's byte counters and rate limits count wire
// bytes: TLS records, handshakes included. aegis_proxy relays through the
// TLS connection (its copy path; it splices only raw sockets).
package l4aegistls

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Defaults of the handler's settings.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultMaxHandshakes    = 1024
)

// Handler terminates TLS on a connection and runs the rest of the chain on
// the decrypted stream.
type Handler struct {
	// StreamID shares the handshake counters and the max_handshakes bound
	// with the other aegis_tls handlers of that stream id, across reloads
	// and chain swaps. Default: 0 (the handler keeps its own).
	StreamID int64 `json:"stream_id,omitempty"`

	// CertID is the id under which the certificate is registered (see
	// Register). It is looked up at each handshake, so a certificate
	// registered or replaced after provisioning is used from the next
	// handshake on. The streams app registers certificates; in a plain
	// layer4 config, use CertTag. CertID (>= 1) or CertTag is required.
	CertID int64 `json:"cert_id,omitempty"`

	// CertTag takes the certificate from Caddy's tls app instead: among
	// the certificates it loads with this tag (e.g. load_files with tags),
	// the one for the client's SNI, as a Caddy site picks them, and the
	// tls app renews. Not with CertID.
	CertTag string `json:"cert_tag,omitempty"`

	// HandshakeTimeout bounds a handshake. Default: 10s.
	HandshakeTimeout caddy.Duration `json:"handshake_timeout,omitempty"`

	// MaxHandshakes bounds the handshakes in progress for the stream; a
	// connection beyond it is closed at once instead of waiting.
	// Default: 1024.
	MaxHandshakes int `json:"max_handshakes,omitempty"`

	// MaxHandshakesPerIP bounds the handshakes in progress from one source
	// (IPv6: one /64), so that one source cannot hold every handshake
	// slot; a connection beyond it is closed at once. Default: 0, an
	// eighth of max_handshakes (streamstate.SourceShare).
	MaxHandshakesPerIP int `json:"max_handshakes_per_ip,omitempty"`

	cfg     *tls.Config
	src     CertSource // from CertTag; nil with CertID
	timeout time.Duration
	max     int64
	perIP   int
	state   *streamstate.State // with a stream_id; set in Provision only
	// released is set once Cleanup gave state back (made in Provision
	// with it): Cleanup does not clear state, which the old chain's
	// connections may still read.
	released *atomic.Bool
	hs       *streamstate.Handshakes
	sources  *streamstate.Sources // the stream's per-source table
	logger   *zap.Logger
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.aegis_tls",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision checks the settings, builds the TLS configuration and attaches
// the stream's handshake state.
func (h *Handler) Provision(ctx caddy.Context) error {
	switch {
	case h.CertTag != "" && h.CertID != 0:
		return fmt.Errorf("cert_id %d and cert_tag %q: give one of them, not both", h.CertID, h.CertTag)
	case h.CertTag == "" && h.CertID < 1:
		return fmt.Errorf("cert_id %d: required, must be >= 1; or give cert_tag, a tag of certificates that Caddy's tls app loads", h.CertID)
	case h.StreamID < 0:
		return fmt.Errorf("stream_id %d: must be >= 0 (0 = none)", h.StreamID)
	case h.HandshakeTimeout < 0:
		return fmt.Errorf("handshake_timeout %s: must be >= 0 (0 = default %s)", time.Duration(h.HandshakeTimeout), DefaultHandshakeTimeout)
	case h.MaxHandshakes < 0:
		return fmt.Errorf("max_handshakes %d: must be >= 0 (0 = default %d)", h.MaxHandshakes, DefaultMaxHandshakes)
	case h.MaxHandshakesPerIP < 0:
		return fmt.Errorf("max_handshakes_per_ip %d: must be >= 0 (0 = an eighth of max_handshakes)", h.MaxHandshakesPerIP)
	}
	h.timeout = time.Duration(h.HandshakeTimeout)
	if h.timeout == 0 {
		h.timeout = DefaultHandshakeTimeout
	}
	h.max = int64(h.MaxHandshakes)
	if h.max == 0 {
		h.max = DefaultMaxHandshakes
	}
	h.perIP = h.MaxHandshakesPerIP
	if h.perIP == 0 {
		h.perIP = streamstate.SourcePart(int(h.max))
	}
	if h.CertTag != "" {
		src, err := NewCaddyCert(ctx, "", []string{h.CertTag})
		if err != nil {
			return fmt.Errorf("cert_tag %q: %v", h.CertTag, err)
		}
		h.src = src
	}
	// Go's default cipher suites and curves: Caddy's list is the same
	// for TLS 1.2+ (and not exported). No ALPN: the stream is opaque.
	h.cfg = &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: h.getCertificate,
	}
	// Named: the streams app provisions the handlers itself, in a
	// context with no module of its own.
	h.logger = ctx.Logger(h)
	if h.StreamID > 0 {
		h.state, h.released = streamstate.Acquire(h.StreamID), new(atomic.Bool)
		h.hs = h.state.Handshakes()
		h.hs.Attach()
		h.sources = h.state.Sources()
	} else {
		h.hs = new(streamstate.Handshakes)
		h.sources = streamstate.NewSources()
	}
	return nil
}

// Cleanup lets go of the stream's shared state.
func (h *Handler) Cleanup() error {
	if h.state != nil && h.released.CompareAndSwap(false, true) {
		h.hs.Detach()
		streamstate.Release(h.StreamID)
	}
	return nil
}

// Stats returns the handshake counters the handler counts into (its
// stream's, with a stream_id).
func (h *Handler) Stats() HandshakeStats { return snapshot(h.hs) }

// getCertificate gives the certificate of cert_tag, or the one registered
// as cert_id now.
func (h *Handler) getCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	if h.src != nil {
		c, err := h.src.GetCertificate(hello)
		if err != nil {
			return nil, fmt.Errorf("cert_tag %q: %v", h.CertTag, err)
		}
		return c, nil
	}
	src := Lookup(h.CertID)
	if src == nil {
		return nil, fmt.Errorf("cert_id %d: no certificate registered", h.CertID)
	}
	c, err := src.GetCertificate(hello)
	if err != nil {
		return nil, fmt.Errorf("cert_id %d: %v", h.CertID, err)
	}
	return c, nil
}

// Handle runs the TLS handshake within the handshake timeout, then the rest
// of the chain on the TLS connection. A connection beyond max_handshakes
// or max_handshakes_per_ip, and one whose handshake fails, is left to the
// caller to close, with the reason tls_handshake_failed (source_share for
// max_handshakes_per_ip, also counted in the stream's blocked connections).
func (h *Handler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	ss, _ := cx.GetVar(streamstate.SessionVar).(*streamstate.Session)
	hs := h.hs
	if n := hs.InProgress.Add(1); n > h.max {
		hs.InProgress.Add(-1)
		hs.Rejected.Add(1)
		h.fail(cx, ss, errTooManyHandshakes)
		return nil
	}
	src, ok := h.sources.TakeHandshake(remoteIP(cx), h.perIP)
	if !ok {
		hs.InProgress.Add(-1)
		hs.Rejected.Add(1)
		hs.RejectedPerIP.Add(1)
		if h.state != nil {
			h.state.Block(streamstate.BlockSourceShare)
		}
		if ss != nil {
			ss.SetReason(streamstate.ReasonSourceShare)
		}
		h.fail(cx, ss, errTooManyFromSource)
		return nil
	}
	tc, w, err := h.handshake(cx)
	hs.InProgress.Add(-1)
	h.sources.DoneHandshake(src)
	if err != nil {
		if errors.Is(err, errHandshakeTimeout) {
			hs.TimedOut.Add(1)
		} else {
			hs.Failed.Add(1)
		}
		h.fail(cx, ss, err)
		return nil
	}
	hs.Succeeded.Add(1)

	cs := tc.ConnectionState()
	if ce := h.logger.Check(zap.DebugLevel, "terminated tls"); ce != nil {
		ce.Write(zap.Int64("stream_id", h.StreamID), zap.Int64("cert_id", h.CertID),
			zap.Stringer("remote", cx.RemoteAddr()), zap.String("server_name", cs.ServerName),
			zap.String("version", tls.VersionName(cs.Version)),
			zap.String("cipher_suite", tls.CipherSuiteName(cs.CipherSuite)))
	}
	// As caddy-l4's tls handler does, for matchers and listener wrappers
	// after this one.
	states, _ := cx.GetVar(layer4.TLSConnectionStatesVarName).([]*tls.ConnectionState)
	cx.SetVar(layer4.TLSConnectionStatesVarName, append(states, &cs))

	// The rest of the chain gets a new layer4 connection on the TLS one,
	// sharing cx's variables and replacer; cx keeps the connection below
	// TLS for the caller, which closes it.
	c := &Conn{Conn: tc, wire: w, ss: ss}
	err = next.Handle(cx.Wrap(c))
	c.finish()
	return err
}

var (
	errTooManyHandshakes = errors.New("max_handshakes in progress: closed without a handshake")
	errTooManyFromSource = errors.New("max_handshakes_per_ip in progress from this source: closed without a handshake")
	errHandshakeTimeout  = errors.New("no handshake within handshake_timeout")
)

// handshake runs the server handshake on cx within the handshake timeout.
// w is the connection the TLS connection runs over.
func (h *Handler) handshake(cx *layer4.Connection) (tc *tls.Conn, w *wire, err error) {
	w = &wire{Conn: cx.Conn}
	deadline := time.Now().Add(h.timeout)
	// The deadline bounds writes and most reads; the context also covers
	// reads whose deadline the guard moves (it sets its idle timeout as
	// the read deadline until the relay takes that over).
	_ = w.Conn.SetDeadline(deadline)
	defer w.Conn.SetDeadline(time.Time{})
	ctx, cancel := context.WithDeadline(cx.Context, deadline)
	defer cancel()

	// Bytes a matcher already read are the start of the ClientHello: give
	// them to TLS, and leave cx with none, so that the connection the next
	// handler gets (cx.Wrap copies cx's buffer) does not replay them.
	if n := len(cx.MatchingBytes()); n > 0 {
		w.pre = make([]byte, n)
		if _, err := io.ReadFull(cx, w.pre); err != nil {
			return nil, nil, err
		}
	}
	tc = tls.Server(w, h.cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) {
			err = fmt.Errorf("%w %s: %v", errHandshakeTimeout, h.timeout, err)
		}
		return nil, nil, err
	}
	return tc, w, nil
}

// remoteIP is the connection's source address, without allocating for a
// TCP connection.
func remoteIP(cx *layer4.Connection) netip.Addr {
	switch a := cx.RemoteAddr().(type) {
	case *net.TCPAddr:
		return a.AddrPort().Addr()
	case nil:
		return netip.Addr{}
	default:
		ap, _ := netip.ParseAddrPort(a.String())
		return ap.Addr()
	}
}

// fail records a connection that ends without TLS.
func (h *Handler) fail(cx *layer4.Connection, ss *streamstate.Session, err error) {
	if ss != nil {
		ss.SetReason(streamstate.ReasonTLSHandshakeFailed)
	}
	if ce := h.logger.Check(zap.DebugLevel, "tls handshake failed"); ce != nil {
		ce.Write(zap.Int64("stream_id", h.StreamID), zap.Int64("cert_id", h.CertID),
			zap.Stringer("remote", cx.RemoteAddr()), zap.Error(err))
	}
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	aegis_tls {
//		cert_id <id> | cert_tag <tag>
//		stream_id <id>
//		handshake_timeout <duration>
//		max_handshakes <n>
//		max_handshakes_per_ip <n>
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // handler name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if seen[opt] {
			return d.Errf("aegis_tls option %q given twice", opt)
		}
		seen[opt] = true
		args := d.RemainingArgs()
		if len(args) != 1 {
			return d.Errf("%s: want one value, got %d", opt, len(args))
		}
		val := args[0]
		switch opt {
		case "cert_id", "stream_id":
			n, err := strconv.ParseInt(val, 10, 64)
			if err != nil {
				return d.Errf("%s %q: want a whole number", opt, val)
			}
			if opt == "cert_id" {
				h.CertID = n
			} else {
				h.StreamID = n
			}
		case "cert_tag":
			h.CertTag = val
		case "max_handshakes", "max_handshakes_per_ip":
			n, err := strconv.Atoi(val)
			if err != nil {
				return d.Errf("%s %q: want a whole number", opt, val)
			}
			if opt == "max_handshakes" {
				h.MaxHandshakes = n
			} else {
				h.MaxHandshakesPerIP = n
			}
		case "handshake_timeout":
			dur, err := caddy.ParseDuration(val)
			if err != nil {
				return d.Errf("handshake_timeout %q: %v", val, err)
			}
			h.HandshakeTimeout = caddy.Duration(dur)
		default:
			return d.Errf("unknown aegis_tls option %q", opt)
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("aegis_tls option %q: blocks are not supported", opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Handler)(nil)
	_ caddy.CleanerUpper    = (*Handler)(nil)
	_ layer4.NextHandler    = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
