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
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// Errors of the management functions, for errors.Is. Validation problems
// are *FieldError values, joined with errors.Join when there are several.
var (
	// ErrNotFound: no stream, or no open connection, has that id.
	ErrNotFound = errors.New("not found")
	// ErrReadOnly: the stream is declared in the Caddy config; change it
	// there.
	ErrReadOnly = errors.New("declared in the Caddy config")
	// ErrConflict: the id is taken.
	ErrConflict = errors.New("conflict")
	// ErrNoStorage: storage is off, so streams cannot be created or
	// changed at run time.
	ErrNoStorage = errors.New("storage is off")
	// ErrNotRunning: no streams app is running.
	ErrNotRunning = errors.New("the streams app is not running")
)

// Sources of a stream host.
const (
	SourceConfig = "config"
	SourceAPI    = "api"
)

// manageMu serializes the writes of the API with each other and with a
// config load handing over to a new app, so a write is never applied to an
// app that is on its way out after the new one has read the storage.
var manageMu sync.Mutex

// current is the running streams app.
var current atomic.Pointer[App]

// setCurrent makes a the app that management calls go to, after it has
// caught up with writes stored since it read the storage.
func setCurrent(a *App) {
	manageMu.Lock()
	defer manageMu.Unlock()
	a.syncStored()
	a.prev = current.Swap(a)
}

// handOver takes a, which is stopping, out of management. If a was the
// running app, the app it replaced takes over again when it still runs:
// Caddy stops a new config whose start failed and keeps the old one. It
// returns that app. The caller holds manageMu.
func handOver(a *App) (back *App) {
	a.stopped = true
	switch cur := current.Load(); {
	case cur == a:
		if a.prev != nil && !a.prev.stopped {
			back = a.prev
		}
		current.Store(back)
	case cur != nil && cur.prev == a:
		cur.prev = nil // a was replaced for good
	}
	a.prev = nil
	return back
}

// Running returns the running streams app, or nil.
func Running() *App { return current.Load() }

// manage runs f on the running app with writes serialized.
func manage(f func(a *App) error) error {
	manageMu.Lock()
	defer manageMu.Unlock()
	a := current.Load()
	if a == nil || a.stopped {
		return ErrNotRunning
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return f(a)
}

// find returns the runtime of stream id, or nil. The caller holds a.mu.
func (a *App) find(id int64) *runtime {
	for _, rt := range a.streams {
		if rt.cfg.ID == id {
			return rt
		}
	}
	return nil
}

// HostStatus is a stream host with where it comes from and its runtime
// status.
type HostStatus struct {
	*Stream
	// Source is "config" for hosts declared in the Caddy config, "api" for
	// hosts created through the API.
	Source string `json:"source"`
	// CreatedAt and UpdatedAt are set for hosts created through the API.
	CreatedAt *jsontime.Time `json:"created_at,omitempty"`
	UpdatedAt *jsontime.Time `json:"updated_at,omitempty"`
	// Version is the stream's version (the API's ETag), opaque. An API
	// stream's changes on every write and never comes back, also across
	// restarts: the number storage gave its last write. A config stream's
	// is a hash of its settings. A write can require it (Precondition).
	Version string `json:"version"`
	Status  Status `json:"status"`
}

// setStored takes the times and version of rt's stored host h.
func (rt *runtime) setStored(h storage.Host) {
	rt.created, rt.updated, rt.version = h.CreatedAt, h.UpdatedAt, h.Version
}

// currentVersion is rt's HostStatus.Version: the stored version of an API
// stream, the settings' hash of a config stream.
func (rt *runtime) currentVersion() string {
	if rt.source == SourceAPI && rt.version > 0 {
		return strconv.FormatInt(rt.version, 10)
	}
	return versionOf(rt.cfg)
}

// versionOf is the version of a config stream's settings: 24 hex digits of
// the SHA-256 of their JSON.
func versionOf(s *Stream) string {
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

// checkPre runs the preconditions against rt's version.
func checkPre(rt *runtime, pre []Precondition) error {
	if len(pre) == 0 {
		return nil
	}
	v := rt.currentVersion()
	for _, p := range pre {
		if err := p(v); err != nil {
			return err
		}
	}
	return nil
}

// UnmarshalJSON decodes a host with its status. Without it the embedded
// Stream's decoder would take the whole object and drop the rest.
func (h *HostStatus) UnmarshalJSON(b []byte) error {
	var s Stream
	if err := json.Unmarshal(b, &s); err != nil {
		return err
	}
	var rest struct {
		Source    string         `json:"source"`
		CreatedAt *jsontime.Time `json:"created_at"`
		UpdatedAt *jsontime.Time `json:"updated_at"`
		Version   string         `json:"version"`
		Status    Status         `json:"status"`
	}
	if err := json.Unmarshal(b, &rest); err != nil {
		return err
	}
	*h = HostStatus{Stream: &s, Source: rest.Source, CreatedAt: rest.CreatedAt, UpdatedAt: rest.UpdatedAt,
		Version: rest.Version, Status: rest.Status}
	return nil
}

func (rt *runtime) hostStatus() HostStatus {
	cp := *rt.cfg
	hs := HostStatus{Stream: &cp, Source: rt.source, Version: rt.currentVersion(), Status: StatusOf(rt.cfg, rt.state)}
	if rt.source == SourceAPI && !rt.created.IsZero() {
		hs.CreatedAt, hs.UpdatedAt = jsontime.Ptr(rt.created), jsontime.Ptr(rt.updated)
	}
	return hs
}

// HostStatuses returns every stream host with its runtime status: the
// config's in config order, then the stored ones by id.
func (a *App) HostStatuses() []HostStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]HostStatus, 0, len(a.streams))
	for _, rt := range a.streams {
		out = append(out, rt.hostStatus())
	}
	return out
}

