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
	// tlsConfig is TLS's client config for Upstream (nil without TLS).
	tlsConfig *tls.Config
	// lastTLSLog is when a failed handshake was last logged (unix
	// nanoseconds): at most one line per tlsLogEvery. A pointer, made by
	// Provision, so that a Handler stays copyable before it.
	lastTLSLog *atomic.Int64
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
	if _, _, err := net.SplitHostPort(h.Upstream); err != nil || h.Upstream == "" {
		return fmt.Errorf("upstream %q: want host:port, e.g. 10.0.0.5:5432", h.Upstream)
	}
	switch {
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
	if h.TLS != nil {
		host, _, _ := net.SplitHostPort(h.Upstream)
		cfg, err := h.TLS.clientConfig(host)
		if err != nil {
			return err
		}
		h.tlsConfig = cfg
		h.lastTLSLog = new(atomic.Int64)
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
	up, err := h.dial(ctx)
	if err != nil {
		loop := errors.Is(err, streamstate.ErrUpstreamLoop)
		if ss != nil {
			if loop {
				ss.SetReason(streamstate.ReasonUpstreamLoop)
			} else {
				ss.SetReason(streamstate.ReasonDialFailed)
			}
		}
		if ctx.Err() == nil { // not the stream shutting down
			h.state.DialFailures.Add(1)
		}
		if loop {
			h.state.UpstreamLoops.Add(1)
			h.logLoop()
		}
		h.logger.Debug("dialing upstream", zap.String("upstream", h.Upstream), zap.Error(err))
		return nil
	}
	h.state.ObserveDial(time.Since(start))
	defer up.Close()
	if ss != nil {
		ss.SetUpstream(up)
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
	if h.tlsConfig != nil {
		// The relay copies through the TLS connection: it is not a
		// *net.TCPConn, so the raw path is never taken.
		tc, err := handshakeUpstream(ctx, up, h.tlsConfig, h.dialer.Timeout)
		if err != nil {
			if ss != nil {
				ss.SetReason(streamstate.ReasonUpstreamTLSFailed)
			}
			h.logTLSFailure(err)
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
	defer r.put()
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
	r.run()
	return nil
}

// dial connects to the upstream within the dial timeout.
//
// Not Dialer.DialTCP, though it would skip name resolution for an IP
// upstream: it turns a zero local address into a bind to port 0 before the
// connect, and bind cannot reuse the ports that closed connections hold in
// TIME_WAIT, so a burst of short connections runs out of ports.
func (h *Handler) dial(ctx context.Context) (net.Conn, error) {
	return h.dialer.DialContext(ctx, "tcp", h.Upstream)
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

// healthLoop dials the upstream every interval and records the outcome,
// until the module is unloaded.
func (h *Handler) healthLoop(ctx context.Context, every time.Duration) {
	// The first check waits a moment: at provisioning time the upstream may
	// be a server of this same config that has not started yet.
	t := time.NewTimer(min(every, 500*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.checkHealth(ctx)
		t.Reset(every)
	}
}

// checkHealth dials the upstream once. With ProxyProtocol it sends the
// LOCAL header on the connection (as HAProxy's check-send-proxy), so that
// an upstream that reads PROXY headers sees a proper connection instead of
// a broken header on every check.
func (h *Handler) checkHealth(ctx context.Context) {
	c, err := h.dial(ctx)
	if ctx.Err() != nil {
		if err == nil {
			c.Close()
		}
		return
	}
	if err == nil {
		if h.checkHeader != nil {
			_ = c.SetWriteDeadline(time.Now().Add(h.dialer.Timeout))
			if _, werr := c.Write(h.checkHeader); werr != nil {
				err = fmt.Errorf("sending the PROXY header: %w", werr)
			}
		}
		if err == nil && h.tlsConfig != nil {
			var tc *tls.Conn
			if tc, err = handshakeUpstream(ctx, c, h.tlsConfig, h.dialer.Timeout); err == nil {
				_ = tc.SetWriteDeadline(time.Now().Add(h.dialer.Timeout))
				_ = tc.Close() // close_notify, then the socket
			}
		}
		c.Close()
	}
	res := streamstate.Health{Healthy: err == nil, LastCheck: time.Now()}
	if err != nil {
		res.LastError = err.Error()
	}
	prev := h.state.Health()
	h.state.SetHealth(res)
	if prev == nil || prev.Healthy != res.Healthy {
		if res.Healthy {
			h.logger.Info("upstream healthy", zap.Int64("stream_id", h.StreamID), zap.String("upstream", h.Upstream))
		} else {
			h.logger.Warn("upstream unhealthy", zap.Int64("stream_id", h.StreamID), zap.String("upstream", h.Upstream), zap.String("error", res.LastError))
		}
	}
}

// tlsLogEvery is how often a failed TLS handshake with the upstream is
// logged at most: every connection fails alike while it is misconfigured.
const tlsLogEvery = 10 * time.Second

// logTLSFailure logs why the handshake with the upstream failed, at most
// once per tlsLogEvery.
func (h *Handler) logTLSFailure(err error) {
	now := time.Now().UnixNano()
	last := h.lastTLSLog.Load()
	if now-last < int64(tlsLogEvery) || !h.lastTLSLog.CompareAndSwap(last, now) {
		return
	}
	h.logger.Warn("tls to the upstream failed", zap.Int64("stream_id", h.StreamID),
		zap.String("upstream", h.Upstream), zap.String("disconnect_reason", streamstate.ReasonUpstreamTLSFailed.String()),
		zap.String("error", err.Error()))
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	aegis_proxy <host:port> {
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
// The upstream is the first argument (upstream in JSON). A tls_* option
// turns TLS to the upstream on (tls in JSON); tls_ca takes PEM text, as a
// heredoc. Each option may be given once; none takes a block.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // handler name
	if !d.NextArg() {
		return d.ArgErr()
	}
	h.Upstream = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
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
	return nil
}

// unmarshalOption sets option opt from its values.
func (h *Handler) unmarshalOption(d *caddyfile.Dispenser, opt string, args []string) error {
	if opt == "half_close" || opt == "tls" || opt == "tls_insecure_skip_verify" {
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
	case "stream_id", "proxy_protocol", "dial_timeout", "health_check_interval",
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
	case "dial_timeout", "health_check_interval":
		dur, err := caddy.ParseDuration(val)
		if err != nil {
			return d.Errf("%s %q: %v", opt, val, err)
		}
		if opt == "dial_timeout" {
			h.DialTimeout = caddy.Duration(dur)
		} else {
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
