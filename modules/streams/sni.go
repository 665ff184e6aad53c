package streams

// Ports that TCP streams share, told apart by the server name of each
// connection's TLS ClientHello (the streams' sni settings). A shared port
// has one listener, kept in a process-wide registry by listen address, so
// that adding, changing or removing one of its streams, or a reload,
// keeps the socket while the other streams' connections go on. Each
// connection is read up to its ClientHello (bounded: sniHelloTimeout and
// maxHelloBytes), its server name picks the stream, and the stream's own
// chain runs on it from its first byte (the bytes read are replayed):
// its ACL, limits, TLS termination or passthrough, PROXY header and log.

import (
	"errors"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// sniHelloTimeout bounds the wait for a client's ClientHello.
const sniHelloTimeout = 5 * time.Second

// sniPorts are the shared ports by listen address (host:port).
var sniPorts = struct {
	sync.Mutex
	m map[string]*sniPort
}{m: map[string]*sniPort{}}

// sniPort is one shared listener and the streams on it.
type sniPort struct {
	key  string       // host:port
	cfg  *spec.Stream // the settings it was bound with, to unbind
	ln   net.Listener
	refs int // instances that joined and have not left; guarded by sniPorts
	stop chan struct{}
	done chan struct{}
	// opened starts accepting (open), once the streams that share the port
	// have joined: until then connections wait in the listen queue, not
	// routed with a table that lacks some of them.
	opened sync.Once

	// mu is held for reading from a connection's pick of its stream to
	// the stream's ConnStarted, and for writing to change the members: a
	// stream that left gets no connection after.
	mu      sync.RWMutex
	members []*instance // in the order they joined; guarded by mu
	table   atomic.Pointer[sniTable]

	noMatch atomic.Uint64
	lastLog atomic.Int64 // unix nanoseconds of the last sni_no_match line
	logger  atomic.Pointer[zap.Logger]
}

// sniTable routes server names to the streams of a shared port.
type sniTable struct {
	exact map[string]*instance
	wild  map[string]*instance // by the name under "*."
	def   *instance            // the stream without sni, if any
	names bool                 // some stream has sni: read ClientHellos
}

// pick returns the stream for server name name ("" for none).
func (t *sniTable) pick(name string) *instance {
	if name != "" {
		if inst := t.exact[name]; inst != nil {
			return inst
		}
		if _, parent, ok := strings.Cut(name, "."); ok {
			if inst := t.wild[parent]; inst != nil {
				return inst
			}
		}
	}
	return t.def
}

// sniJoin returns the shared port of s's address, binding it on first
// use. Pair it with leave.
func sniJoin(ctx caddy.Context, s *spec.Stream) (*sniPort, error) {
	key := s.ListenHostPort()
	sniPorts.Lock()
	defer sniPorts.Unlock()
	if p := sniPorts.m[key]; p != nil {
		p.refs++
		return p, nil
	}
	ln, err := listen(ctx, s)
	if err != nil {
		return nil, err
	}
	p := &sniPort{key: key, cfg: s, ln: ln, refs: 1, stop: make(chan struct{}), done: make(chan struct{})}
	p.table.Store(&sniTable{})
	sniPorts.m[key] = p
	return p, nil
}

// open starts accepting connections, once; the app calls it when every
// stream on the port has joined (App.openShared).
func (p *sniPort) open() {
	p.opened.Do(func() { go p.accept() })
}

// sniShared reports whether the port of s's address is a shared one now.
func sniShared(s *spec.Stream) bool {
	sniPorts.Lock()
	defer sniPorts.Unlock()
	_, ok := sniPorts.m[s.ListenHostPort()]
	return ok
}

// leave drops one reference; the last closes the listener.
func (p *sniPort) leave() {
	sniPorts.Lock()
	p.refs--
	last := p.refs == 0
	if last {
		delete(sniPorts.m, p.key)
	}
	sniPorts.Unlock()
	if last {
		p.open() // its accept loop ends on the closed listener, and closes done
		p.ln.Close()
		unbind(p.cfg, "tcp")
		close(p.stop)
		<-p.done
	}
}

// add makes inst one of the port's streams; logger writes its
// sni_no_match lines.
func (p *sniPort) add(inst *instance, logger *zap.Logger) {
	p.logger.Store(logger)
	p.mu.Lock()
	p.members = append(p.members, inst)
	p.rebuild()
	p.mu.Unlock()
}

// remove takes inst off the port's streams.
func (p *sniPort) remove(inst *instance) {
	p.mu.Lock()
	for i, m := range p.members {
		if m == inst {
			p.members = append(p.members[:i], p.members[i+1:]...)
			break
		}
	}
	p.rebuild()
	p.mu.Unlock()
}

// update takes a member's new sni (an edit in place).
func (p *sniPort) update() {
	p.mu.Lock()
	p.rebuild()
	p.mu.Unlock()
}

// rebuild makes the routing table of the members; a later member (a newer
// load of a stream) takes a name before an earlier one. The caller holds
// mu for writing.
func (p *sniPort) rebuild() {
	t := &sniTable{exact: map[string]*instance{}, wild: map[string]*instance{}}
	for _, m := range p.members {
		if len(m.cfg.SNI) == 0 {
			t.def = m
			continue
		}
		t.names = true
		for _, n := range m.cfg.SNI {
			n = strings.ToLower(n)
			if rest, ok := strings.CutPrefix(n, "*."); ok {
				t.wild[rest] = m
			} else {
				t.exact[n] = m
			}
		}
	}
	p.table.Store(t)
}

// accept runs the shared listener's accept loop until it is closed.
func (p *sniPort) accept() {
	defer close(p.done)
	var backoff time.Duration
	for {
		c, err := p.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			if l := p.logger.Load(); l != nil {
				l.Error("accepting connection", zap.String("listen", p.key), zap.Error(err), zap.Duration("retry_in", backoff))
			}
			t := time.NewTimer(backoff)
			select {
			case <-p.stop:
				t.Stop()
				return
			case <-t.C:
			}
			continue
		}
		backoff = 0
		go p.route(c)
	}
}

