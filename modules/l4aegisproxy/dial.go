package l4aegisproxy

// The TCP upstream dialer: which upstream a connection goes to
// (streamstate.Picker), failover to the next one when a dial fails, and
// the health checks of each upstream.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/mholt/caddy-l4/layer4"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// DefaultFailTimeout is how long an upstream whose dial failed is skipped
// when no FailTimeout is set.
const DefaultFailTimeout = streamstate.DefaultFailTimeout

// Upstream is one of several upstreams.
type Upstream struct {
	// Address is host:port. Required.
	Address string `json:"address"`
	// Weight is its share of the connections, 1-100. Default: 0, meaning 1.
	Weight int `json:"weight,omitempty"`
	// Backup upstreams get connections only while no other one is up.
	Backup bool `json:"backup,omitempty"`
}

// newPicker makes the picker of the handler's upstreams (Upstream alone
// when Upstreams is empty), each with its state in the stream's.
func (h *Handler) newPicker() error {
	ups := h.Upstreams
	if len(ups) == 0 {
		ups = []Upstream{{Address: h.Upstream}}
	}
	peers := make([]streamstate.Peer, len(ups))
	h.hosts, h.ports = make([]string, len(ups)), make([]int, len(ups))
	for i, u := range ups {
		peers[i] = streamstate.Peer{Addr: u.Address, Weight: u.Weight, Backup: u.Backup, State: h.state.Upstream(u.Address)}
		host, port, _ := net.SplitHostPort(u.Address)
		h.hosts[i] = host
		h.ports[i], _ = strconv.Atoi(port)
	}
	failFor := time.Duration(h.FailTimeout)
	if failFor == 0 {
		failFor = DefaultFailTimeout
	}
	p, err := streamstate.NewPicker(h.LoadBalancing, peers, failFor)
	if err != nil {
		return err
	}
	h.picker = p
	return nil
}

// dialPicked connects to an upstream picked for the connection's client,
// trying the next one not yet tried when a dial fails, until every one
// was tried or the dial timeout, which bounds the whole attempt, runs out.
// A failed upstream is skipped by new connections for the fail timeout.
//
// Not Dialer.DialTCP, though it would skip name resolution for an IP
// upstream: it turns a zero local address into a bind to port 0 before the
// connect, and bind cannot reuse the ports that closed connections hold in
// TIME_WAIT, so a burst of short connections runs out of ports.
// It returns the connection and the upstream's index in the picker.
func (h *Handler) dialPicked(ctx context.Context, cx *layer4.Connection, ss *streamstate.Session, start time.Time) (net.Conn, int, error) {
	var client netip.Addr
	if ss != nil {
		client = ss.Source.Addr()
	} else if a, ok := cx.RemoteAddr().(*net.TCPAddr); ok {
		client = a.AddrPort().Addr()
	}
	// On a port range, port ListenPort + k goes to each upstream's port +
	// k, or to its own port with FixedPort.
	k := 0
	if h.ListenPort > 0 {
		if a, ok := cx.LocalAddr().(*net.TCPAddr); ok {
			if !h.FixedPort {
				k = a.Port - h.ListenPort
			}
			if ss != nil {
				ss.SetListenPort(a.Port)
			}
		}
	}
	p := h.picker
	if p.Len() == 1 {
		peer := p.Peer(0)
		c, err := h.dialer.DialContext(ctx, "tcp", h.address(0, k))
		if err != nil {
			if ctx.Err() == nil {
				p.Failed(0, err)
			}
			return nil, -1, err
		}
		peer.State.Reached()
		return c, 0, nil
	}
	d := h.dialer
	d.Deadline = start.Add(d.Timeout)
	var tried streamstate.Tried
	var err error
	for {
		i := p.Pick(client, tried)
		if i < 0 {
			return nil, -1, err
		}
		tried.Add(i)
		peer := p.Peer(i)
		c, derr := d.DialContext(ctx, "tcp", h.address(i, k))
		if derr == nil {
			peer.State.Reached()
			return c, i, nil
		}
		err = derr
		if ctx.Err() != nil {
			return nil, -1, err
		}
		p.Failed(i, err)
		h.logger.Debug("dialing upstream; trying the next", zap.String("upstream", peer.Addr), zap.Error(err))
		if !time.Now().Before(d.Deadline) {
			return nil, -1, err
		}
	}
}

// address is the address to dial upstream i at for port offset k.
func (h *Handler) address(i, k int) string {
	if k <= 0 {
		return h.picker.Peer(i).Addr
	}
	return net.JoinHostPort(h.hosts[i], strconv.Itoa(h.ports[i]+k))
}

// healthLoop checks every upstream each interval and records the outcome,
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

// checkHealth checks each upstream once, marks each up or down on its
// own, and records the stream as healthy while one of them is.
func (h *Handler) checkHealth(ctx context.Context) {
	n := h.picker.Len()
	round := h.state.HealthRound()
	res := streamstate.Health{LastCheck: time.Now()}
	var errs []string
	for i := range n {
		peer := h.picker.Peer(i)
		err := h.checkOne(ctx, i)
		if ctx.Err() != nil {
			return
		}
		ph := streamstate.Health{Healthy: err == nil, LastCheck: time.Now()}
		if err != nil {
			ph.LastError = err.Error()
			if n > 1 {
				errs = append(errs, peer.Addr+": "+ph.LastError)
			} else {
				errs = append(errs, ph.LastError)
			}
		}
		prev := peer.State.Health()
		if !h.state.RecordHealth(round, peer.State, ph) {
			return // checks were turned off meanwhile
		}
		res.Healthy = res.Healthy || ph.Healthy
		if prev == nil || prev.Healthy != ph.Healthy {
			if ph.Healthy {
				h.logger.Info("upstream healthy", zap.Int64("stream_id", h.StreamID), zap.String("upstream", peer.Addr))
			} else {
				h.logger.Warn("upstream unhealthy", zap.Int64("stream_id", h.StreamID), zap.String("upstream", peer.Addr), zap.String("error", ph.LastError))
			}
		}
	}
	res.LastError = strings.Join(errs, "; ")
	h.state.RecordHealth(round, nil, res)
}

// checkOne dials upstream i once. With ProxyProtocol it sends the LOCAL
// header on the connection (as HAProxy's check-send-proxy), so that an
// upstream that reads PROXY headers sees a proper connection instead of a
// broken header on every check; with TLS it does the handshake.
func (h *Handler) checkOne(ctx context.Context, i int) error {
	c, err := h.dialer.DialContext(ctx, "tcp", h.picker.Peer(i).Addr)
	if err != nil {
		return err
	}
	defer c.Close()
	if ctx.Err() != nil {
		return errors.New("stopped")
	}
	if h.checkHeader != nil {
		_ = c.SetWriteDeadline(time.Now().Add(h.dialer.Timeout))
		if _, werr := c.Write(h.checkHeader); werr != nil {
			return fmt.Errorf("sending the PROXY header: %w", werr)
		}
	}
	if h.tlsConfigs != nil {
		tc, err := handshakeUpstream(ctx, c, h.tlsConfigs[i], h.dialer.Timeout)
		if err != nil {
			return err
		}
		_ = tc.SetWriteDeadline(time.Now().Add(h.dialer.Timeout))
		_ = tc.Close() // close_notify, then the socket
	}
	return nil
}
