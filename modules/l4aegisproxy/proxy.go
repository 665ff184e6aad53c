// Package l4aegisproxy is the layer4 handler `aegis_proxy`: it dials a
// stream's upstream within a timeout, sends the PROXY protocol header,
// relays both ways (spliced by the kernel when it can) and runs the
// stream's health checks. It works in the `streams` app and in a plain
// `layer4` config.
package l4aegisproxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"
	proxyproto "github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// DefaultDialTimeout bounds the dial to the upstream when none is set.
const DefaultDialTimeout = 10 * time.Second

// Handler relays a connection to one upstream.
type Handler struct {
	// Upstream is the address to dial, host:port. Required.
	Upstream string `json:"upstream"`

	// Upstreams, when set, are several upstreams to balance the
	// connections over, and Upstream is not used. Default: none.
	Upstreams []Upstream `json:"upstreams,omitempty"`

	// LoadBalancing picks the upstream of each connection: round_robin
	// (weighted), least_connections, source_hash, random or first.
	// Default: round_robin.
	LoadBalancing string `json:"load_balancing,omitempty"`

	// FailTimeout is how long new connections skip an upstream whose dial
	// failed. Default: 10s.
	FailTimeout caddy.Duration `json:"fail_timeout,omitempty"`

	// ListenPort, for a listener on a range of ports, is the range's
	// first port: a connection to port ListenPort + k dials each
	// upstream's port + k. Default: 0 (every connection dials the
	// upstream's own port).
	ListenPort int `json:"listen_port,omitempty"`

	// FixedPort, with ListenPort, dials each upstream's own port from
	// every port of the range (the range's ports still show in the
	// session). Default: false.
	FixedPort bool `json:"fixed_port,omitempty"`

	// StreamID shares health state with the `streams` app's stream of that
	// id. Default: 0 (the handler keeps its own).
	StreamID int64 `json:"stream_id,omitempty"`

	// DialTimeout bounds the dial to the upstream. Default: 10s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// ProxyProtocol sends a PROXY protocol header of this version (1 or 2)
	// before any client byte. Default: 0 (none).
	ProxyProtocol int `json:"proxy_protocol,omitempty"`

	// HealthCheckInterval runs a TCP dial to the upstream this often.
	// Default: 0 (no health checks).
	HealthCheckInterval caddy.Duration `json:"health_check_interval,omitempty"`

	// HalfClose keeps the connection open after one side has finished
	// sending: its end is passed on (CloseWrite) and the other direction
	// runs until its own end. When false, either side's end frees the
	// guard's max_connections slot and then closes both sides, once the
	// bytes already read are written out. Default: false.
	HalfClose bool `json:"half_close,omitempty"`

	// TLS opens TLS to the upstream, verified (see UpstreamTLS). Health
	// checks then do the handshake too. Default: nil (plain TCP).
	TLS *UpstreamTLS `json:"tls,omitempty"`

	dialer net.Dialer
	// tlsConfigs are TLS's client configs, one per upstream, in the
	// picker's order (nil without TLS).
	tlsConfigs []*tls.Config
	// lastTLSLog is when a failed handshake was last logged (unix
	// nanoseconds): at most one line per tlsLogEvery. A pointer, made by
	// Provision, so that a Handler stays copyable before it.
	lastTLSLog *atomic.Int64
	picker     *streamstate.Picker
	// hosts and ports are each upstream's, for ListenPort.
	hosts []string
	ports []int
	// checkHeader is the PROXY header a health check sends: v2 LOCAL or
	// v1 "PROXY UNKNOWN", a proxy's own connection (nil without
	// ProxyProtocol).
	checkHeader []byte
	state       *streamstate.State
	logger      *zap.Logger
	// stopHealth ends the health loop.
	stopHealth context.CancelFunc
	// lastLoopLog is when an upstream loop was last logged (unix nanos,
	// atomic; not an atomic.Int64, which would make Handler uncopyable).
	lastLoopLog int64
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.aegis_proxy",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision checks the settings and starts health checks.
func (h *Handler) Provision(ctx caddy.Context) error {
	if len(h.Upstreams) == 0 {
		if _, _, err := net.SplitHostPort(h.Upstream); err != nil || h.Upstream == "" {
			return fmt.Errorf("upstream %q: want host:port, e.g. 10.0.0.5:5432", h.Upstream)
		}
	}
	for _, u := range h.Upstreams {
		if _, _, err := net.SplitHostPort(u.Address); err != nil || u.Address == "" {
			return fmt.Errorf("upstreams: address %q: want host:port, e.g. 10.0.0.5:5432", u.Address)
		}
		if u.Weight < 0 || u.Weight > 100 {
			return fmt.Errorf("upstreams: %s: weight %d: must be 1-100 (0 = 1)", u.Address, u.Weight)
		}
	}
	switch h.LoadBalancing {
	case "", streamstate.RoundRobin, streamstate.LeastConnections, streamstate.SourceHash, streamstate.Random, streamstate.First:
	default:
		return fmt.Errorf("load_balancing %q: want round_robin, least_connections, source_hash, random or first", h.LoadBalancing)
	}
	switch {
	case len(h.Upstreams) > streamstate.MaxPeers:
		return fmt.Errorf("upstreams: %d: at most %d", len(h.Upstreams), streamstate.MaxPeers)
	case h.ListenPort < 0 || h.ListenPort > 65535:
		return fmt.Errorf("listen_port %d: must be 0-65535 (0 = no port range)", h.ListenPort)
	case h.FailTimeout < 0:
		return fmt.Errorf("fail_timeout %s: must be >= 0", time.Duration(h.FailTimeout))
	case h.ProxyProtocol < 0 || h.ProxyProtocol > 2:
		return fmt.Errorf("proxy_protocol %d: must be 0 (off), 1 or 2", h.ProxyProtocol)
	case h.DialTimeout < 0:
		return fmt.Errorf("dial_timeout %s: must be >= 0", time.Duration(h.DialTimeout))
	case h.HealthCheckInterval < 0:
		return fmt.Errorf("health_check_interval %s: must be >= 0", time.Duration(h.HealthCheckInterval))
	}
	// One SO_KEEPALIVE with the system's timings instead of Go's four
	// setsockopt calls per connection.
	h.dialer.KeepAlive = -1
	h.dialer.Control = dialControl
	h.dialer.Timeout = time.Duration(h.DialTimeout)
	if h.dialer.Timeout == 0 {
		h.dialer.Timeout = DefaultDialTimeout
	}
	if h.ProxyProtocol > 0 {
		hdr := proxyproto.Header{Version: byte(h.ProxyProtocol), Command: proxyproto.LOCAL, TransportProtocol: proxyproto.UNSPEC}
		b, err := hdr.Format()
		if err != nil {
			return fmt.Errorf("proxy_protocol %d: health check header: %v", h.ProxyProtocol, err)
		}
		h.checkHeader = b
	}
	// Named: the streams app provisions the handlers itself, in a
	// context with no module of its own.
	h.logger = ctx.Logger(h)
	if h.StreamID > 0 {
		h.state = streamstate.Acquire(h.StreamID)
	} else {
		h.state = streamstate.New(0)
	}
	if err := h.newPicker(); err != nil {
		return err // Cleanup lets go of the state
	}
	if h.TLS != nil {
		// Each upstream is verified with its own name.
		h.tlsConfigs = make([]*tls.Config, len(h.hosts))
		for i, host := range h.hosts {
			cfg, err := h.TLS.clientConfig(host)
			if err != nil {
				return err
			}
			h.tlsConfigs[i] = cfg
		}
		h.lastTLSLog = new(atomic.Int64)
	}
	if h.HealthCheckInterval > 0 {
		hctx, stop := context.WithCancel(ctx)
		h.stopHealth = stop
		go h.healthLoop(hctx, time.Duration(h.HealthCheckInterval))
	}
	return nil
}

// Cleanup ends the health loop and lets go of the stream's state.
func (h *Handler) Cleanup() error {
	if h.stopHealth != nil {
		h.stopHealth()
	}
	if h.state == nil {
		return nil
	}
	if h.StreamID > 0 {
		streamstate.Release(h.StreamID)
	} else {
		_ = h.state.Destruct()
	}
	return nil
}

// Handle dials the upstream, sends the PROXY header and relays.
func (h *Handler) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	ss, _ := cx.GetVar(streamstate.SessionVar).(*streamstate.Session)
	ctx := h.state.Context()
	start := time.Now()
	up, i, err := h.dialPicked(ctx, cx, ss, start)
	if err != nil {
		h.dialFailed(ss, err)
		return nil
	}
	h.state.ObserveDial(time.Since(start))
	// Closed as Handle returns, unless the relay parked the connection:
	// it is closed when the connection ends then (parkedConn.finish,
	// relay.finish).
	parked, raw := false, up
	defer func() {
		if !parked {
			raw.Close()
		}
	}()
	peer := h.picker.Peer(i)
	// Each upstream counts its connections when there are several.
	many := len(h.Upstreams) > 0
	if ss != nil {
		ss.SetPeer(peer.State, many)
		ss.SetUpstream(up)
	} else if many {
		peer.State.Active.Add(1)
		peer.State.Total.Add(1)
		defer peer.State.Active.Add(-1)
	}

	if h.ProxyProtocol > 0 {
		hdr := proxyproto.HeaderProxyFromAddrs(byte(h.ProxyProtocol), cx.RemoteAddr(), cx.LocalAddr())
		if _, err := hdr.WriteTo(up); err != nil {
			if ss != nil {
				ss.SetReason(streamstate.ReasonProxyHeaderFailed)
			}
			return nil
		}
	}
	if h.tlsConfigs != nil {
		// The relay copies through the TLS connection: it is not a
		// *net.TCPConn, so the raw path is never taken.
		tc, err := handshakeUpstream(ctx, up, h.tlsConfigs[i], h.dialer.Timeout)
		if err != nil {
			if ss != nil {
				ss.SetReason(streamstate.ReasonUpstreamTLSFailed)
			}
			h.logTLSFailure(peer.Addr, err)
			return nil
		}
		up = tc
	}

	// Bytes that a matcher already read from the client go first.
	if n := len(cx.MatchingBytes()); n > 0 {
		if _, err := io.CopyN(up, cx, int64(n)); err != nil {
			if ss != nil {
				ss.SetReason(streamstate.ReasonUpstreamError)
			}
			return nil
		}
		if ss != nil {
			ss.AddSent(int64(n))
		}
	}

	r := getRelay(ss, cx.Conn, up)
	r.half = h.HalfClose
	if ss != nil {
		r.idle = ss.TakeIdle()
		// Drive the raw sockets (splicing bulk transfers) when the session
		// says nothing needs to see the bytes: no rate limit and no TLS.
		// The relay counts them into the session then; otherwise the
		// guard's wrapper does.
		if raw, ok := ss.RawPath(cx.Conn); ok {
			r.client, r.count = raw, true
		}
	}
	_, clientTCP := r.client.(*net.TCPConn)
	_, upTCP := up.(*net.TCPConn)
	r.raw = canRaw && clientTCP && upTCP
	// When the chain's caller lets the connection outlive Handle (the
	// streams app, not a plain layer4 server), a raw relay may park the
	// connection once it goes quiet: it returns then, the session
	// detached, and the parker ends the connection or resumes it on
	// goroutines of its own (park_linux.go).
	r.canPark = r.raw && r.count && ss.CanDetach()
	parked = r.run()
	r.put()
	return nil
}

