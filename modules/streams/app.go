// Package streams is the `streams` Caddy app: it owns the listeners of every
// stream host and runs each accepted connection through that stream's
// layer4 handler chain (aegis_guard → aegis_proxy).
package streams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the `streams` app. Its JSON is {"hosts": [...]}.
type App struct {
	// Hosts are the stream hosts, each with a unique id.
	Hosts []*Stream `json:"hosts,omitempty"`

	// GracePeriod is how long a stream that is removed or shut down waits
	// for its open connections to end before closing them. A reload that
	// keeps a stream keeps its connections open regardless.
	// Default: 5s.
	GracePeriod caddy.Duration `json:"grace_period,omitempty"`

	ctx    caddy.Context
	logger *zap.Logger

	// base is the parent of every stream's handler context. Cancelling a
	// child of the app's own context would also run the app context's
	// cleanup functions, so children hang off this clean one instead.
	base       caddy.Context
	cancelBase context.CancelFunc

	// reserved are the ports that belong to Caddy itself (HTTP, HTTPS,
	// admin), found in Provision and checked by Validate.
	reserved []reservedPort

	streams []*runtime
}

// reservedPort is a port that a stream may not take.
type reservedPort struct {
	Port int
	// Owner says what holds it, e.g. "Caddy's HTTPS port".
	Owner string
}

// runtime is one stream of this config: its settings, shared state,
// listener and handler chain.
type runtime struct {
	cfg    *Stream
	state  *streamstate.Stream
	chain  atomic.Pointer[chainBox]
	cancel context.CancelFunc // unloads the chain's modules
	ln     net.Listener
	done   chan struct{} // closed when the accept loop has returned
	logger *zap.Logger
}

// chainBox holds a compiled handler chain behind an atomic pointer, so that
// an edit can swap it without touching the listener.
type chainBox struct{ h layer4.Handler }

// CaddyModule returns the Caddy module information.
func (*App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "streams",
		New: func() caddy.Module { return new(App) },
	}
}

func (a *App) gracePeriod() time.Duration {
	if a.GracePeriod <= 0 {
		return streamstate.DefaultGracePeriod
	}
	return time.Duration(a.GracePeriod)
}

// Provision validates the hosts and builds each enabled stream's handler
// chain. Nothing listens yet.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger()
	a.base, a.cancelBase = caddy.NewContext(ctx)
	a.reserved = reservedPorts(ctx)
	if err := a.Validate(); err != nil {
		return err
	}
	for _, h := range a.Hosts {
		rt := &runtime{cfg: h, state: streamstate.Acquire(h.ID), logger: a.logger.With(zap.Int64("stream_id", h.ID), zap.String("stream", h.DisplayName()))}
		a.streams = append(a.streams, rt)
		if !h.Enabled {
			continue
		}
		if h.HasUDP() {
			return fmt.Errorf("stream %d (%q): protocol %q: UDP streams are not available in this version yet; use tcp", h.ID, h.DisplayName(), h.EffectiveProtocol())
		}
		chain, cancel, err := a.buildChain(h)
		if err != nil {
			return fmt.Errorf("stream %d (%q): %v", h.ID, h.DisplayName(), err)
		}
		rt.chain.Store(&chainBox{chain})
		rt.cancel = cancel
	}
	return nil
}

// chainConfig lets Caddy load a stream's handlers as layer4 modules.
type chainConfig struct {
	HandlersRaw []json.RawMessage `json:"handlers,omitempty" caddy:"namespace=layer4.handlers inline_key=handler"`
}

// buildChain loads the stream's aegis_guard and aegis_proxy handlers in a
// context of their own and compiles them into one layer4 handler.
func (a *App) buildChain(s *Stream) (layer4.Handler, context.CancelFunc, error) {
	guard := &l4aegisguard.Handler{
		StreamID:          s.ID,
		StreamName:        s.DisplayName(),
		WhitelistCIDRs:    s.WhitelistCIDRs,
		BlacklistCIDRs:    s.BlacklistCIDRs,
		MaxConnections:    s.MaxConnections,
		UploadRateBytes:   s.UploadRateBytes,
		DownloadRateBytes: s.DownloadRateBytes,
		IdleTimeout:       caddy.Duration(time.Duration(s.IdleTimeoutSeconds) * time.Second),
		LogConnections:    s.LogConnections,
	}
	proxy := &l4aegisproxy.Handler{
		Upstream:      s.UpstreamHostPort(),
		StreamID:      s.ID,
		DialTimeout:   caddy.Duration(s.ConnectionTimeout()),
		ProxyProtocol: s.ProxyProtocolVersion,
	}
	if s.HealthCheckEnabled {
		proxy.HealthCheckInterval = caddy.Duration(s.HealthCheckInterval())
	}
	cfg := chainConfig{HandlersRaw: []json.RawMessage{
		caddyconfig.JSONModuleObject(guard, "handler", "aegis_guard", nil),
		caddyconfig.JSONModuleObject(proxy, "handler", "aegis_proxy", nil),
	}}
	cctx, cancel := caddy.NewContext(a.base)
	mods, err := cctx.LoadModule(&cfg, "HandlersRaw")
	if err != nil {
		cancel()
		return nil, nil, err
	}
	var handlers layer4.Handlers
	for _, m := range mods.([]any) {
		handlers = append(handlers, m.(layer4.NextHandler))
	}
	return handlers.Compile(), cancel, nil
}

