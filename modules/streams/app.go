// Package streams is the `streams` Caddy app: it owns the listeners of every
// stream host, runs each accepted TCP connection through that stream's
// layer4 handler chain (aegis_guard → aegis_proxy) and each UDP socket
// through the stream's NAT relay (package udpnat).
package streams

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/modules/udpnat"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

func init() {
	caddy.RegisterModule(new(App))
}

// App is the `streams` app. Its JSON is {"hosts": [...]}.
type App struct {
	// Hosts are the stream hosts, each with a unique id.
	Hosts []*spec.Stream `json:"hosts,omitempty"`

	// GracePeriod is how long a stream that is removed or shut down waits
	// for its open connections to end before closing them. A reload that
	// keeps a stream keeps its connections open regardless.
	// Default: 5s.
	GracePeriod caddy.Duration `json:"grace_period,omitempty"`

	// Storage holds the streams created through the API and the
	// connection log. Default: SQLite in streams.db in Caddy's data
	// directory.
	Storage *StorageConfig `json:"storage,omitempty"`

	// NodeName names this node among those that share a PostgreSQL
	// storage: unique per node, in the app's log lines, the stats and the
	// cluster API. Default: the host name.
	NodeName string `json:"node_name,omitempty"`

	ctx    caddy.Context
	logger *zap.Logger
	// connLogger writes every stream's connection-log lines, TCP and UDP.
	connLogger *zap.Logger

	// tlsApp is Caddy's tls app, which obtains and renews managed
	// certificates; loaded in Provision when storage is on.
	tlsApp *caddytls.TLS

	// reserved are the ports that belong to Caddy itself (HTTP, HTTPS,
	// admin), found in Provision and checked by Validate.
	reserved []reservedPort
	// admin is Caddy's admin endpoint, if hasAdmin: no stream may relay
	// to it (loops.go).
	admin    adminEndpoint
	hasAdmin bool
	// validated says Provision checked the config (see Validate).
	validated bool

	// mu serializes changes to the running streams (the API's writes) and
	// guards streams and each instance's cfg.
	mu      sync.Mutex
	streams []*instance
	store   *sharedStore // nil without storage
	// cleanedUp says Cleanup ran (the metrics then show the running
	// app's streams; see samples).
	cleanedUp bool

	// namesMu guards the names for Caddy's tls app to manage, which wait
	// until this config runs (running).
	namesMu  sync.Mutex
	running  bool
	toManage map[string]struct{}

	// certs are the certificate sources of this app's streams by registry
	// id (see certID): the stored certificates, and those that config
	// streams name by Caddy tag or domain. Provision only collects them;
	// they enter the process-wide registry when the app starts
	// (certsLive), so that a config that is then refused changes no
	// handshake of the running one. certRows are the stored certificates
	// as this app last read them (see certRow). Guarded by mu once the app
	// has started.
	certs     map[int64]l4aegistls.CertSource
	certRows  map[int64]string
	certsLive bool

	// prev is the app this one replaced as the running app, and stopped
	// says Stop began; both guarded by writeMu.
	prev    *App
	stopped bool
}

// reservedPort is a port that a stream may not take.
type reservedPort struct {
	Port int
	// Owner says what holds it, e.g. "Caddy's HTTPS port".
	Owner string
}

// instance is one stream as one config load runs it: its settings,
// shared state, listeners, TCP handler chain and UDP relay.
type instance struct {
	cfg    *spec.Stream
	source string // SourceConfig or SourceAPI
	// created and updated are the storage times of an API stream, and
	// version its stored version (see setStored).
	created, updated time.Time
	version          int64
	state            *streamstate.State
	released         bool // state was released
	chain            atomic.Pointer[chainBox]
	cancel           func() // cleans the chain's handlers up
	logger           *zap.Logger
	// connDone is state.ConnDone, bound once: a parked connection's relay
	// calls it when the connection ends (serve).
	connDone func()

	// sockets are those of listen_port; more are those of the other
	// ports of a port range (listen_port_end), in order.
	sockets
	more []*sockets

	// sniShared: the stream listens on a port shared by server name
	// (sni.go), whose listener is sni instead of ln; sniServing: it is
	// one of that port's streams.
	sniShared  bool
	sni        *sniPort
	sniServing bool
}