// Statuses returns every stream's runtime status, in the same order.
func (a *App) Statuses() []Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]Status, 0, len(a.streams))
	for _, rt := range a.streams {
		out = append(out, StatusOf(rt.cfg, rt.state))
	}
	return out
}

// HostStatus returns stream id with its status, or ErrNotFound.
func (a *App) HostStatus(id int64) (HostStatus, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	rt := a.find(id)
	if rt == nil {
		return HostStatus{}, fmt.Errorf("stream %d: %w", id, ErrNotFound)
	}
	return rt.hostStatus(), nil
}

// nextID is an id above every stream's. The caller holds a.mu.
func (a *App) nextID() int64 {
	var top int64
	for _, rt := range a.streams {
		top = max(top, rt.cfg.ID)
	}
	return top + 1
}

// checkNew validates s as a stream about to run next to the others, and
// publishes the certificate it terminates TLS with.
func (a *App) checkNew(ctx context.Context, s *Stream) error {
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
		return &FieldError{ID: s.ID, Name: s.Name, Field: field, Value: fmt.Sprintf("%q", value),
			Reason: "only for streams in the Caddy config; through the API, store the certificate (POST /api/v1/certificates, with domains for one Caddy manages) and use ssl_cert_id"}
	}
	if s.Enabled && s.SSLEnabled && s.HasTCP() {
		if err := a.checkCert(ctx, s.SSLCertID); err != nil {
			return &FieldError{ID: s.ID, Name: s.Name, Field: "ssl_cert_id", Value: fmt.Sprint(s.SSLCertID), Reason: err.Error()}
		}
	}
	return nil
}

// CreateHost stores a new stream and starts it: it ends stored and
// listening (or stored and disabled), or fails and leaves nothing behind.
// An id of 0 takes the next free one.
func CreateHost(ctx context.Context, s Stream) (HostStatus, error) {
	var out HostStatus
	auto := s.ID == 0
	err := manage(func(a *App) error {
		var err error
		out, err = a.createHost(ctx, &s)
		return err
	})
	if auto {
		markNew(err)
	}
	return out, err
}

