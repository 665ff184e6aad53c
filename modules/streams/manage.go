package streams

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// find returns the instance of stream id, or nil. The caller holds a.mu.
func (a *App) find(id int64) *instance {
	for _, inst := range a.streams {
		if inst.cfg.ID == id {
			return inst
		}
	}
	return nil
}

// setStored takes the times and version of inst's stored host h.
func (inst *instance) setStored(h storage.Stored) {
	inst.created, inst.updated, inst.version = h.CreatedAt, h.UpdatedAt, h.Version
}

// currentVersion is inst's HostStatus.Version: the stored version of an API
// stream, the settings' hash of a config stream.
func (inst *instance) currentVersion() string {
	if inst.source == spec.SourceAPI && inst.version > 0 {
		return strconv.FormatInt(inst.version, 10)
	}
	return versionOf(inst.cfg)
}

// versionOf is the version of a config stream's settings: 24 hex digits of
// the SHA-256 of their JSON.
func versionOf(s *spec.Stream) string {
	b, err := json.Marshal(s)
	if err != nil {
		panic(err) // plain fields: cannot fail
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:12])
}

// Precondition vets a write to a stream that exists, given the stream's
// current version (HostStatus.Version). It runs under the lock every write
// holds, so no other write comes between the check and this one. An error
// it returns ends the write with that error, and nothing changes.
type Precondition func(version string) error

// checkPre runs the preconditions against inst's version.
func checkPre(inst *instance, pre []Precondition) error {
	if len(pre) == 0 {
		return nil
	}
	v := inst.currentVersion()
	for _, p := range pre {
		if err := p(v); err != nil {
			return err
		}
	}
	return nil
}

func (inst *instance) hostStatus() spec.HostStatus {
	cp := *inst.cfg
	hs := spec.HostStatus{Stream: &cp, Source: inst.source, Version: inst.currentVersion(), Status: StatusOf(inst.cfg, inst.state)}
	if inst.source == spec.SourceAPI && !inst.created.IsZero() {
		hs.CreatedAt, hs.UpdatedAt = jsontime.Ptr(inst.created), jsontime.Ptr(inst.updated)
	}
	return hs
}

// HostStatuses returns every stream host with its runtime status: the
// config's in config order, then the stored ones by id.
func (a *App) HostStatuses() []spec.HostStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]spec.HostStatus, 0, len(a.streams))
	peers, cluster := a.clusterTotals()
	for _, inst := range a.streams {
		hs := inst.hostStatus()
		if cluster {
			hs = withTotals(hs, peers)
		}
		out = append(out, hs)
	}
	return out
}

// Statuses returns every stream's runtime status, in the same order.
func (a *App) Statuses() []spec.Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]spec.Status, 0, len(a.streams))
	for _, inst := range a.streams {
		out = append(out, StatusOf(inst.cfg, inst.state))
	}
	return out
}

// HostStatus returns stream id with its status, or ErrNotFound.
func (a *App) HostStatus(id int64) (spec.HostStatus, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	inst := a.find(id)
	if inst == nil {
		return spec.HostStatus{}, fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	}
	return a.hostStatus(inst), nil
}

// nextID is an id above every stream's. The caller holds a.mu.
func (a *App) nextID() int64 {
	var top int64
	for _, inst := range a.streams {
		top = max(top, inst.cfg.ID)
	}
	return top + 1
}

// checkNew validates s as a stream about to run next to the others, and
// publishes the certificate it terminates TLS with.
func (a *App) checkNew(ctx context.Context, s *spec.Stream) error {
	if err := s.Validate(); err != nil {
		return err
	}
	if err := a.validateListen(s); err != nil {
		return err
	}
	if s.SSLCertTag != "" || s.SSLDomain != "" {
		field, value := "ssl_cert_tag", s.SSLCertTag
		if s.SSLDomain != "" {
			field, value = "ssl_domain", s.SSLDomain
		}
		return &spec.FieldError{ID: s.ID, Name: s.Name, Field: field, Value: value,
			Reason: "only for streams in the Caddy config; through the API, store the certificate (POST /api/v1/certificates, with domains for one Caddy manages) and use ssl_cert_id"}
	}
	// An enabled stream's certificates are published for its handshakes; a
	// disabled stream's must exist all the same, or a certificate uploaded
	// later would take the ID and become its own.
	check := a.checkCert
	if !s.Enabled {
		check = a.certExists
	}
	if s.SSLEnabled && s.HasTCP() {
		if err := check(ctx, s.SSLCertID); err != nil {
			return &spec.FieldError{ID: s.ID, Name: s.Name, Field: "ssl_cert_id", Value: s.SSLCertID, Reason: err.Error()}
		}
	}
	if id := s.UpstreamTLSClientCertID; s.UpstreamTLS && id > 0 {
		if err := check(ctx, id); err != nil {
			return &spec.FieldError{ID: s.ID, Name: s.Name, Field: "upstream_tls_client_cert_id", Value: id, Reason: err.Error()}
		}
	}
	return nil
}