// sockets are the listeners of one port of a stream, with the UDP relay
// of that address.
type sockets struct {
	port int
	ln   net.Listener
	done chan struct{} // closed when the accept loop has returned
	stop chan struct{} // closed to end the accept loop's wait
	// acc is the accept loop's accept4 on ln's socket, made when the
	// stream's chain first takes the event loop (accepter); accMu guards
	// it and accClosed, which closeListeners sets.
	accMu     sync.Mutex
	acc       *l4aegisproxy.Accepter
	accClosed bool

	relay   *udpnat.Relay // shared with other loads of the same stream address
	nat     udpnat.Config
	udp     *net.UDPConn   // the socket the relay reads
	pc      net.PacketConn // Caddy's wrapper of udp, to close it
	serving bool           // udp was handed to the relay
}

// all returns the sockets of every port of the stream.
func (inst *instance) all() []*sockets {
	return append([]*sockets{&inst.sockets}, inst.more...)
}

// portStream is s as it listens on port p of its range: for binding and
// for messages, which then name that port.
func portStream(s *spec.Stream, p int) *spec.Stream {
	if p == s.ListenPort && s.ListenPortEnd == 0 {
		return s
	}
	c := *s
	c.ListenPort, c.ListenPortEnd = p, 0
	return &c
}

// chainBox holds a compiled handler chain behind an atomic pointer, so that
// an edit can swap it without touching the listener. direct, when the
// stream's connections need nothing but their bytes moved, serves them on
// the event loop instead (l4aegisproxy.Direct, with the chain's policy
// and proxy handler); the accept loop takes the path of the box it loads.
type chainBox struct {
	h      layer4.Handler
	direct *l4aegisproxy.Direct
}

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