func (a *App) createHost(ctx context.Context, s *Stream) (HostStatus, error) {
	if a.store == nil {
		return HostStatus{}, ErrNoStorage
	}
	if s.ID == 0 {
		// Above every running stream and every id storage ever gave out:
		// a deleted stream's id (and its log) is not reused.
		top, err := a.store.db.HighestHostID(ctx)
		if err != nil {
			return HostStatus{}, storeError(err)
		}
		s.ID = max(a.nextID(), top+1)
	}
	if other := a.find(s.ID); other != nil {
		from := "declared in the Caddy config"
		if other.source == SourceAPI {
			from = "created through the API"
		}
		return HostStatus{}, fmt.Errorf("%w: id %d is taken by %s, %s; leave id out to get the next free id, or choose another",
			ErrConflict, s.ID, streamLabel(other.cfg.ID, other.cfg.Name), from)
	}
	if err := a.checkNew(ctx, s); err != nil {
		return HostStatus{}, err
	}
	var rt *runtime
	stored, err := a.store.db.CreateHost(ctx, hostFromStream(s), func(storage.Host) error {
		var err error
		rt, err = a.newRuntime(s, SourceAPI)
		if err != nil {
			return err
		}
		if err := rt.bind(a.ctx); err != nil {
			rt.release()
			rt = nil
			return err
		}
		return nil
	})
	if err != nil {
		if rt != nil { // the commit failed after the stream was bound
			rt.closeListeners()
			rt.release()
		}
		return HostStatus{}, storeError(err)
	}
	rt.setStored(stored)
	a.serve(rt)
	a.streams = append(a.streams, rt)
	rt.logger.Info("stream created")
	return rt.hostStatus(), nil
}

// UpdateHost replaces the settings of stored stream id. When the protocol,
// address and port stay and it stays enabled, the listening sockets stay:
// no connection attempt is refused, new connections get the new settings
// and open ones keep theirs. Otherwise new sockets are bound before the
// old ones close. Disabling closes its open connections
// (stream_disabled). Preconditions, if any, run first (see Precondition).
func UpdateHost(ctx context.Context, id int64, s Stream, pre ...Precondition) (HostStatus, error) {
	return UpdateHostFunc(ctx, id, func(Stream) (Stream, error) { return s, nil }, pre...)
}

// UpdateHostFunc is UpdateHost with the new settings made by build from the
// stream's current ones, under the lock every write holds, after the
// preconditions: a partial update (PATCH) cannot lose a write that came
// between reading the stream and changing it. An error of build ends the
// write with that error, and nothing changes.
func UpdateHostFunc(ctx context.Context, id int64, build func(current Stream) (Stream, error), pre ...Precondition) (HostStatus, error) {
	var out HostStatus
	err := manage(func(a *App) error {
		var err error
		out, err = a.updateHost(ctx, id, build, pre)
		return err
	})
	return out, err
}

