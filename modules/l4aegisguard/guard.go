// Package l4aegisguard is the layer4 handler `aegis_guard`: access control,
// max_connections, byte accounting, per-connection rate limits, the idle
// timeout and the connection log of one stream. It works in the `streams`
// app and in a plain `layer4` config.
package l4aegisguard

import (
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

func init() {
	caddy.RegisterModule(new(Handler))
}

// Handler guards a stream's connections. Put it before the handler that
// relays (aegis_proxy, or caddy-l4's proxy).
type Handler struct {
	// StreamID shares counters, health and open connections with the
	// `streams` app's stream of that id and keeps them across reloads.
	// Default: 0 (the handler keeps its own, and a reload closes its
	// connections).
	StreamID int64 `json:"stream_id,omitempty"`

	// StreamName names the stream in the connection log.
	// Default: "stream-<stream_id>".
	StreamName string `json:"stream_name,omitempty"`

	// WhitelistCIDRs, when not empty, allows only sources inside them.
	// A bare IP means /32 or /128. Default: empty (allow all).
	WhitelistCIDRs []string `json:"whitelist_cidrs,omitempty"`

	// BlacklistCIDRs rejects sources inside them. Default: empty.
	BlacklistCIDRs []string `json:"blacklist_cidrs,omitempty"`

	// MaxConnections caps concurrent connections; one beyond it is closed
	// at once. Default: 0 (unlimited).
	MaxConnections int `json:"max_connections,omitempty"`

	// MaxConnectionsPerIP caps concurrent connections from one source IP
	// (IPv6: one /64); one beyond it is closed at once. Default: 0
	// (unlimited).
	MaxConnectionsPerIP int `json:"max_connections_per_ip,omitempty"`

	// ConnectionRatePerIP caps new connections from one source IP per
	// ConnectionRateWindow (a token bucket); one beyond it is closed at
	// once. Default: 0 (unlimited).
	ConnectionRatePerIP int `json:"connection_rate_per_ip,omitempty"`

	// ConnectionRateWindow is the window of ConnectionRatePerIP.
	// Default: 0, meaning 60s.
	ConnectionRateWindow caddy.Duration `json:"connection_rate_window,omitempty"`

	// UploadRateBytes limits client→upstream bytes per second per
	// connection. Default: 0 (unlimited).
	UploadRateBytes int64 `json:"upload_rate_bytes,omitempty"`

	// DownloadRateBytes limits upstream→client bytes per second per
	// connection. Default: 0 (unlimited).
	DownloadRateBytes int64 `json:"download_rate_bytes,omitempty"`

	// IdleTimeout closes a connection when no byte moved either way for
	// this long. Default: 0 (never).
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// LogConnections writes one log entry per connection end, blocked
	// connections included. Default: false.
	LogConnections bool `json:"log_connections,omitempty"`

	// AcceptProxyProtocol reads a PROXY protocol header (v1 or v2) that a
	// front proxy sends before the client's bytes, and takes its client
	// address as the connection's for the access lists, the limits, the
	// log and the header aegis_proxy sends: "off", "optional" (a trusted
	// source may send one) or "required" (every connection must come from
	// a trusted source with one). Default: "off".
	AcceptProxyProtocol string `json:"accept_proxy_protocol,omitempty"`

	// TrustedProxyCIDRs are the sources that may send a PROXY header.
	// Required unless AcceptProxyProtocol is off.
	TrustedProxyCIDRs []string `json:"trusted_proxy_cidrs,omitempty"`

	// ProxyHeaderTimeout bounds the wait for the whole PROXY header.
	// Default: 5s.
	ProxyHeaderTimeout caddy.Duration `json:"proxy_header_timeout,omitempty"`

	policy *streamstate.Policy
	state  *streamstate.State
}

// FromLimits is the guard of stream id with the admission settings l, the
// ones its Provision turns back into a streamstate.Policy.
func FromLimits(id int64, l streamstate.Limits) *Handler {
	h := &Handler{
		StreamID:             id,
		StreamName:           l.Name,
		WhitelistCIDRs:       l.Whitelist,
		BlacklistCIDRs:       l.Blacklist,
		MaxConnections:       l.MaxConnections,
		MaxConnectionsPerIP:  l.MaxConnectionsPerIP,
		ConnectionRatePerIP:  l.ConnectionRatePerIP,
		ConnectionRateWindow: caddy.Duration(l.ConnectionRateWindow),
		UploadRateBytes:      l.UploadRate,
		DownloadRateBytes:    l.DownloadRate,
		IdleTimeout:          caddy.Duration(l.IdleTimeout),
		LogConnections:       l.LogConnections,

		TrustedProxyCIDRs:  l.TrustedProxies,
		ProxyHeaderTimeout: caddy.Duration(l.ProxyHeaderTimeout),
	}
	if l.ProxyAccept != streamstate.ProxyOff {
		h.AcceptProxyProtocol = l.ProxyAccept.String()
	}
	return h
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.aegis_guard",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision builds the stream's admission policy from the settings and
// attaches the stream's state.
func (h *Handler) Provision(ctx caddy.Context) error {
	l, err := h.limits()
	if err != nil {
		return err
	}
	if l.Name == "" {
		l.Name = fmt.Sprintf("stream-%d", h.StreamID)
	}
	// The logger is named for the handler: the streams app provisions the
	// handlers itself, in a context with no module of its own.
	if h.policy, err = streamstate.NewPolicy(l, ctx.Logger(h)); err != nil {
		return err
	}
	if h.StreamID > 0 {
		h.state = streamstate.Acquire(h.StreamID)
	} else {
		h.state = streamstate.New(0)
		h.state.SetGracePeriod(0)
	}
	return nil
}

// Cleanup lets go of the stream's state.
func (h *Handler) Cleanup() error {
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

// limits are the handler's settings, as FromLimits took them.
func (h *Handler) limits() (streamstate.Limits, error) {
	accept, err := streamstate.ParseProxyAccept(h.AcceptProxyProtocol)
	return streamstate.Limits{
		Name:                 h.StreamName,
		Whitelist:            h.WhitelistCIDRs,
		Blacklist:            h.BlacklistCIDRs,
		MaxConnections:       h.MaxConnections,
		MaxConnectionsPerIP:  h.MaxConnectionsPerIP,
		ConnectionRatePerIP:  h.ConnectionRatePerIP,
		ConnectionRateWindow: time.Duration(h.ConnectionRateWindow),
		UploadRate:           h.UploadRateBytes,
		DownloadRate:         h.DownloadRateBytes,
		IdleTimeout:          time.Duration(h.IdleTimeout),
		LogConnections:       h.LogConnections,

		ProxyAccept:        accept,
		TrustedProxies:     h.TrustedProxyCIDRs,
		ProxyHeaderTimeout: time.Duration(h.ProxyHeaderTimeout),
	}, err
}

// Policy is the stream's admission policy (after Provision), which the
// streams app's event loop applies to the connections it serves.
func (h *Handler) Policy() *streamstate.Policy { return h.policy }

// State is the stream state the handler counts into.
func (h *Handler) State() *streamstate.State { return h.state }

// Allowed applies the access lists to ip: a non-empty whitelist allows only
// its matches, then a blacklist match rejects.
func (h *Handler) Allowed(ip netip.Addr) bool { return h.policy.Allowed(ip) }

// remoteAddrPort returns the connection's source without allocating for
// the usual TCP and UDP addresses.
func remoteAddrPort(c net.Conn) netip.AddrPort {
	switch a := c.RemoteAddr().(type) {
	case *net.TCPAddr:
		return a.AddrPort()
	case *net.UDPAddr:
		return a.AddrPort()
	case nil:
		return netip.AddrPort{}
	default:
		ap, _ := netip.ParseAddrPort(a.String())
		return ap
	}
}

// Handle admits the connection by the stream's policy (a refused one is
// counted and logged there, and left to the caller to close), then runs
// the rest of the chain with the connection wrapped for accounting, and
// logs its end.
func (h *Handler) Handle(cx *layer4.Connection, next layer4.Handler) error {
	st, p := h.state, h.policy
	// The streams app counts each connection's goroutine (its accept loop
	// calls ConnStarted) and lets the chain return early (DetachVar). On a
	// plain layer4 route the guard counts it, so that the state's Destruct
	// (a reload's Cleanup) waits for the connections it closes and writes
	// their log lines before its log writer stops.
	detachDone, underApp := cx.GetVar(streamstate.DetachVar).(func())
	if !underApp {
		st.ConnStarted()
		defer st.ConnDone()
	}
	st.Total.Add(1)
	src := remoteAddrPort(cx.Conn)
	// A front proxy's header names the client the rest of the chain sees.
	var pa streamstate.ProxyAddrs
	if p.AcceptsProxy() {
		var ok bool
		if pa, ok = p.ProxyHeader(st, cx.Conn, src); !ok {
			return nil
		}
		if pa.Source.IsValid() {
			src = pa.Source
		}
	}
	a, ok := p.Admit(st, src, false, nil)
	if !ok {
		return nil
	}
	// The relay may give the slot back before the connection is closed.
	ss := p.Open(st, cx.Conn, src, false, a)
	// A caller that lets the connection outlive the chain (the streams
	// app) lets the relay park it; the relay then ends it (Session.Finish).
	if underApp {
		ss.AllowDetach(p, detachDone)
	}
	defer endAttached(p, ss)
	cx.SetVar(streamstate.SessionVar, ss)
	w := p.Wrap(cx.Conn, ss)
	if pa.Source.IsValid() {
		w.SetProxyAddrs(pa)
	}
	cx.Conn = w
	return next.Handle(cx)
}

// endAttached ends ss as the chain returns, unless the relay detached it
// (parked it), which then ends it itself through Session.Finish.
func endAttached(p *streamstate.Policy, ss *streamstate.Session) {
	if !ss.Detached() {
		p.End(ss, streamstate.ReasonClientClose)
	}
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	aegis_guard {
//		stream_id <id>
//		stream_name <name>
//		whitelist_cidrs <cidr...>
//		blacklist_cidrs <cidr...>
//		max_connections <n>
//		max_connections_per_ip <n>
//		connection_rate_per_ip <n>
//		connection_rate_window <duration>
//		upload_rate_bytes <n>
//		download_rate_bytes <n>
//		idle_timeout <duration>
//		log_connections [true|false]
//		accept_proxy_protocol off|optional|required
//		trusted_proxy_cidrs <cidr...>
//		proxy_header_timeout <duration>
//	}
//
// Each option may be given once, except whitelist_cidrs, blacklist_cidrs
// and trusted_proxy_cidrs, which add up; none takes a block.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // handler name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		// The access lists may repeat and append, as in the streams app.
		if seen[opt] && opt != "whitelist_cidrs" && opt != "blacklist_cidrs" && opt != "trusted_proxy_cidrs" {
			return d.Errf("aegis_guard option %q given twice", opt)
		}
		seen[opt] = true
		args := d.RemainingArgs()
		var err error
		switch opt {
		case "stream_id":
			err = oneInt(d, opt, args, &h.StreamID)
		case "stream_name":
			if err := wantOne(d, opt, args); err != nil {
				return err
			}
			h.StreamName = args[0]
		case "whitelist_cidrs":
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.WhitelistCIDRs = append(h.WhitelistCIDRs, args...)
		case "blacklist_cidrs":
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.BlacklistCIDRs = append(h.BlacklistCIDRs, args...)
		case "max_connections":
			var n int64
			err = oneInt(d, opt, args, &n)
			h.MaxConnections = int(n)
		case "max_connections_per_ip", "connection_rate_per_ip":
			var n int64
			err = oneInt(d, opt, args, &n)
			if opt == "max_connections_per_ip" {
				h.MaxConnectionsPerIP = int(n)
			} else {
				h.ConnectionRatePerIP = int(n)
			}
		case "connection_rate_window":
			if err := wantOne(d, opt, args); err != nil {
				return err
			}
			dur, perr := caddy.ParseDuration(args[0])
			if perr != nil {
				return d.Errf("connection_rate_window %q: %v", args[0], perr)
			}
			h.ConnectionRateWindow = caddy.Duration(dur)
		case "upload_rate_bytes":
			err = oneInt(d, opt, args, &h.UploadRateBytes)
		case "download_rate_bytes":
			err = oneInt(d, opt, args, &h.DownloadRateBytes)
		case "trusted_proxy_cidrs":
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.TrustedProxyCIDRs = append(h.TrustedProxyCIDRs, args...)
		case "accept_proxy_protocol":
			if err := wantOne(d, opt, args); err != nil {
				return err
			}
			if _, perr := streamstate.ParseProxyAccept(args[0]); perr != nil {
				return d.Err(perr.Error())
			}
			h.AcceptProxyProtocol = args[0]
		case "idle_timeout", "proxy_header_timeout":
			if err := wantOne(d, opt, args); err != nil {
				return err
			}
			dur, perr := caddy.ParseDuration(args[0])
			if perr != nil {
				return d.Errf("%s %q: %v", opt, args[0], perr)
			}
			if opt == "idle_timeout" {
				h.IdleTimeout = caddy.Duration(dur)
			} else {
				h.ProxyHeaderTimeout = caddy.Duration(dur)
			}
		case "log_connections":
			switch {
			case len(args) == 0 || len(args) == 1 && args[0] == "true":
				h.LogConnections = true
			case len(args) == 1 && args[0] == "false":
				h.LogConnections = false
			default:
				return d.Errf("log_connections %q: want true or false", strings.Join(args, " "))
			}
		default:
			return d.Errf("unknown aegis_guard option %q", opt)
		}
		if err != nil {
			return err
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("aegis_guard option %q: blocks are not supported", opt)
		}
	}
	return nil
}

// wantOne returns an error that names opt unless args is one value.
func wantOne(d *caddyfile.Dispenser, opt string, args []string) error {
	if len(args) != 1 {
		return d.Errf("%s: want one value, got %d", opt, len(args))
	}
	return nil
}

func oneInt(d *caddyfile.Dispenser, opt string, args []string, dst *int64) error {
	if err := wantOne(d, opt, args); err != nil {
		return err
	}
	n, err := strconv.ParseInt(args[0], 10, 64)
	if err != nil {
		return d.Errf("%s %q: want a whole number", opt, args[0])
	}
	*dst = n
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner     = (*Handler)(nil)
	_ caddy.CleanerUpper    = (*Handler)(nil)
	_ layer4.NextHandler    = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*Handler)(nil)
)