// Provision opens the storage, validates the config's hosts together with
// the stored ones, and builds each enabled stream's handler chain and UDP
// relay. Nothing listens yet.
func (a *App) Provision(ctx caddy.Context) error {
	a.ctx = ctx
	a.logger = ctx.Logger().With(zap.String("node", a.nodeName()))
	a.connLogger = a.logger.Named("connections")
	// In ctx's registry, not a child context's: that is the one Caddy's
	// /metrics serves.
	if err := a.registerMetrics(); err != nil {
		return fmt.Errorf("registering the streams' metrics: %v", err)
	}
	a.admin, a.hasAdmin = adminEndpointOf(ctx)
	a.reserved = reservedPorts(ctx)
	stored, err := a.openStorage()
	if err != nil {
		return err
	}
	if a.store != nil || usesCaddyCerts(a.Hosts) {
		// Loaded now, since an app may only be loaded while provisioning:
		// a managed certificate created later through the API needs it.
		app, err := ctx.App("tls")
		if err != nil {
			return fmt.Errorf("loading Caddy's tls app for managed certificates: %v", err)
		}
		a.tlsApp, _ = app.(*caddytls.TLS)
		events, err := ctx.App("events")
		if err != nil {
			return fmt.Errorf("loading Caddy's events app: %v", err)
		}
		if err := events.(*caddyevents.App).On("started", configStarted{a}); err != nil {
			return fmt.Errorf("subscribing to Caddy's started event: %v", err)
		}
	}
	if stored, err = a.validateHosts(a.Hosts, stored); err != nil {
		return err
	}
	for _, h := range a.Hosts {
		inst, err := a.newInstance(h, spec.SourceConfig)
		if err != nil {
			return err
		}
		a.streams = append(a.streams, inst)
	}
	for _, h := range stored {
		inst, err := a.newInstance(&h.Stream, spec.SourceAPI)
		if err != nil {
			return err
		}
		inst.setStored(h)
		a.streams = append(a.streams, inst)
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	return a.loadCertificates(cctx)
}

// newInstance acquires the shared state of stream h and, if it is enabled,
// builds its TCP handler chain and joins its UDP relay. On error nothing is
// left acquired.
func (a *App) newInstance(h *spec.Stream, source string) (*instance, error) {
	inst := &instance{cfg: h, source: source, state: streamstate.Acquire(h.ID),
		logger: a.logger.With(zap.Int64("stream_id", h.ID), zap.String("stream", h.DisplayName()))}
	inst.connDone = inst.state.ConnDone
	if !h.Enabled {
		return inst, nil
	}
	inst.sniShared = a.sharesPort(h)
	for _, w := range h.Warnings() {
		inst.logger.Warn("stream setting", zap.String("warning", w))
	}
	inst.port = h.ListenPort
	for p := h.ListenPort + 1; p <= h.LastPort(); p++ {
		inst.more = append(inst.more, &sockets{port: p})
	}
	if h.HasUDP() {
		nat, err := a.natConfig(h, inst.state, inst.logger)
		if err != nil {
			inst.release()
			return nil, fmt.Errorf("%s: %v", spec.StreamLabel(h.ID, h.Name), err)
		}
		for _, sk := range inst.all() {
			sk.nat = nat
			if !h.UpstreamPortFixed {
				sk.nat.PortOffset = sk.port - h.ListenPort
			}
			sk.relay = udpnat.Acquire(inst.state, portStream(h, sk.port).ListenHostPort())
		}
	}
	if h.HasTCP() {
		box, cancel, err := a.buildChain(h)
		if err != nil {
			inst.release()
			return nil, fmt.Errorf("%s: %v", spec.StreamLabel(h.ID, h.Name), err)
		}
		inst.chain.Store(box)
		inst.cancel = cancel
	}
	return inst, nil
}

// limits are the stream's admission settings, which its TCP guard and its
// UDP relay apply through one streamstate.Policy each.
func limits(s *spec.Stream) streamstate.Limits {
	accept, _ := streamstate.ParseProxyAccept(s.AcceptProxyProtocol) // Validate checked it
	return streamstate.Limits{
		Name:                 s.DisplayName(),
		Whitelist:            s.WhitelistCIDRs,
		Blacklist:            s.BlacklistCIDRs,
		MaxConnections:       s.MaxConnections,
		MaxConnectionsPerIP:  s.MaxConnectionsPerIP,
		ConnectionRatePerIP:  s.ConnectionRatePerIP,
		ConnectionRateWindow: s.ConnectionRateWindow(),
		UploadRate:           s.UploadRateBytes,
		DownloadRate:         s.DownloadRateBytes,
		IdleTimeout:          time.Duration(s.IdleTimeoutSeconds) * time.Second,
		LogConnections:       s.LogConnections,

		ProxyAccept:        accept,
		TrustedProxies:     s.TrustedProxyCIDRs,
		ProxyHeaderTimeout: s.ProxyHeaderTimeout(),
	}
}

// natConfig is what the stream's settings say about its UDP NAT entries.
func (a *App) natConfig(s *spec.Stream, st *streamstate.State, logger *zap.Logger) (udpnat.Config, error) {
	p, err := streamstate.NewPolicy(limits(s), logger)
	if err != nil {
		return udpnat.Config{}, err
	}
	var picker *streamstate.Picker
	if len(s.Upstreams) > 0 {
		peers := make([]streamstate.Peer, len(s.Upstreams))
		for i, u := range s.Upstreams {
			peers[i] = streamstate.Peer{Addr: u.HostPort(), Weight: u.Weight, Backup: u.Backup, State: st.Upstream(u.HostPort())}
		}
		if picker, err = streamstate.NewPicker(s.LoadBalancing, peers, s.FailTimeout()); err != nil {
			return udpnat.Config{}, err
		}
	}
	return udpnat.Config{
		Picker:    picker,
		Upstream:  s.UpstreamHostPort(),
		Policy:    p,
		ProxyV2:   s.ProxyProtocolVersion == 2,
		Responses: s.UDPResponses,
		Logger:    logger,
	}, nil
}

// buildChain provisions the stream's aegis_guard, aegis_tls (with TLS)
// and aegis_proxy handlers and compiles them into one layer4 handler,
// with the event loop's way to serve the stream when it takes it
// (l4aegisproxy.NewDirect: no TLS termination, no rate limit, no front
// proxy's header, no TLS to the upstream, no port range, upstreams given
// by IP address); release cleans them up. They are provisioned in the app's context, not
// one of their own: caddy.NewContext makes a metrics registry with Go and
// process collectors, which nothing serves, on every reload and every API
// edit.
func (a *App) buildChain(s *spec.Stream) (box *chainBox, release func(), err error) {
	guard := l4aegisguard.FromLimits(s.ID, limits(s))
	proxy := &l4aegisproxy.Handler{
		Upstream:      s.UpstreamHostPort(),
		StreamID:      s.ID,
		DialTimeout:   caddy.Duration(s.ConnectionTimeout()),
		ProxyProtocol: s.ProxyProtocolVersion,
		HalfClose:     s.HalfClose,
	}
	if s.IsRange() {
		proxy.ListenPort, proxy.FixedPort = s.ListenPort, s.UpstreamPortFixed
	}
	if len(s.Upstreams) > 0 {
		proxy.LoadBalancing = s.LoadBalancing
		proxy.FailTimeout = caddy.Duration(s.FailTimeout())
		for _, u := range s.Upstreams {
			proxy.Upstreams = append(proxy.Upstreams, l4aegisproxy.Upstream{Address: u.HostPort(), Weight: u.Weight, Backup: u.Backup})
		}
	}
	if s.HealthCheckEnabled {
		proxy.HealthCheckInterval = caddy.Duration(s.HealthCheckInterval())
	}
	if s.UpstreamTLS {
		proxy.TLS = &l4aegisproxy.UpstreamTLS{
			ServerName:         s.UpstreamTLSServerName,
			CA:                 s.UpstreamTLSCA,
			ClientCertID:       s.UpstreamTLSClientCertID,
			InsecureSkipVerify: s.UpstreamTLSInsecureSkipVerify,
		}
	}
	handlers := layer4.Handlers{guard}
	// TLS comes after the guard, so the ACL and max_connections are
	// checked before any handshake work.
	if s.SSLEnabled {
		handlers = append(handlers, &l4aegistls.Handler{StreamID: s.ID, CertID: certID(s)})
	}
	handlers = append(handlers, proxy)
	var loaded []caddy.CleanerUpper
	release = func() {
		for i := len(loaded) - 1; i >= 0; i-- {
			_ = loaded[i].Cleanup()
		}
	}
	for _, h := range handlers {
		m := h.(caddy.Module)
		if err := m.(caddy.Provisioner).Provision(a.ctx); err != nil {
			release()
			return nil, nil, fmt.Errorf("provision %s: %v", m.CaddyModule().ID, err)
		}
		loaded = append(loaded, m.(caddy.CleanerUpper))
	}
	box = &chainBox{h: handlers.Compile()}
	if !s.SSLEnabled {
		box.direct = l4aegisproxy.NewDirect(guard.Policy(), guard.State(), proxy)
	}
	return box, release, nil
}

// Start binds every enabled stream and starts serving. If one cannot bind,
// none is left listening and the error names the stream.
func (a *App) Start() error {
	if err := a.start(); err != nil {
		return err
	}
	setCurrent(a)
	startHistory()
	return nil
}

// logBudget logs, once per process, how the open-file limit is shared
// out by default (streamstate.Budget).
var logBudget sync.Once

func (a *App) start() error {
	logBudget.Do(func() {
		b := streamstate.Budget()
		a.logger.Info("file descriptor budget",
			zap.Uint64("open_file_limit", b.Limit), zap.Int("reserve", b.Reserve),
			zap.Int("per_stream", b.PerStream), zap.Int("tcp_connections_per_stream", b.ConnCap),
			zap.Int("udp_entries_per_stream", b.NATCap), zap.Int("udp_entries_per_source", b.NATPerSource),
			zap.Int("tls_handshakes_per_source", streamstate.SourcePart(l4aegistls.DefaultMaxHandshakes)))
	})
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, inst := range a.streams {
		inst.sniShared = a.sharesPort(inst.cfg)
	}
	for _, inst := range a.streams {
		if err := inst.bind(a.ctx); err != nil {
			a.closeListeners()
			return err
		}
	}
	a.certsLive = true
	a.registerCerts(nil)
	for _, inst := range a.streams {
		inst.state.ResetTotals()
		a.serve(inst)
	}
	a.openShared()
	return nil
}

// bind opens the stream's listeners, on every port of its range, if it is
// enabled. On error none is left open, and the error names the port.
func (inst *instance) bind(ctx caddy.Context) error {
	if !inst.cfg.Enabled {
		return nil
	}
	if err := checkOpenFiles(inst.cfg); err != nil {
		return err
	}
	var err error
	for _, sk := range inst.all() {
		ps := portStream(inst.cfg, sk.port)
		switch {
		case inst.cfg.HasTCP() && inst.sniShared:
			inst.sni, err = sniJoin(ctx, ps)
		case inst.cfg.HasTCP():
			sk.ln, err = listen(ctx, ps)
		}
		if err == nil && inst.cfg.HasUDP() {
			sk.udp, sk.pc, err = listenUDP(ctx, ps)
		}
		if err != nil {
			break
		}
	}
	if err != nil {
		inst.closeListeners()
	}
	return err
}

// serveSettings puts the app's settings into the stream's shared state.
func (a *App) serveSettings(inst *instance) {
	inst.state.SetGracePeriod(a.gracePeriod())
	inst.state.SetConnLogger(a.connLogger)
	if a.store != nil {
		inst.state.SetLogSink(a.store.logSink)
	} else {
		inst.state.SetLogSink(nil)
	}
}

// serve starts serving the stream's bound listeners.
func (a *App) serve(inst *instance) {
	if inst.cfg.Enabled {
		inst.state.Enable() // it may have been disabled (replaceInstance)
	}
	a.serveSettings(inst)
	keepUpstreams(inst)
	if !inst.cfg.HealthCheckEnabled || !inst.cfg.Enabled {
		inst.state.ClearHealth()
	}
	if inst.sni != nil && !inst.sniServing {
		a.serveShared(inst)
	}
	for _, sk := range inst.all() {
		if sk.ln != nil {
			inst.state.ListenerUp(streamstate.TCP)
			inst.startAccept(sk)
		}
		if sk.udp != nil {
			sk.relay.SetConfig(sk.nat)
			if err := sk.relay.AddSocket(sk.udp); err != nil {
				inst.logger.Error("serving UDP socket", zap.Int("port", sk.port), zap.Error(err))
			} else {
				sk.serving = true
			}
		}
	}
	if inst.ln != nil || inst.udp != nil || inst.sni != nil {
		fields := []zap.Field{
			zap.Int64("stream_id", inst.cfg.ID),
			zap.String("stream", inst.cfg.DisplayName()),
			zap.String("source", inst.source),
			zap.String("protocol", inst.cfg.EffectiveProtocol()),
			zap.String("listen", inst.cfg.ListenHostPort()),
			zap.String("upstream", inst.cfg.UpstreamHostPort()),
		}
		if inst.cfg.IsRange() {
			fields = append(fields, zap.Int("listen_port_end", inst.cfg.ListenPortEnd))
		}
		if inst.sni != nil {
			fields = append(fields, zap.Strings("sni", inst.cfg.SNI))
		}
		a.logger.Info("stream listening", fields...)
	}
}

// keepUpstreams lets the stream's state forget the upstreams its config
// no longer names.
func keepUpstreams(inst *instance) {
	var addrs []string
	for _, u := range inst.cfg.UpstreamList() {
		addrs = append(addrs, u.HostPort())
	}
	inst.state.KeepUpstreams(addrs)
}

// Stop stops accepting at once. Open connections of streams that the next
// config keeps go on; the others get the grace period when the app's
// modules are cleaned up.
func (a *App) Stop() error {
	// No API write can reach a from here on; one in progress has ended,
	// and closeListeners below closes what it bound.
	writeMu.Lock()
	back := handOver(a)
	writeMu.Unlock()
	stopHistory()
	a.mu.Lock()
	a.closeListeners()
	var certs []int64
	if a.certsLive {
		certs = slices.Collect(maps.Keys(a.certs))
	}
	a.mu.Unlock()
	if back != nil {
		back.reassert(certs)
	}
	return nil
}

// reassert puts this app's settings back into the state it shares with
// other loads of its streams (UDP relay configs, log sinks, grace periods,
// the certificate registry): a newer config that failed to start may have
// changed them. theirs are the certificate ids that config registered.
func (a *App) reassert(theirs []int64) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.registerCerts(theirs)
	for _, inst := range a.streams {
		a.serveSettings(inst)
		for _, sk := range inst.all() {
			if sk.serving {
				sk.relay.SetConfig(sk.nat)
			}
		}
	}
}