func (a *App) updateHost(ctx context.Context, id int64, build func(Stream) (Stream, error), pre []Precondition) (HostStatus, error) {
	old := a.find(id)
	switch {
	case old == nil:
		return HostStatus{}, fmt.Errorf("stream %d: %w", id, ErrNotFound)
	case old.source == SourceConfig:
		return HostStatus{}, fmt.Errorf("%s: %w; change it in the config and reload", streamLabel(id, old.cfg.Name), ErrReadOnly)
	case a.store == nil:
		return HostStatus{}, ErrNoStorage
	}
	if err := checkPre(old, pre); err != nil {
		return HostStatus{}, err
	}
	cur := *old.cfg
	cur.WhitelistCIDRs, cur.BlacklistCIDRs = slices.Clone(cur.WhitelistCIDRs), slices.Clone(cur.BlacklistCIDRs)
	ns, err := build(cur)
	if err != nil {
		return HostStatus{}, err
	}
	s := &ns
	if s.ID != 0 && s.ID != id {
		return HostStatus{}, &FieldError{ID: id, Name: s.Name, Field: "id", Value: fmt.Sprint(s.ID), Reason: fmt.Sprintf("does not match the stream's id %d in the path; the id cannot change", id)}
	}
	s.ID = id
	if err := a.checkNew(ctx, s); err != nil {
		return HostStatus{}, err
	}
	sameSockets := old.cfg.Enabled && s.Enabled &&
		old.cfg.EffectiveProtocol() == s.EffectiveProtocol() &&
		old.cfg.ListenAddress == s.ListenAddress && old.cfg.ListenPort == s.ListenPort

	var next *runtime // sockets change: a runtime of its own
	var swap *runtime // sockets stay: the new chain and relay config
	stored, err := a.store.db.UpdateHost(ctx, hostFromStream(s), func(_, _ storage.Host) error {
		var err error
		if sameSockets {
			swap, err = a.newRuntime(s, SourceAPI)
			return err
		}
		next, err = a.newRuntime(s, SourceAPI)
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
		return HostStatus{}, storeError(err)
	}

	if sameSockets {
		// Hand the old runtime the new chain and relay config; the spare
		// runtime takes the old chain away to be unloaded.
		if box := swap.chain.Load(); box != nil {
			prev := old.chain.Swap(box)
			swap.chain.Store(prev)
		}
		old.cancel, swap.cancel = swap.cancel, old.cancel
		if old.relay != nil {
			old.nat = swap.nat
			old.relay.SetConfig(old.nat)
		}
		// The connection goroutines read old.logger: it keeps the name the
		// stream had when it started; the handlers log the new one.
		old.cfg = s
		if !s.HealthCheckEnabled {
			old.state.ClearHealth()
		}
		old.setStored(stored)
		swap.release()
		old.logger.Info("stream updated in place")
		return old.hostStatus(), nil
	}

	// The new sockets serve before the old ones close, so UDP replies
	// always have a socket to leave from.
	next.setStored(stored)
	a.serve(next)
	old.closeListeners()
	if !s.Enabled {
		old.state.CloseAll(streamstate.ReasonStreamDisabled)
	}
	a.streams[slices.Index(a.streams, old)] = next
	old.release()
	next.logger.Info("stream updated", zap.Bool("enabled", s.Enabled))
	return next.hostStatus(), nil
}

// DeleteHost stops stored stream id, closes its open connections
// (stream_removed) and deletes it with its connection log. Preconditions,
// if any, run first (see Precondition).
func DeleteHost(ctx context.Context, id int64, pre ...Precondition) error {
	return manage(func(a *App) error { return a.deleteHost(ctx, id, pre) })
}

func (a *App) deleteHost(ctx context.Context, id int64, pre []Precondition) error {
	rt := a.find(id)
	switch {
	case rt == nil:
		return fmt.Errorf("stream %d: %w", id, ErrNotFound)
	case rt.source == SourceConfig:
		return fmt.Errorf("%s: %w; remove it from the config and reload", streamLabel(id, rt.cfg.Name), ErrReadOnly)
	case a.store == nil:
		return ErrNoStorage
	}
	if err := checkPre(rt, pre); err != nil {
		return err
	}
	if err := a.store.db.DeleteHost(ctx, id, nil); err != nil {
		return storeError(err)
	}
	rt.closeListeners()
	rt.state.CloseAll(streamstate.ReasonStreamRemoved)
	a.streams = slices.DeleteFunc(a.streams, func(x *runtime) bool { return x == rt })
	rt.logger.Info("stream deleted")
	rt.release()
	return nil
}

// storeError keeps a validation or bind error as it is and names storage
// failures as such.
func storeError(err error) error {
	var fe *FieldError
	if errors.As(err, &fe) || errors.Is(err, ErrConflict) || errors.Is(err, ErrNotFound) {
		return err
	}
	switch {
	case errors.Is(err, storage.ErrInUse):
		return fmt.Errorf("%w: %w", err, ErrInUse)
	case errors.Is(err, storage.ErrConflict):
		return fmt.Errorf("%v: %w", err, ErrConflict)
	case errors.Is(err, storage.ErrNotFound):
		return fmt.Errorf("%v: %w", err, ErrNotFound)
	}
	return fmt.Errorf("storage: %w", err)
}

// syncStored applies the stored streams that changed since Provision read
// them (an API write between this app's Provision and Start went to the
// previous app). The caller holds manageMu.
func (a *App) syncStored() {
	if a.store == nil {
		return
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	hosts, err := a.store.db.ListHosts(ctx)
	if err != nil {
		a.logger.Error("re-reading stored streams", zap.Error(err))
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.syncCerts(ctx)
	seen := map[int64]bool{}
	for _, h := range hosts {
		seen[h.ID] = true
		rt := a.find(h.ID)
		switch {
		case rt == nil:
			s := streamFromHost(h)
			nrt, err := a.newRuntime(s, SourceAPI)
			if err == nil {
				if err = nrt.bind(a.ctx); err != nil {
					nrt.release()
				}
			}
			if err != nil {
				a.logger.Error("starting a stream stored meanwhile", zap.Int64("stream_id", h.ID), zap.Error(err))
				continue
			}
			nrt.setStored(h)
			a.serve(nrt)
			a.streams = append(a.streams, nrt)
		case rt.source == SourceAPI && rt.version != h.Version:
			if _, err := a.applyStored(rt, h); err != nil {
				a.logger.Error("applying a stream changed meanwhile", zap.Int64("stream_id", h.ID), zap.Error(err))
			}
		}
	}
	for _, rt := range slices.Clone(a.streams) {
		if rt.source == SourceAPI && !seen[rt.cfg.ID] {
			rt.closeListeners()
			rt.state.CloseAll(streamstate.ReasonStreamRemoved)
			a.streams = slices.DeleteFunc(a.streams, func(x *runtime) bool { return x == rt })
			rt.release()
		}
	}
}

// applyStored replaces rt with a runtime of the stored host h.
func (a *App) applyStored(rt *runtime, h storage.Host) (*runtime, error) {
	s := streamFromHost(h)
	next, err := a.newRuntime(s, SourceAPI)
	if err != nil {
		return nil, err
	}
	if err := next.bind(a.ctx); err != nil {
		next.release()
		return nil, err
	}
	next.setStored(h)
	a.serve(next)
	rt.closeListeners()
	if !s.Enabled {
		rt.state.CloseAll(streamstate.ReasonStreamDisabled)
	}
	a.streams[slices.Index(a.streams, rt)] = next
	rt.release()
	return next, nil
}

// ActiveConn is one connection open now; for UDP, one NAT entry.
type ActiveConn struct {
	// ID identifies the connection, e.g. for CloseConnection.
	ID       uint64 `json:"id"`
	Protocol string `json:"protocol"`
	// Source is the client's ip:port.
	Source        string        `json:"source"`
	SourceIP      string        `json:"source_ip"`
	StartedAt     jsontime.Time `json:"started_at"`
	BytesSent     uint64        `json:"bytes_sent"`
	BytesReceived uint64        `json:"bytes_received"`
	// DatagramsSent and DatagramsReceived count a UDP entry's datagrams.
	DatagramsSent     uint64 `json:"datagrams_sent,omitempty"`
	DatagramsReceived uint64 `json:"datagrams_received,omitempty"`
}

// ActiveConnections lists the open connections (and UDP NAT entries) of
// stream id, oldest first.
func (a *App) ActiveConnections(id int64) ([]ActiveConn, error) {
	a.mu.Lock()
	rt := a.find(id)
	a.mu.Unlock()
	if rt == nil {
		return nil, fmt.Errorf("stream %d: %w", id, ErrNotFound)
	}
	out := []ActiveConn{}
	rt.state.Sessions(func(ss *streamstate.Session) bool {
		proto := ProtocolTCP
		if ss.UDP {
			proto = ProtocolUDP
		}
		out = append(out, ActiveConn{
			ID: ss.ID, Protocol: proto, Source: ss.Source.String(), SourceIP: ss.Source.Addr().String(),
			StartedAt: jsontime.Of(ss.Start), BytesSent: ss.Sent(), BytesReceived: ss.Received(),
			DatagramsSent: ss.DatagramsSent(), DatagramsReceived: ss.DatagramsReceived(),
		})
		return true
	})
	slices.SortFunc(out, func(x, y ActiveConn) int { return x.StartedAt.Compare(y.StartedAt.Time) })
	return out, nil
}

// CloseConnection closes open connection connID of stream id now
// (disconnect_reason admin_closed), or returns ErrNotFound if the stream
// has no such connection (it may have ended already).
func (a *App) CloseConnection(id int64, connID uint64) error {
	a.mu.Lock()
	rt := a.find(id)
	a.mu.Unlock()
	if rt == nil {
		return fmt.Errorf("stream %d: %w", id, ErrNotFound)
	}
	ss := rt.state.Session(connID)
	if ss == nil || ss.Closed() {
		return fmt.Errorf("stream %d has no open connection %d: %w", id, connID, ErrNotFound)
	}
	ss.Close(streamstate.ReasonAdminClosed)
	return nil
}

// ConnectionLog returns stream id's connection log, newest first, as q
// pages and filters it.
func (a *App) ConnectionLog(ctx context.Context, id int64, q storage.ConnLogQuery) ([]storage.ConnLog, error) {
	a.mu.Lock()
	rt, store := a.find(id), a.store
	a.mu.Unlock()
	if rt == nil {
		return nil, fmt.Errorf("stream %d: %w", id, ErrNotFound)
	}
	if store == nil {
		return nil, ErrNoStorage
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

// PortCheck asks whether a stream could listen on an address and port.
type PortCheck struct {
	Protocol      string `json:"protocol"`
	ListenAddress string `json:"listen_address"`
	ListenPort    int    `json:"listen_port"`
	// ID is the stream being edited: its own sockets are no conflict.
	ID int64 `json:"id,omitempty"`
}

// PortCheckResult says whether it could, and why not.
type PortCheckResult struct {
	Valid bool `json:"valid"`
	// Errors are *FieldError values for protocol, listen_address and
	// listen_port.
	Errors   []*FieldError `json:"-"`
	Warnings []string      `json:"warnings"`
}

// ValidatePort checks a listen address and port as creating or updating a
// stream would: the values, Caddy's own ports, the other streams, and
// whether the address can be bound now (a port another program holds is
// an error that says so). Well-known and privileged ports give warnings.
func (a *App) ValidatePort(pc PortCheck) PortCheckResult {
	a.mu.Lock()
	defer a.mu.Unlock()
	id := pc.ID
	if id <= 0 {
		id = a.nextID()
	}
	s := &Stream{ID: id, Protocol: pc.Protocol, ListenAddress: pc.ListenAddress, ListenPort: pc.ListenPort,
		UpstreamHost: "127.0.0.1", UpstreamPort: 1, Enabled: true}
	if rt := a.find(pc.ID); rt != nil {
		s.Name = rt.cfg.Name
	}
	res := PortCheckResult{Warnings: s.Warnings()}
	if res.Warnings == nil {
		res.Warnings = []string{}
	}
	collect := func(err error) {
		for _, e := range flattenErrors(err) {
			var fe *FieldError
			if errors.As(e, &fe) && (fe.Field == "protocol" || fe.Field == "listen_address" || fe.Field == "listen_port") {
				res.Errors = append(res.Errors, fe)
			}
		}
	}
	collect(s.Validate())
	if len(res.Errors) == 0 {
		collect(a.validateListen(s))
	}
	if len(res.Errors) == 0 {
		collect(a.probe(s))
	}
	if pc.ID <= 0 {
		for _, fe := range res.Errors {
			fe.isNew = true
		}
	}
	res.Valid = len(res.Errors) == 0
	return res
}

// probe checks that s's addresses can be bound now, unless a stream of
// this process holds them (validateListen has judged those).
func (a *App) probe(s *Stream) error {
	var errs []error
	for _, network := range []string{"tcp", "udp"} {
		if network == "tcp" && !s.HasTCP() || network == "udp" && !s.HasUDP() {
			continue
		}
		if err := probeBind(s, network); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// flattenErrors unpacks errors.Join trees.
func flattenErrors(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flattenErrors(e)...)
		}
		return out
	}
	return []error{err}
}