// CreateHost stores a new stream and starts it: it ends stored and
// listening (or stored and disabled), or fails and leaves nothing behind.
// An id of 0 takes the next free one.
func CreateHost(ctx context.Context, s spec.Stream) (spec.HostStatus, error) {
	var out spec.HostStatus
	auto := s.ID == 0
	err := withRunning(func(a *App) error {
		try := s // createHost sets the id it takes
		var err error
		out, err = a.createHost(ctx, &try)
		return err
	})
	if auto {
		spec.MarkNew(err)
	}
	return out, err
}

func (a *App) createHost(ctx context.Context, s *spec.Stream) (spec.HostStatus, error) {
	if a.store == nil {
		return spec.HostStatus{}, spec.ErrNoStorage
	}
	if s.ID == 0 {
		// Above every running stream and every id storage ever gave out:
		// a deleted stream's id (and its log) is not reused.
		top, err := highestHostID(ctx, a.store.db)
		if err != nil {
			return spec.HostStatus{}, storeError(err)
		}
		s.ID = max(a.nextID(), top+1)
	}
	if other := a.find(s.ID); other != nil {
		from := "declared in the Caddy config"
		if other.source == spec.SourceAPI {
			from = "created through the API"
		}
		return spec.HostStatus{}, fmt.Errorf("%w: id %d is taken by %s, %s; leave id out to get the next free id, or choose another",
			spec.ErrConflict, s.ID, spec.StreamLabel(other.cfg.ID, other.cfg.Name), from)
	}
	if err := a.checkNew(ctx, s); err != nil {
		return spec.HostStatus{}, err
	}
	var inst *instance
	stored, err := a.store.db.CreateHost(ctx, *s, func(storage.Stored) error {
		var err error
		inst, err = a.newInstance(s, spec.SourceAPI)
		if err != nil {
			return err
		}
		if err := inst.bind(a.ctx); err != nil {
			inst.release()
			inst = nil
			return err
		}
		return nil
	})
	if err != nil {
		if inst != nil { // the commit failed after the stream was bound
			inst.closeListeners()
			inst.release()
		}
		return spec.HostStatus{}, storeError(err)
	}
	createdHook()
	inst.setStored(stored)
	a.serve(inst)
	a.streams = append(a.streams, inst)
	a.rehomeSNI()
	inst.logger.Info("stream created")
	return a.hostStatus(inst), nil
}

// createdHook runs as a created stream is stored and bound, before it serves:
// a test's hook.
var createdHook = func() {}

// highestHostID is the highest id db ever gave a host, if it tells.
func highestHostID(ctx context.Context, db storage.Store) (int64, error) {
	if h, ok := db.(interface {
		HighestHostID(context.Context) (int64, error)
	}); ok {
		return h.HighestHostID(ctx)
	}
	return 0, nil
}

// UpdateHost replaces the settings of stored stream id. When the protocol,
// address and port stay and it stays enabled, the listening sockets stay:
// no connection attempt is refused, new connections get the new settings
// and open ones keep theirs. Otherwise new sockets are bound before the
// old ones close. Disabling closes its open connections
// (stream_disabled). Preconditions, if any, run first (see Precondition).
func UpdateHost(ctx context.Context, id int64, s spec.Stream, pre ...Precondition) (spec.HostStatus, error) {
	return UpdateHostFunc(ctx, id, func(spec.Stream) (spec.Stream, error) { return s, nil }, pre...)
}

// UpdateHostFunc is UpdateHost with the new settings made by build from the
// stream's current ones, under the lock every write holds, after the
// preconditions: a partial update (PATCH) cannot lose a write that came
// between reading the stream and changing it. An error of build ends the
// write with that error, and nothing changes.
func UpdateHostFunc(ctx context.Context, id int64, build func(current spec.Stream) (spec.Stream, error), pre ...Precondition) (spec.HostStatus, error) {
	var out spec.HostStatus
	err := withRunning(func(a *App) error {
		var err error
		out, err = a.updateHost(ctx, id, build, pre)
		return err
	})
	return out, err
}