// dialFailed records a connection (ss, if any) whose dial failed: its
// reason, the stream's counters and the log.
func (h *Handler) dialFailed(ss *streamstate.Session, err error) {
	loop := errors.Is(err, streamstate.ErrUpstreamLoop)
	if ss != nil {
		if loop {
			ss.SetReason(streamstate.ReasonUpstreamLoop)
		} else {
			ss.SetReason(streamstate.ReasonDialFailed)
		}
	}
	if h.state.Context().Err() == nil { // not the stream shutting down
		h.state.DialFailures.Add(1)
	}
	if loop {
		h.state.UpstreamLoops.Add(1)
		h.logLoop()
	}
	h.logger.Debug("dialing upstream", zap.String("upstream", h.Upstream), zap.Error(err))
}

// dialControl refuses an upstream address that is one of this process's
// own stream listeners, before the socket connects, then turns
// SO_KEEPALIVE on.
func dialControl(network, address string, c syscall.RawConn) error {
	if err := streamstate.CheckUpstream(false, address); err != nil {
		return err
	}
	return KeepAliveControl(network, address, c)
}

// logLoop logs an upstream loop at most once a second: every connection
// of a looping stream hits it.
func (h *Handler) logLoop() {
	now := time.Now().UnixNano()
	last := atomic.LoadInt64(&h.lastLoopLog)
	if now-last < int64(time.Second) || !atomic.CompareAndSwapInt64(&h.lastLoopLog, last, now) {
		return
	}
	h.logger.Error("upstream is one of this process's own stream listeners; connection closed",
		zap.Int64("stream_id", h.StreamID), zap.String("upstream", h.Upstream),
		zap.String("disconnect_reason", streamstate.ReasonUpstreamLoop.String()),
		zap.Uint64("upstream_loops", h.state.UpstreamLoops.Load()))
}