// closeListeners stops every stream's listeners.
func (a *App) closeListeners() {
	for _, inst := range a.streams {
		inst.closeListeners()
	}
}

// closeListeners closes the TCP listener and the UDP socket and waits for
// their loops. A UDP socket that the relay serves is taken from it first,
// so replies move to a newer socket of the same address if one was bound
// meanwhile (a reload, an edit).
func (inst *instance) closeListeners() {
	inst.leaveShared()
	for _, sk := range inst.all() {
		ps := portStream(inst.cfg, sk.port)
		if sk.ln != nil {
			sk.ln.Close()
			sk.closeAccepter()
			unbind(ps, "tcp")
			sk.ln = nil
			if sk.done != nil {
				close(sk.stop)
				<-sk.done
				sk.done = nil
				inst.state.ListenerDown(streamstate.TCP)
			}
		}
		if sk.udp != nil {
			if sk.serving {
				sk.relay.RemoveSocket(sk.udp, sk.pc.Close)
			} else {
				sk.pc.Close()
			}
			unbind(ps, "udp")
			sk.udp, sk.pc, sk.serving = nil, nil, false
		}
	}
}

// closeOwnTCP closes the stream's own TCP listener (of its first port)
// and waits for its accept loop: the stream moved to a shared port.
func (inst *instance) closeOwnTCP() {
	if inst.ln == nil {
		return
	}
	inst.ln.Close()
	inst.closeAccepter()
	unbind(inst.cfg, "tcp")
	inst.ln = nil
	if inst.done != nil {
		close(inst.stop)
		<-inst.done
		inst.done = nil
		inst.state.ListenerDown(streamstate.TCP)
	}
}