func (a *App) updateHost(ctx context.Context, id int64, build func(spec.Stream) (spec.Stream, error), pre []Precondition) (spec.HostStatus, error) {
	old := a.find(id)
	switch {
	case old == nil:
		return spec.HostStatus{}, fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	case old.source == spec.SourceConfig:
		return spec.HostStatus{}, fmt.Errorf("%s: %w; change it in the config and reload", spec.StreamLabel(id, old.cfg.Name), spec.ErrReadOnly)
	case a.store == nil:
		return spec.HostStatus{}, spec.ErrNoStorage
	}
	if err := checkPre(old, pre); err != nil {
		return spec.HostStatus{}, err
	}
	cur := *old.cfg
	cur.WhitelistCIDRs, cur.BlacklistCIDRs = slices.Clone(cur.WhitelistCIDRs), slices.Clone(cur.BlacklistCIDRs)
	ns, err := build(cur)
	if err != nil {
		return spec.HostStatus{}, err
	}
	s := &ns
	if s.ID != 0 && s.ID != id {
		return spec.HostStatus{}, &spec.FieldError{ID: id, Name: s.Name, Field: "id", Value: s.ID, Reason: fmt.Sprintf("does not match the stream's id %d in the path; the id cannot change", id)}
	}
	s.ID = id
	if err := a.checkNew(ctx, s); err != nil {
		return spec.HostStatus{}, err
	}
	sameSockets := a.sameSockets(old, s)

	var next *instance // sockets change: an instance of its own
	var swap *instance // sockets stay: the new chain and relay config
	stored, err := a.store.db.UpdateHost(ctx, *s, func(_, _ storage.Stored) error {
		var err error
		if sameSockets {
			swap, err = a.newInstance(s, spec.SourceAPI)
			return err
		}
		next, err = a.newInstance(s, spec.SourceAPI)
		if err != nil {
			return err
		}
		if err := next.bind(a.ctx); err != nil {
			next.release()
			next = nil
			return err
		}
		return nil
	})
	if err != nil {
		if next != nil {
			next.closeListeners()
			next.release()
		}
		if swap != nil {
			swap.release()
		}
		return spec.HostStatus{}, storeError(err)
	}

	if sameSockets {
		a.swapInPlace(old, swap, stored)
		return a.hostStatus(old), nil
	}
	a.replaceInstance(old, next, stored)
	return a.hostStatus(next), nil
}

// sameSockets reports whether a stream that changes from old to s keeps
// its listening sockets: it stays enabled on the same protocol, address
// and port.
func (a *App) sameSockets(old *instance, s *spec.Stream) bool {
	o := old.cfg
	return o.Enabled && s.Enabled &&
		o.EffectiveProtocol() == s.EffectiveProtocol() &&
		o.ListenAddress == s.ListenAddress && o.ListenPort == s.ListenPort &&
		o.LastPort() == s.LastPort() && old.sniShared == a.sharesPort(s)
}

// swapInPlace gives old, which keeps its sockets, the chain and relay
// config of spare (an unbound instance of the stored host h); spare takes
// the old chain away to be unloaded. No connection attempt is refused,
// and open connections keep the settings they started with.
func (a *App) swapInPlace(old, spare *instance, h storage.Stored) {
	s := spare.cfg
	if box := spare.chain.Load(); box != nil {
		prev := old.chain.Swap(box)
		spare.chain.Store(prev)
	}
	old.cancel, spare.cancel = spare.cancel, old.cancel
	for i, sk := range old.all() {
		if sk.relay != nil {
			sk.nat = spare.all()[i].nat
			sk.relay.SetConfig(sk.nat)
		}
	}
	// The connection goroutines read old.logger: it keeps the name the
	// stream had when it started; the handlers log the new one.
	old.cfg = s
	keepUpstreams(old)
	if old.sni != nil {
		old.sni.update()
	}
	if !s.HealthCheckEnabled {
		old.state.ClearHealth()
	}
	old.setStored(h)
	spare.release()
	old.logger.Info("stream updated in place")
}

// replaceInstance puts next, bound to its own sockets (if enabled), in
// old's place. The new sockets serve before the old ones close, so UDP
// replies always have a socket to leave from.
func (a *App) replaceInstance(old, next *instance, h storage.Stored) {
	s := &h.Stream
	next.setStored(h)
	a.serve(next)
	old.closeListeners()
	if !s.Enabled {
		old.state.Disable(streamstate.ReasonStreamDisabled)
	}
	a.streams[slices.Index(a.streams, old)] = next
	old.release()
	a.rehomeSNI()
	next.logger.Info("stream updated", zap.Bool("enabled", s.Enabled))
}