// Start binds every enabled stream and starts accepting. If one cannot
// bind, none is left listening and the error names the stream.
func (a *App) Start() error {
	for _, rt := range a.streams {
		if rt.chain.Load() == nil {
			continue
		}
		ln, err := listen(a.ctx, rt.cfg)
		if err != nil {
			a.closeListeners()
			return err
		}
		rt.ln = ln
	}
	for _, rt := range a.streams {
		rt.state.SetGracePeriod(a.gracePeriod())
		rt.state.ResetTotals()
		if !rt.cfg.HealthCheckEnabled || !rt.cfg.Enabled {
			rt.state.ClearHealth()
		}
		if rt.ln == nil {
			continue
		}
		rt.state.ListenerUp()
		rt.done = make(chan struct{})
		go rt.accept(rt.ln)
		a.logger.Info("stream listening",
			zap.Int64("stream_id", rt.cfg.ID),
			zap.String("stream", rt.cfg.DisplayName()),
			zap.String("listen", rt.ln.Addr().String()),
			zap.String("upstream", rt.cfg.UpstreamHostPort()))
	}
	return nil
}

// Stop stops accepting at once. Open connections of streams that the next
// config keeps go on; the others get the grace period when the app's
// modules are cleaned up.
func (a *App) Stop() error {
	a.closeListeners()
	for _, rt := range a.streams {
		if rt.done != nil {
			<-rt.done
			rt.done = nil
			rt.state.ListenerDown()
		}
	}
	return nil
}

func (a *App) closeListeners() {
	for _, rt := range a.streams {
		if rt.ln != nil {
			rt.ln.Close()
			unbind(rt.cfg)
			rt.ln = nil
		}
	}
}

// Cleanup unloads the handler chains and lets go of the streams' shared
// state; the last user of a stream closes its remaining connections.
func (a *App) Cleanup() error {
	for _, rt := range a.streams {
		if rt.cancel != nil {
			rt.cancel()
		}
	}
	if a.cancelBase != nil {
		a.cancelBase()
	}
	// Streams that go away each wait out their grace period: together,
	// so that stopping N busy streams takes one grace period, not N.
	var wg sync.WaitGroup
	for _, rt := range a.streams {
		wg.Go(func() { streamstate.Release(rt.cfg.ID) })
	}
	wg.Wait()
	a.streams = nil
	return nil
}

// accept runs the stream's accept loop until its listener is closed.
func (rt *runtime) accept(ln net.Listener) {
	defer close(rt.done)
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of file descriptors or similar: wait, then go on.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			rt.logger.Error("accepting connection", zap.Error(err), zap.Duration("retry_in", backoff))
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		rt.state.ConnStarted()
		go rt.serve(c)
	}
}

// serve runs one connection through the stream's current handler chain.
func (rt *runtime) serve(c net.Conn) {
	defer rt.state.ConnDone()
	cx := layer4.WrapConnection(c, nil, rt.logger)
	if err := rt.chain.Load().h.Handle(cx); err != nil {
		rt.logger.Debug("handling connection", zap.Error(err))
	}
	c.Close()
}

// reservedPorts finds the ports Caddy itself uses in this config.
func reservedPorts(ctx caddy.Context) []reservedPort {
	var out []reservedPort
	if _, port, err := net.SplitHostPort(caddy.DefaultAdminListen); err == nil {
		if p, err := strconv.Atoi(port); err == nil {
			out = append(out, reservedPort{Port: p, Owner: "Caddy's admin endpoint"})
		}
	}
	httpApp, err := ctx.AppIfConfigured("http")
	if err != nil {
		return out
	}
	app, ok := httpApp.(*caddyhttp.App)
	if !ok {
		return out
	}
	httpPort, httpsPort := app.HTTPPort, app.HTTPSPort
	if httpPort == 0 {
		httpPort = caddyhttp.DefaultHTTPPort
	}
	if httpsPort == 0 {
		httpsPort = caddyhttp.DefaultHTTPSPort
	}
	out = append(out,
		reservedPort{Port: httpPort, Owner: "Caddy's HTTP port"},
		reservedPort{Port: httpsPort, Owner: "Caddy's HTTPS port"})
	for name, srv := range app.Servers {
		for _, l := range srv.Listen {
			na, err := caddy.ParseNetworkAddress(l)
			if err != nil || na.IsUnixNetwork() {
				continue
			}
			for p := na.StartPort; p <= na.EndPort && p-na.StartPort < 1024; p++ {
				out = append(out, reservedPort{Port: int(p), Owner: fmt.Sprintf("Caddy's HTTP server %q", name)})
			}
		}
	}
	return out
}

// Interface guards
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