// release unloads the stream's handler chain and lets go of its relay and
// shared state; the last user of a stream closes its remaining
// connections.
func (inst *instance) release() {
	if inst.cancel != nil {
		inst.cancel()
		inst.cancel = nil
	}
	// A relay that goes away closes its NAT entries at once: with its
	// sockets closed, no reply could reach the clients.
	for _, sk := range inst.all() {
		if sk.relay != nil {
			udpnat.Release(sk.relay)
			sk.relay = nil
		}
	}
	if !inst.released {
		inst.released = true
		streamstate.Release(inst.cfg.ID)
	}
}

// Cleanup unloads the handler chains and lets go of the streams' shared
// state and the storage.
func (a *App) Cleanup() error {
	// The store is let go of last and outside a.mu: its follower may wait
	// for a.mu, and closing the store waits for the follower.
	defer a.releaseStore()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.closeListeners() // normally done by Stop; not if Start failed
	// Streams that go away each wait out their grace period: together,
	// so that stopping N busy streams takes one grace period, not N.
	var wg sync.WaitGroup
	for _, inst := range a.streams {
		wg.Go(inst.release)
	}
	wg.Wait()
	a.streams = nil
	a.cleanedUp = true
	return nil
}

// releaseStore lets go of the app's storage.
func (a *App) releaseStore() {
	a.mu.Lock()
	store := a.store
	a.store = nil
	a.mu.Unlock()
	if store != nil {
		store.release()
	}
}