// removeInstance stops inst and closes its open connections
// (stream_removed).
func (a *App) removeInstance(inst *instance) {
	inst.closeListeners()
	inst.state.Disable(streamstate.ReasonStreamRemoved)
	a.streams = slices.DeleteFunc(a.streams, func(x *instance) bool { return x == inst })
	inst.logger.Info("stream deleted")
	forgetHistory(inst.cfg.ID)
	inst.release()
}

// applyHost makes the running streams match stored host h, which another
// node (or an earlier app) wrote: it starts it, or changes inst, its
// running instance, the way a local edit would. The caller holds a.mu.
func (a *App) applyHost(inst *instance, h storage.Stored) error {
	s := &h.Stream
	if inst != nil {
		if inst.source != spec.SourceAPI {
			return fmt.Errorf("%w: id %d is taken by %s, declared in this node's Caddy config", spec.ErrConflict, h.ID, spec.StreamLabel(inst.cfg.ID, inst.cfg.Name))
		}
		if inst.version == h.Version {
			return nil
		}
	}
	// The node that wrote it checked it against the streams it runs; this
	// node's own config may hold others. Two of this process's listeners
	// on one port would both bind (SO_REUSEPORT) and share its
	// connections, so the stream is checked here as a local edit is.
	if err := a.validateListen(s); err != nil {
		return fmt.Errorf("%s cannot run on this node: %w", spec.StreamLabel(s.ID, s.Name), err)
	}
	if inst == nil {
		ninst, err := a.newInstance(s, spec.SourceAPI)
		if err != nil {
			return err
		}
		if err := ninst.bind(a.ctx); err != nil {
			ninst.release()
			return err
		}
		ninst.setStored(h)
		a.serve(ninst)
		a.streams = append(a.streams, ninst)
		a.rehomeSNI()
		return nil
	}
	next, err := a.newInstance(s, spec.SourceAPI)
	if err != nil {
		return err
	}
	if a.sameSockets(inst, s) {
		a.swapInPlace(inst, next, h)
		return nil
	}
	if err := next.bind(a.ctx); err != nil {
		next.release()
		return err
	}
	a.replaceInstance(inst, next, h)
	return nil
}

// DeleteHost stops stored stream id, closes its open connections
// (stream_removed) and deletes it with its connection log. Preconditions,
// if any, run first (see Precondition).
func DeleteHost(ctx context.Context, id int64, pre ...Precondition) error {
	return withRunning(func(a *App) error { return a.deleteHost(ctx, id, pre) })
}

func (a *App) deleteHost(ctx context.Context, id int64, pre []Precondition) error {
	inst := a.find(id)
	switch {
	case inst == nil:
		return fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	case inst.source == spec.SourceConfig:
		return fmt.Errorf("%s: %w; remove it from the config and reload", spec.StreamLabel(id, inst.cfg.Name), spec.ErrReadOnly)
	case a.store == nil:
		return spec.ErrNoStorage
	}
	if err := checkPre(inst, pre); err != nil {
		return err
	}
	if err := a.store.db.DeleteHost(ctx, id, nil); err != nil {
		return storeError(err)
	}
	a.removeInstance(inst)
	return nil
}

// storeError keeps a validation or bind error as it is and names storage
// failures as such.
func storeError(err error) error {
	var fe *spec.FieldError
	if errors.As(err, &fe) || errors.Is(err, spec.ErrConflict) || errors.Is(err, spec.ErrNotFound) {
		return err
	}
	switch {
	case errors.Is(err, storage.ErrInUse):
		return fmt.Errorf("%w: %w", err, spec.ErrInUse)
	case errors.Is(err, storage.ErrConflict):
		return fmt.Errorf("%v: %w", err, spec.ErrConflict)
	case errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("%v: %w", err, spec.ErrNotFound)
	}
	return fmt.Errorf("storage: %w", err)
}