// route reads the connection's ClientHello, when some stream of the port
// has sni, and hands the connection to the stream it names: the default
// stream when it names none, or none that matches, or sends no TLS.
// Without one, the connection is closed (sni_no_match).
func (p *sniPort) route(c net.Conn) {
	var name string
	var read []byte
	if p.table.Load().names {
		_ = c.SetReadDeadline(time.Now().Add(sniHelloTimeout))
		var err error
		name, read, err = readClientHello(c)
		_ = c.SetReadDeadline(time.Time{})
		if err != nil {
			name = "" // no TLS: the default stream
		}
	}
	p.mu.RLock()
	inst := p.table.Load().pick(name)
	if inst != nil {
		inst.state.ConnStarted()
	}
	p.mu.RUnlock()
	if inst == nil {
		p.refuse(c, name)
		return
	}
	if len(read) > 0 {
		c = &replayConn{Conn: c, buf: read}
	}
	inst.serve(c)
}

// refuse closes a connection that no stream takes, counts it and logs it,
// at most once a second with the count so far.
func (p *sniPort) refuse(c net.Conn, name string) {
	n := p.noMatch.Add(1)
	src := c.RemoteAddr().String()
	c.Close()
	now := time.Now().UnixNano()
	last := p.lastLog.Load()
	if now-last < int64(time.Second) || !p.lastLog.CompareAndSwap(last, now) {
		return
	}
	if l := p.logger.Load(); l != nil {
		l.Info("connection", zap.String("listen", p.key), zap.String("source", src), zap.String("sni", name),
			zap.String("protocol", "tcp"), zap.String("action", "blocked"), zap.String("disconnect_reason", "sni_no_match"),
			zap.Uint64("sni_no_match_total", n))
	}
}

// SNINoMatch is the number of connections to shared port listen
// (host:port) that no stream took, or 0 if it is not a shared port.
func SNINoMatch(listen string) uint64 {
	sniPorts.Lock()
	defer sniPorts.Unlock()
	if p := sniPorts.m[listen]; p != nil {
		return p.noMatch.Load()
	}
	return 0
}

// replayConn gives the bytes read to pick the stream before the rest of
// the connection.
type replayConn struct {
	net.Conn
	buf []byte
}

func (c *replayConn) Read(b []byte) (int, error) {
	if len(c.buf) > 0 {
		n := copy(b, c.buf)
		c.buf = c.buf[n:]
		return n, nil
	}
	return c.Conn.Read(b)
}

// CloseWrite passes a half-close on.
func (c *replayConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return errors.ErrUnsupported
}

// sharesPort reports whether stream s listens on a shared port: it has
// sni, another enabled stream of its address has, or the port is shared
// already (a stream with sni left it: the socket stays).
func (a *App) sharesPort(s *spec.Stream) bool {
	if !s.Enabled || s.EffectiveProtocol() != spec.ProtocolTCP || s.IsRange() {
		return false
	}
	if len(s.SNI) > 0 {
		return true
	}
	for _, o := range a.streams {
		if o.cfg.ID != s.ID && o.cfg.Enabled && len(o.cfg.SNI) > 0 && sharesBySNI(s, o.cfg) {
			return true
		}
	}
	return sniShared(s)
}

// rehomeSNI moves the running streams that now share their port (a stream
// with sni came to it) from their own listener to the shared one: the
// shared socket serves before their own closes. The caller holds a.mu.
func (a *App) rehomeSNI() {
	for _, inst := range a.streams {
		if inst.sni != nil || inst.ln == nil || !a.sharesPort(inst.cfg) {
			continue
		}
		p, err := sniJoin(a.ctx, inst.cfg)
		if err != nil {
			inst.logger.Error("moving to the shared port", zap.Error(err))
			continue
		}
		inst.sni, inst.sniShared = p, true
		a.serveShared(inst)
		inst.closeOwnTCP()
	}
	a.openShared()
}

// openShared starts accepting on every shared port of the app's streams,
// once they have all joined it: after the streams are served (Start),
// and after a new or moved stream and those already on its port have
// (rehomeSNI). A stream that makes a port shared joins it when it is
// bound, inside its store transaction; the streams already on the port
// join after the commit: accepting before would route their clients with
// a table that lacks them (sni_no_match).
func (a *App) openShared() {
	for _, inst := range a.streams {
		if inst.sni != nil && inst.sniServing {
			inst.sni.open()
		}
	}
}

// serveShared makes inst one of its shared port's streams.
func (a *App) serveShared(inst *instance) {
	inst.state.ListenerUp(streamstate.TCP)
	inst.sni.add(inst, a.connLogger)
	inst.sniServing = true
}

// leaveShared takes inst off its shared port.
func (inst *instance) leaveShared() {
	if inst.sni == nil {
		return
	}
	if inst.sniServing {
		inst.sni.remove(inst)
		inst.state.ListenerDown(streamstate.TCP)
		inst.sniServing = false
	}
	inst.sni.leave()
	inst.sni = nil
}