// startAccept runs the accept loop of sk.ln until closeListeners.
func (inst *instance) startAccept(sk *sockets) {
	sk.done = make(chan struct{})
	sk.stop = make(chan struct{})
	sk.accMu.Lock()
	sk.accClosed = false
	sk.accMu.Unlock()
	go inst.accept(sk, sk.ln, sk.stop, sk.done)
}

// accepter is the accept4 of sk's listener ln, made at its first use:
// nil if ln has no TCP socket to take (then the chain serves every
// connection) or closeListeners closed it.
func (sk *sockets) accepter(ln net.Listener) *l4aegisproxy.Accepter {
	sk.accMu.Lock()
	defer sk.accMu.Unlock()
	if sk.acc == nil && !sk.accClosed {
		if tl := tcpListener(ln); tl != nil {
			sk.acc, _ = l4aegisproxy.NewAccepter(tl)
		}
	}
	return sk.acc
}

// closeAccepter closes the accept4's descriptor of the listener, after
// the listener: the accept loop's wait returns.
func (sk *sockets) closeAccepter() {
	sk.accMu.Lock()
	defer sk.accMu.Unlock()
	sk.accClosed = true
	if sk.acc != nil {
		sk.acc.Close()
		sk.acc = nil
	}
}

// accept runs the stream's accept loop of one listener until it is
// closed, or stop is while it waits to try again. While the stream's
// current chain has a direct path (chainBox.direct), connections are
// taken from the socket with accept4 by an event loop (Accepter.Run) and
// served there, with no goroutine of their own; otherwise each is a
// net.Conn that serve runs through the chain on a goroutine. The path is
// chosen again after each batch the loop takes, and after each wait in
// ln.Accept; each connection checks the chain it finds.
func (inst *instance) accept(sk *sockets, ln net.Listener, stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	var acc *l4aegisproxy.Accepter // made at the first direct accept
	direct := true                 // until ln turns out to have no socket to take
	var backoff time.Duration
	for {
		var err error
		if box := inst.chain.Load(); box != nil && box.direct != nil && direct {
			if acc == nil {
				if acc = sk.accepter(ln); acc == nil {
					direct = false
					continue
				}
			}
			err = acc.Run(func(got []l4aegisproxy.Accepted) bool { return inst.serveAccepted(acc, got) })
		} else {
			var c net.Conn
			if c, err = ln.Accept(); err == nil {
				inst.state.ConnStarted()
				go inst.serve(c)
			}
		}
		if err == nil {
			backoff = 0
			continue
		}
		if errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed) {
			return
		}
		// Out of file descriptors or similar: wait, then go on. The
		// wait ends when the listener closes: an API write waits for
		// this loop, holding the app's lock.
		backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
		inst.logger.Error("accepting connection", zap.Error(err), zap.Duration("retry_in", backoff))
		t := time.NewTimer(backoff)
		select {
		case <-stop:
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// serveAccepted serves connections that an event loop took from the
// listener's socket: each on the event loop, or through the chain if the
// stream's settings changed meanwhile so that it needs it. False: the
// chain serves the next ones, and the accept loop takes them from ln.
func (inst *instance) serveAccepted(acc *l4aegisproxy.Accepter, got []l4aegisproxy.Accepted) bool {
	for _, a := range got {
		inst.state.ConnStarted()
		if box := inst.chain.Load(); box != nil && box.direct != nil {
			box.direct.Serve(acc, a, inst.connDone)
			continue
		}
		c, cerr := a.Conn() // it closes a's socket, even when it fails
		if cerr != nil {
			inst.state.ConnDone()
			continue
		}
		go inst.serve(c)
	}
	box := inst.chain.Load()
	return box != nil && box.direct != nil
}

// serve runs one connection through the stream's current handler chain.
// A relay may park a quiet connection and let the chain return before it
// ends (streamstate.DetachVar): the relay then closes c and calls
// ConnDone itself (streamstate.Session.Finish).
func (inst *instance) serve(c net.Conn) {
	cx := layer4.WrapConnection(c, nil, inst.logger)
	cx.SetVar(streamstate.DetachVar, inst.connDone)
	if err := inst.chain.Load().h.Handle(cx); err != nil {
		inst.logger.Debug("handling connection", zap.Error(err))
	}
	if ss, _ := cx.GetVar(streamstate.SessionVar).(*streamstate.Session); ss != nil && ss.Detached() {
		return
	}
	c.Close()
	inst.state.ConnDone()
}

// reservedPorts finds the ports Caddy itself uses in this config.
func reservedPorts(ctx caddy.Context) []reservedPort {
	var out []reservedPort
	// The admin endpoint's port in this config (2019 unless admin says
	// otherwise, on any host), none when it is off or on a unix socket.
	if na, ok := adminListenAddress(ctx); ok {
		out = append(out, reservedPort{Port: int(na.StartPort), Owner: "Caddy's admin endpoint"})
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