// syncStored applies the stored streams that changed since Provision read
// them (an API write between this app's Provision and Start went to the
// previous app). The caller holds writeMu.
func (a *App) syncStored() {
	if a.store == nil {
		return
	}
	if c := a.store.cluster; c != nil {
		if _, err := c.get(); err != nil {
			return // running from the snapshot: the follower reloads once the database opens
		}
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := a.syncStoredLocked(ctx); err != nil {
		a.logger.Error("re-reading stored streams", zap.Error(err))
	}
}

// syncStoredLocked makes the running streams and certificates match every
// stored one; on a cluster, it then counts every change up to the newest
// as applied. The caller holds writeMu and a.mu.
func (a *App) syncStoredLocked(ctx context.Context) error {
	var last int64
	if c := a.store.cluster; c != nil {
		var err error
		if last, err = c.LastChange(ctx); err != nil {
			return err
		}
	}
	hosts, err := a.store.db.ListHosts(ctx)
	if err != nil {
		return err
	}
	if err := a.syncCerts(ctx); err != nil {
		return err
	}
	seen := map[int64]bool{}
	for _, h := range hosts {
		seen[h.ID] = true
		if err := a.applyHost(a.find(h.ID), h); err != nil {
			a.logger.Error("applying a stored stream", zap.Int64("stream_id", h.ID), zap.Error(err))
		}
	}
	for _, inst := range slices.Clone(a.streams) {
		if inst.source == spec.SourceAPI && !seen[inst.cfg.ID] {
			a.removeInstance(inst)
		}
	}
	if c := a.store.cluster; c != nil && last > c.Applied() {
		c.SetApplied(last)
	}
	return nil
}

// ActiveConnections lists the open connections (and UDP NAT entries) of
// stream id, oldest first.
func (a *App) ActiveConnections(id int64) ([]spec.ActiveConn, error) {
	a.mu.Lock()
	inst := a.find(id)
	var cfg *spec.Stream
	if inst != nil {
		cfg = inst.cfg // an edit in place swaps it under a.mu
	}
	a.mu.Unlock()
	if inst == nil {
		return nil, fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	}
	out := []spec.ActiveConn{}
	inst.state.Sessions(func(ss *streamstate.Session) bool {
		proto := spec.ProtocolTCP
		if ss.UDP {
			proto = spec.ProtocolUDP
		}
		out = append(out, spec.ActiveConn{
			ID: ss.ID, Protocol: proto, Source: ss.Source.String(), SourceIP: ss.Source.Addr().String(),
			StartedAt: jsontime.Of(ss.Start), BytesSent: ss.Sent(), BytesReceived: ss.Received(),
			DatagramsSent: ss.DatagramsSent(), DatagramsReceived: ss.DatagramsReceived(),
			Upstream: peerAddr(ss), ListenPort: listenPort(cfg, ss),
		})
		return true
	})
	slices.SortFunc(out, func(x, y spec.ActiveConn) int { return x.StartedAt.Compare(y.StartedAt.Time) })
	return out, nil
}

// listenPort is the port session ss came in on, for a stream with a port
// range; 0 otherwise.
func listenPort(s *spec.Stream, ss *streamstate.Session) int {
	if !s.IsRange() {
		return 0
	}
	return ss.ListenPort()
}

// peerAddr is the upstream session ss went to, or "".
func peerAddr(ss *streamstate.Session) string {
	if u := ss.Peer(); u != nil {
		return u.Addr
	}
	return ""
}

// CloseConnection closes open connection connID of stream id now
// (disconnect_reason admin_closed), or returns ErrNotFound if the stream
// has no such connection (it may have ended already).
func (a *App) CloseConnection(id int64, connID uint64) error {
	a.mu.Lock()
	inst := a.find(id)
	a.mu.Unlock()
	if inst == nil {
		return fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	}
	ss := inst.state.Session(connID)
	if ss == nil || ss.Closed() {
		return fmt.Errorf("stream %d has no open connection %d: %w", id, connID, spec.ErrNotFound)
	}
	ss.Close(streamstate.ReasonAdminClosed)
	return nil
}

// ConnectionLog returns stream id's connection log, newest first, as q
// pages and filters it.
func (a *App) ConnectionLog(ctx context.Context, id int64, q storage.ConnLogQuery) ([]storage.ConnLog, error) {
	a.mu.Lock()
	inst, store := a.find(id), a.store
	a.mu.Unlock()
	if inst == nil {
		return nil, fmt.Errorf("stream %d: %w", id, spec.ErrNotFound)
	}
	if store == nil {
		return nil, spec.ErrNoStorage
	}
	q.StreamID = id
	logs, err := store.db.ConnLogs(ctx, q)
	if err != nil {
		return nil, storeError(err)
	}
	if logs == nil {
		logs = []storage.ConnLog{}
	}
	return logs, nil
}