// tlsLogEvery is how often a failed TLS handshake with the upstream is
// logged at most: every connection fails alike while it is misconfigured.
const tlsLogEvery = 10 * time.Second

// logTLSFailure logs why the handshake with upstream addr failed, at most
// once per tlsLogEvery.
func (h *Handler) logTLSFailure(addr string, err error) {
	now := time.Now().UnixNano()
	last := h.lastTLSLog.Load()
	if now-last < int64(tlsLogEvery) || !h.lastTLSLog.CompareAndSwap(last, now) {
		return
	}
	h.logger.Warn("tls to the upstream failed", zap.Int64("stream_id", h.StreamID),
		zap.String("upstream", addr), zap.String("disconnect_reason", streamstate.ReasonUpstreamTLSFailed.String()),
		zap.String("error", err.Error()))
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	aegis_proxy [<host:port>] {
//		upstream <host:port> [weight <n>] [backup]
//		load_balancing round_robin|least_connections|source_hash|random|first
//		fail_timeout <duration>
//		listen_port <first port of a range>
//		stream_id <id>
//		dial_timeout <duration>
//		proxy_protocol 0|1|2
//		health_check_interval <duration>
//		half_close [true|false]
//		tls [true|false]
//		tls_server_name <name>
//		tls_ca <pem>
//		tls_client_cert_id <id>
//		tls_insecure_skip_verify [true|false]
//	}
//
// The upstream is the first argument (upstream in JSON), or several are
// given with `upstream` (upstreams in JSON), which may repeat. A tls_*
// option turns TLS to the upstream on (tls in JSON); tls_ca takes PEM
// text, as a heredoc. Each other option may be given once; none takes a
// block.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // handler name
	if d.NextArg() {
		h.Upstream = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		if opt == "upstream" {
			u, err := parseUpstreamArgs(d.RemainingArgs())
			if err != nil {
				return d.Errf("aegis_proxy upstream %v", err)
			}
			h.Upstreams = append(h.Upstreams, u)
			if d.NextBlock(nesting + 1) {
				return d.Errf("aegis_proxy option %q: blocks are not supported", opt)
			}
			continue
		}
		if seen[opt] {
			return d.Errf("aegis_proxy option %q given twice", opt)
		}
		seen[opt] = true
		if err := h.unmarshalOption(d, opt, d.RemainingArgs()); err != nil {
			return err
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("aegis_proxy option %q: blocks are not supported", opt)
		}
	}
	switch {
	case h.Upstream == "" && len(h.Upstreams) == 0:
		return d.Errf("aegis_proxy: want an upstream: aegis_proxy <host:port>, or upstream options in its block")
	case h.Upstream != "" && len(h.Upstreams) > 0:
		return d.Errf("aegis_proxy: option \"upstream\" and a <host:port> argument: give one of them, not both")
	}
	return nil
}

// parseUpstreamArgs parses `<host:port> [weight <n>] [backup]`.
func parseUpstreamArgs(args []string) (Upstream, error) {
	var u Upstream
	if len(args) == 0 {
		return u, fmt.Errorf("(none): want <host:port> [weight <n>] [backup]")
	}
	if _, _, err := net.SplitHostPort(args[0]); err != nil {
		return u, fmt.Errorf("%q: want <host:port>, e.g. 10.0.0.5:5432", args[0])
	}
	u.Address = args[0]
	var err error
	u.Weight, u.Backup, err = spec.ParseUpstreamOptions(args[0], args[1:])
	return u, err
}

// unmarshalOption sets option opt from its values.
func (h *Handler) unmarshalOption(d *caddyfile.Dispenser, opt string, args []string) error {
	if opt == "half_close" || opt == "fixed_port" || opt == "tls" || opt == "tls_insecure_skip_verify" {
		// Alone it means true, as the streams app's boolean options.
		var on bool
		switch {
		case len(args) == 0 || len(args) == 1 && args[0] == "true":
			on = true
		case len(args) == 1 && args[0] == "false":
		default:
			return d.Errf("%s %q: want true or false", opt, strings.Join(args, " "))
		}
		switch opt {
		case "half_close":
			h.HalfClose = on
		case "fixed_port":
			h.FixedPort = on
		case "tls":
			if on && h.TLS == nil {
				h.TLS = new(UpstreamTLS)
			} else if !on {
				h.TLS = nil
			}
		default:
			h.tlsOption().InsecureSkipVerify = on
		}
		return nil
	}
	switch opt {
	case "stream_id", "proxy_protocol", "dial_timeout", "health_check_interval", "load_balancing", "fail_timeout", "listen_port",
		"tls_server_name", "tls_ca", "tls_client_cert_id":
	default:
		return d.Errf("unknown aegis_proxy option %q", opt)
	}
	if len(args) != 1 {
		return d.Errf("%s: want one value, got %d", opt, len(args))
	}
	val := args[0]
	switch opt {
	case "stream_id":
		n, err := strconv.ParseInt(val, 10, 64)
		if err != nil {
			return d.Errf("stream_id %q: want a whole number", val)
		}
		h.StreamID = n
	case "proxy_protocol":
		n, err := strconv.Atoi(val)
		if err != nil {
			return d.Errf("proxy_protocol %q: want 0, 1 or 2", val)
		}
		h.ProxyProtocol = n
	case "tls_server_name":
		h.tlsOption().ServerName = val
	case "tls_ca":
		h.tlsOption().CA = val
	case "tls_client_cert_id":
		n, err := strconv.ParseInt(val, 10, 64)
		if err != nil {
			return d.Errf("tls_client_cert_id %q: want a whole number", val)
		}
		h.tlsOption().ClientCertID = n
	case "load_balancing":
		h.LoadBalancing = val
	case "listen_port":
		n, err := strconv.Atoi(val)
		if err != nil {
			return d.Errf("listen_port %q: want the first port of the listener's range", val)
		}
		h.ListenPort = n
	case "dial_timeout", "health_check_interval", "fail_timeout":
		dur, err := caddy.ParseDuration(val)
		if err != nil {
			return d.Errf("%s %q: %v", opt, val, err)
		}
		switch opt {
		case "dial_timeout":
			h.DialTimeout = caddy.Duration(dur)
		case "fail_timeout":
			h.FailTimeout = caddy.Duration(dur)
		default:
			h.HealthCheckInterval = caddy.Duration(dur)
		}
	}
	return nil
}

// tlsOption is the TLS settings a tls_* option sets: giving one turns
// TLS to the upstream on.
func (h *Handler) tlsOption() *UpstreamTLS {
	if h.TLS == nil {
		h.TLS = new(UpstreamTLS)
	}
	return h.TLS
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Handler)(nil)
	_ caddy.CleanerUpper    = (*Handler)(nil)
	_ layer4.NextHandler    = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
