package streams

// Several nodes on one PostgreSQL database (storage postgres): every write
// appends a change that the other nodes follow. This file holds the
// node's side of it: the store as the app sees it (clusterStore, which
// also runs from the local snapshot while the database is unreachable at
// start), the follower that applies other nodes' changes through the same
// live path as a local edit, the heartbeats, and the cluster view of the
// API.

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// Timings of a node in a cluster; variables for tests.
var (
	// heartbeatEvery is how often a node stores its heartbeat; a node
	// whose last one is older than staleAfter heartbeats is stale.
	heartbeatEvery = 2 * time.Second
	// pollEvery is how often a node reads the changes even without a
	// notification, in case one was missed.
	pollEvery = 30 * time.Second
	// reopenEvery is how often a node that started from its snapshot tries
	// to open the database.
	reopenEvery = time.Second
)

// staleAfter is how many heartbeats a node may miss before it is stale.
const staleAfter = 3

// changeBatch is the most changes read at once.
const changeBatch = 1000

// SnapshotFile is the local snapshot's name in Caddy's data directory.
const SnapshotFile = "streams-snapshot.json"

// snapshotPath is where this process keeps its snapshot.
func snapshotPath() string { return filepath.Join(caddy.AppDataDir(), SnapshotFile) }

// clusterStore is the storage.Cluster of a postgres config. Once the
// database is open it passes every call on. A node that starts while the
// database is unreachable runs from its local snapshot until it can open
// it: reads answer from the snapshot, writes fail with the error the open
// met (storage.ErrUnavailable), and the follower keeps trying.
type clusterStore struct {
	node     string
	snapPath string
	key      []byte // seals the private keys in the snapshot
	cfg      *StorageConfig

	mu      sync.RWMutex
	db      storage.Cluster // nil until open
	snap    *snapshot       // what the node started from, while db is nil
	downErr error           // why db is nil

	// fromSnapshot says the node runs from its snapshot: until the first
	// full sync after the database opened.
	fromSnapshot atomic.Bool
	// full makes the next catch-up reload every stream and certificate.
	full atomic.Bool
	// down says the database failed and no call has worked since; it
	// makes the log say so once per outage.
	down atomic.Bool

	// certs are the certificates as the snapshot last had them (without
	// keys): the API's reads answer from them while the database is
	// unreachable.
	certs atomic.Pointer[[]spec.Certificate]

	// sealed are the snapshot's sealed private keys by certificate id,
	// with the certRow they belong to; guarded by writeMu.
	sealed map[int64]sealedKey

	// peers are the other nodes' stream counters from their heartbeats,
	// read after each of this node's own: the cluster totals of the
	// stream list come from them without a database read.
	peers atomic.Pointer[[]peerCounters]
}

// peerCounters is another node's counters of each stream it runs, from
// its last heartbeat.
type peerCounters struct {
	seen    time.Time
	streams map[int64]spec.ClusterTotals
}

type sealedKey struct {
	row    string
	sealed []byte
}

var _ storage.Cluster = (*clusterStore)(nil)

// openCluster opens the PostgreSQL store for node, or, when the database
// is unreachable, the node's snapshot at snapPath.
func openCluster(cfg *StorageConfig, node, snapPath string, logger *zap.Logger) (*clusterStore, error) {
	key, err := storage.ParseKey(caddy.NewReplacer().ReplaceAll(cfg.Key, ""))
	if err != nil {
		return nil, fmt.Errorf("storage key: %v", err)
	}
	c := &clusterStore{node: node, snapPath: snapPath, key: key, cfg: cfg, sealed: map[int64]sealedKey{}}
	db, err := c.open()
	if err == nil {
		c.db = db
		return c, nil
	}
	if !errors.Is(err, storage.ErrUnavailable) {
		return nil, err
	}
	snap, serr := loadSnapshot(snapPath)
	if serr != nil {
		return nil, fmt.Errorf("%w; no local snapshot to start from either: %v", err, serr)
	}
	c.snap, c.downErr = snap, err
	c.keepCerts(snap)
	c.fromSnapshot.Store(true)
	c.full.Store(true)
	c.down.Store(true)
	logger.Warn("PostgreSQL is unreachable: this node starts from its local snapshot of the last applied config, and catches up when the database is back",
		zap.String("snapshot", snapPath), zap.Time("snapshot_written_at", snap.WrittenAt),
		zap.Int64("applied_change", snap.AppliedChange), zap.Int("streams", len(snap.Streams)), zap.Error(err))
	return c, nil
}

// open opens the database (checking the key against its canary) and
// claims the node's name.
func (c *clusterStore) open() (storage.Cluster, error) {
	ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
	defer cancel()
	store, _, err := c.cfg.openStore(c.node, false)
	if err != nil {
		return nil, err
	}
	db := store.(storage.Cluster)
	if err := db.ClaimNode(ctx); err != nil {
		db.Close()
		if errors.Is(err, storage.ErrNodeNameTaken) {
			return nil, fmt.Errorf("node_name %q: %w; give every node a name of its own (node_name in the streams app)", c.node, err)
		}
		return nil, err
	}
	return db, nil
}

// get returns the open database, or why there is none.
func (c *clusterStore) get() (storage.Cluster, error) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.db == nil {
		return nil, c.downErr
	}
	return c.db, nil
}

// snapshotNow returns the snapshot while the database is not open.
func (c *clusterStore) snapshotNow() (*snapshot, storage.Cluster) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.snap, c.db
}

// waitOpen tries to open the database every reopenEvery until it opens
// (true) or ctx ends (false).
func (c *clusterStore) waitOpen(ctx context.Context, logger *zap.Logger) bool {
	for {
		if _, err := c.get(); err == nil {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(reopenEvery):
		}
		db, err := c.open()
		if err != nil {
			if !errors.Is(err, storage.ErrUnavailable) {
				logger.Error("opening PostgreSQL", zap.Error(err))
			}
			c.mu.Lock()
			c.downErr = err
			c.mu.Unlock()
			continue
		}
		c.mu.Lock()
		c.db, c.snap, c.downErr = db, nil, nil
		c.mu.Unlock()
		logger.Info("PostgreSQL is reachable: catching up with the changes made meanwhile")
		return true
	}
}

// reportDown logs the first failure of an outage.
func (c *clusterStore) reportDown(logger *zap.Logger, err error) {
	if errors.Is(err, context.Canceled) || c.down.Swap(true) {
		return
	}
	logger.Error("PostgreSQL failed: this node keeps serving its last applied config; writes are refused until it is back",
		zap.Error(err))
}

// reportUp logs the end of an outage.
func (c *clusterStore) reportUp(logger *zap.Logger) {
	if c.down.Swap(false) {
		logger.Info("PostgreSQL works again")
	}
}

// ---- storage.Store and storage.Cluster ----

func (c *clusterStore) ListHosts(ctx context.Context) ([]storage.Stored, error) {
	snap, db := c.snapshotNow()
	if db != nil {
		return db.ListHosts(ctx)
	}
	return snap.hosts(), nil
}

func (c *clusterStore) GetHost(ctx context.Context, id int64) (storage.Stored, error) {
	snap, db := c.snapshotNow()
	if db != nil {
		return db.GetHost(ctx, id)
	}
	for _, h := range snap.hosts() {
		if h.ID == id {
			return h, nil
		}
	}
	return storage.Stored{}, fmt.Errorf("host %d: %w", id, storage.ErrNotFound)
}

func (c *clusterStore) CreateHost(ctx context.Context, s spec.Stream, apply func(h storage.Stored) error) (storage.Stored, error) {
	db, err := c.get()
	if err != nil {
		return storage.Stored{}, err
	}
	return db.CreateHost(ctx, s, apply)
}

func (c *clusterStore) UpdateHost(ctx context.Context, s spec.Stream, apply func(old, new storage.Stored) error) (storage.Stored, error) {
	db, err := c.get()
	if err != nil {
		return storage.Stored{}, err
	}
	return db.UpdateHost(ctx, s, apply)
}

func (c *clusterStore) DeleteHost(ctx context.Context, id int64, apply func(old storage.Stored) error) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.DeleteHost(ctx, id, apply)
}

// HighestHostID passes the store's on, if it has one.
func (c *clusterStore) HighestHostID(ctx context.Context) (int64, error) {
	db, err := c.get()
	if err != nil {
		return 0, err
	}
	return highestHostID(ctx, db)
}

func (c *clusterStore) AppendConnLogs(ctx context.Context, entries []storage.ConnLog) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.AppendConnLogs(ctx, entries)
}

func (c *clusterStore) ConnLogs(ctx context.Context, q storage.ConnLogQuery) ([]storage.ConnLog, error) {
	db, err := c.get()
	if err != nil {
		return nil, err
	}
	return db.ConnLogs(ctx, q)
}

func (c *clusterStore) AuditLog(ctx context.Context, q storage.AuditQuery) ([]storage.AuditEntry, error) {
	db, err := c.get()
	if err != nil {
		return nil, err
	}
	return db.AuditLog(ctx, q)
}

func (c *clusterStore) AppendHistory(ctx context.Context, samples []storage.HistorySample) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.AppendHistory(ctx, samples)
}

func (c *clusterStore) History(ctx context.Context, streamID int64, since time.Time) ([]storage.NodeHistory, error) {
	db, err := c.get()
	if err != nil {
		return nil, err
	}
	return db.History(ctx, streamID, since)
}

func (c *clusterStore) PruneConnLogs(ctx context.Context, streamID int64, keep int) (int64, error) {
	db, err := c.get()
	if err != nil {
		return 0, err
	}
	return db.PruneConnLogs(ctx, streamID, keep)
}

func (c *clusterStore) ListCertificates(ctx context.Context) ([]spec.Certificate, error) {
	snap, db := c.snapshotNow()
	if db != nil {
		return db.ListCertificates(ctx)
	}
	out := make([]spec.Certificate, 0, len(snap.Certificates))
	for _, sc := range snap.Certificates {
		out = append(out, sc.Certificate)
	}
	return out, nil
}

func (c *clusterStore) GetCertificate(ctx context.Context, id int64) (spec.Certificate, error) {
	snap, db := c.snapshotNow()
	if db != nil {
		return db.GetCertificate(ctx, id)
	}
	if sc := snap.cert(id); sc != nil {
		return sc.Certificate, nil
	}
	return spec.Certificate{}, fmt.Errorf("certificate %d: %w", id, storage.ErrNotFound)
}

func (c *clusterStore) CertificateKey(ctx context.Context, id int64) ([]byte, error) {
	snap, db := c.snapshotNow()
	if db != nil {
		return db.CertificateKey(ctx, id)
	}
	sc := snap.cert(id)
	if sc == nil {
		return nil, fmt.Errorf("certificate %d: %w", id, storage.ErrNotFound)
	}
	return storage.OpenPrivateKey(c.key, id, sc.SealedKey)
}

func (c *clusterStore) CreateCertificate(ctx context.Context, cert spec.Certificate, keyPEM []byte, apply func(c spec.Certificate) error) (spec.Certificate, error) {
	db, err := c.get()
	if err != nil {
		return spec.Certificate{}, err
	}
	return db.CreateCertificate(ctx, cert, keyPEM, apply)
}

func (c *clusterStore) UpdateCertificate(ctx context.Context, cert spec.Certificate, keyPEM []byte, apply func(old, new spec.Certificate) error) (spec.Certificate, error) {
	db, err := c.get()
	if err != nil {
		return spec.Certificate{}, err
	}
	return db.UpdateCertificate(ctx, cert, keyPEM, apply)
}

func (c *clusterStore) DeleteCertificate(ctx context.Context, id int64, apply func(old spec.Certificate) error) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.DeleteCertificate(ctx, id, apply)
}

func (c *clusterStore) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.db == nil {
		return nil
	}
	err := c.db.Close()
	c.db, c.downErr = nil, errors.New("storage is closed")
	return err
}

func (c *clusterStore) Node() string { return c.node }

func (c *clusterStore) ClaimNode(ctx context.Context) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.ClaimNode(ctx)
}

func (c *clusterStore) LastChange(ctx context.Context) (int64, error) {
	db, err := c.get()
	if err != nil {
		return 0, err
	}
	return db.LastChange(ctx)
}

func (c *clusterStore) ChangesAfter(ctx context.Context, after int64, limit int) ([]storage.Change, error) {
	db, err := c.get()
	if err != nil {
		return nil, err
	}
	return db.ChangesAfter(ctx, after, limit)
}

func (c *clusterStore) SetApplied(id int64) {
	if db, err := c.get(); err == nil {
		db.SetApplied(id)
	}
}

func (c *clusterStore) Applied() int64 {
	snap, db := c.snapshotNow()
	if db != nil {
		return db.Applied()
	}
	if snap != nil {
		return snap.AppliedChange
	}
	return 0
}

func (c *clusterStore) Listen(ctx context.Context, notify func(changeID int64)) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.Listen(ctx, notify)
}

func (c *clusterStore) Heartbeat(ctx context.Context, s storage.NodeStatus) error {
	db, err := c.get()
	if err != nil {
		return err
	}
	return db.Heartbeat(ctx, s)
}

func (c *clusterStore) Nodes(ctx context.Context) ([]storage.NodeStatus, error) {
	db, err := c.get()
	if err != nil {
		return nil, err
	}
	return db.Nodes(ctx)
}

// ---- the snapshot ----

// snapshot is the config a node last applied, kept in a local file so that
// the node can start while the database is unreachable. Private keys are
// sealed with the storage key, as in the database.
type snapshot struct {
	Node          string         `json:"node"`
	AppliedChange int64          `json:"applied_change"`
	WrittenAt     time.Time      `json:"written_at"`
	Streams       []snapStream   `json:"streams"`
	Certificates  []snapshotCert `json:"certificates"`
}

type snapStream struct {
	Stream    spec.Stream `json:"stream"`
	CreatedAt time.Time   `json:"created_at"`
	UpdatedAt time.Time   `json:"updated_at"`
	Version   int64       `json:"version"`
}

type snapshotCert struct {
	spec.Certificate
	SealedKey []byte `json:"sealed_key,omitempty"`
}

func (s *snapshot) hosts() []storage.Stored {
	out := make([]storage.Stored, 0, len(s.Streams))
	for _, h := range s.Streams {
		out = append(out, storage.Stored{Stream: h.Stream, CreatedAt: h.CreatedAt, UpdatedAt: h.UpdatedAt, Version: h.Version})
	}
	return out
}

func (s *snapshot) cert(id int64) *snapshotCert {
	for i := range s.Certificates {
		if s.Certificates[i].ID == id {
			return &s.Certificates[i]
		}
	}
	return nil
}

func loadSnapshot(path string) (*snapshot, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var s snapshot
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%s: %v", path, err)
	}
	return &s, nil
}

// saveSnapshot writes the snapshot of what a runs now, from the app's
// streams and the stored certificates. The caller holds writeMu and a.mu.
// A failure is logged: the node goes on without a newer snapshot.
func (c *clusterStore) saveSnapshot(a *App) {
	db, err := c.get()
	if err != nil {
		return // running from the snapshot: nothing newer to keep
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	snap := snapshot{Node: c.node, AppliedChange: db.Applied(), WrittenAt: time.Now().UTC(),
		Streams: []snapStream{}, Certificates: []snapshotCert{}}
	for _, inst := range a.streams {
		if inst.source == spec.SourceAPI {
			snap.Streams = append(snap.Streams, snapStream{Stream: *inst.cfg, CreatedAt: inst.created, UpdatedAt: inst.updated, Version: inst.version})
		}
	}
	certs, err := db.ListCertificates(ctx)
	if err != nil {
		a.logger.Warn("writing the local snapshot: reading the certificates", zap.Error(err))
		return
	}
	for _, cert := range certs {
		sc := snapshotCert{Certificate: cert}
		if cert.Source != spec.SourceManaged {
			row := certRow(cert)
			k, ok := c.sealed[cert.ID]
			if !ok || k.row != row {
				key, err := db.CertificateKey(ctx, cert.ID)
				if err != nil {
					a.logger.Warn("writing the local snapshot: reading a private key", zap.Int64("cert_id", cert.ID), zap.Error(err))
					return
				}
				sealed, err := storage.SealPrivateKey(c.key, cert.ID, key)
				if err != nil {
					a.logger.Warn("writing the local snapshot: sealing a private key", zap.Int64("cert_id", cert.ID), zap.Error(err))
					return
				}
				k = sealedKey{row: row, sealed: sealed}
				c.sealed[cert.ID] = k
			}
			sc.SealedKey = k.sealed
		}
		snap.Certificates = append(snap.Certificates, sc)
	}
	c.keepCerts(&snap)
	b, err := json.Marshal(snap)
	if err == nil {
		err = writeFileAtomic(c.snapPath, b)
	}
	if err != nil {
		a.logger.Warn("writing the local snapshot", zap.String("snapshot", c.snapPath), zap.Error(err))
	}
}

// keepCerts keeps the snapshot's certificates for the API's reads.
func (c *clusterStore) keepCerts(snap *snapshot) {
	list := make([]spec.Certificate, 0, len(snap.Certificates))
	for _, sc := range snap.Certificates {
		list = append(list, sc.Certificate)
	}
	c.certs.Store(&list)
}

// certsFallback returns the certificates for an API read that the
// database failed with err: those of the last snapshot, when the database
// is unreachable and there is one.
func (s *sharedStore) certsFallback(err error) ([]spec.Certificate, bool) {
	if s.cluster == nil || !errors.Is(err, storage.ErrUnavailable) {
		return nil, false
	}
	list := s.cluster.certs.Load()
	if list == nil {
		return nil, false
	}
	return *list, true
}

// writeFileAtomic writes b to path (mode 0600) through a temporary file in
// the same directory, synced and renamed over it: a crash leaves the old
// file or the new one, never part of one.
func writeFileAtomic(path string, b []byte) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Chmod(0o600)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// ---- the follower ----

// follow applies the changes other nodes make, on each notification,
// after each (re)connect and every pollEvery, and sends the node's
// heartbeats, until ctx ends. A node that started from its snapshot first
// waits for the database.
func (s *sharedStore) follow(ctx context.Context, logger *zap.Logger) {
	defer close(s.done)
	c := s.cluster
	if !c.waitOpen(ctx, logger) {
		return
	}
	db, _ := c.get()
	kick := make(chan struct{}, 1)
	listenDone := make(chan struct{})
	go func() {
		defer close(listenDone)
		err := db.Listen(ctx, func(id int64) {
			if id == 0 || id > db.Applied() {
				select {
				case kick <- struct{}{}:
				default:
				}
			}
		})
		if err != nil && ctx.Err() == nil {
			logger.Error("listening for the changes of other nodes; they are read every poll interval instead",
				zap.Duration("poll_interval", pollEvery), zap.Error(err))
		}
	}()
	poll := time.NewTicker(pollEvery)
	beat := time.NewTicker(heartbeatEvery)
	defer func() {
		poll.Stop()
		beat.Stop()
		<-listenDone
	}()
	s.catchUp(ctx, logger)
	s.heartbeat(ctx, logger)
	for {
		select {
		case <-ctx.Done():
			return
		case <-kick:
			s.catchUp(ctx, logger)
		case <-poll.C:
			s.catchUp(ctx, logger)
		case <-beat.C:
			s.heartbeat(ctx, logger)
		}
	}
}

// catchUp applies the changes this node has not applied to the running
// app, if it uses this store.
func (s *sharedStore) catchUp(ctx context.Context, logger *zap.Logger) {
	writeMu.Lock()
	defer writeMu.Unlock()
	a := current.Load()
	if a == nil || a.stopped {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.store != s {
		return
	}
	if err := a.catchUpFor(ctx); err != nil {
		s.cluster.reportDown(logger, err)
		return
	}
	s.cluster.reportUp(logger)
}

// catchUpFor applies every change after the last one this node applied,
// in order, each through the same live path as a local edit, and then
// writes the snapshot. When the history it needs was pruned (or the node
// ran from its snapshot) it reloads every stream and certificate instead.
// The caller holds writeMu and a.mu.
func (a *App) catchUpFor(ctx context.Context) error {
	c := a.store.cluster
	db, err := c.get()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if c.full.Load() {
		if err := a.syncStoredLocked(ctx); err != nil {
			return err
		}
		c.full.Store(false)
		if c.fromSnapshot.Swap(false) {
			a.logger.Info("caught up with PostgreSQL: the node no longer runs from its snapshot", zap.Int64("applied_change", db.Applied()))
		}
		c.saveSnapshot(a)
		return nil
	}
	applied := 0
	for {
		changes, err := db.ChangesAfter(ctx, db.Applied(), changeBatch)
		if errors.Is(err, storage.ErrHistoryPruned) {
			a.logger.Warn("the change history this node needs was pruned: reloading every stream and certificate", zap.Int64("applied_change", db.Applied()))
			c.full.Store(true)
			return a.catchUpFor(ctx)
		}
		if err != nil {
			return err
		}
		for _, ch := range changes {
			if err := a.applyChange(ctx, ch); err != nil {
				if errors.Is(err, storage.ErrUnavailable) || ctx.Err() != nil {
					return err
				}
				a.logger.Error("applying a change made on another node", zap.Int64("change_id", ch.ID), zap.String("from_node", ch.Node),
					zap.String("kind", ch.Kind), zap.String("op", ch.Op), zap.Int64("object_id", ch.ObjectID), zap.Error(err))
			}
			db.SetApplied(ch.ID)
			applied++
		}
		if len(changes) < changeBatch {
			break
		}
	}
	if applied > 0 {
		c.saveSnapshot(a)
	}
	return nil
}

// applyChange applies one change: it reads the stream or certificate as
// stored now and makes the running app match it. The caller holds writeMu
// and a.mu.
func (a *App) applyChange(ctx context.Context, ch storage.Change) error {
	switch ch.Kind {
	case storage.ChangeStream:
		inst := a.find(ch.ObjectID)
		h, err := a.store.db.GetHost(ctx, ch.ObjectID)
		switch {
		case errors.Is(err, storage.ErrNotFound):
			if inst != nil && inst.source == spec.SourceAPI {
				a.removeInstance(inst)
			}
		case err != nil:
			return err
		default:
			if err := a.applyHost(inst, h); err != nil {
				return err
			}
		}
	case storage.ChangeCertificate:
		if err := a.applyCert(ctx, ch.ObjectID); err != nil {
			return err
		}
	default:
		return fmt.Errorf("change %d: unknown kind %q (a newer node wrote it?)", ch.ID, ch.Kind)
	}
	a.logger.Info("change applied", zap.Int64("change_id", ch.ID), zap.String("from_node", ch.Node),
		zap.String("kind", ch.Kind), zap.String("op", ch.Op), zap.Int64("object_id", ch.ObjectID),
		zap.Duration("delay", time.Since(ch.At)))
	return nil
}

// heartbeat stores the node's status: its name, version, the last change
// it applied and its streams' counters and health.
func (s *sharedStore) heartbeat(ctx context.Context, logger *zap.Logger) {
	c := s.cluster
	st := storage.NodeStatus{Name: c.node, Version: binaryVersion(), AppliedChange: c.Applied(), Snapshot: c.fromSnapshot.Load(),
		Address: adminAddress.Load()}
	if a := current.Load(); a != nil && a.storage() == s {
		if b, err := json.Marshal(a.Statuses()); err == nil {
			st.Streams = b
		}
	}
	hctx, cancel := context.WithTimeout(ctx, heartbeatEvery)
	defer cancel()
	err := c.Heartbeat(hctx, st)
	var nodes []storage.NodeStatus
	if err == nil {
		nodes, err = c.Nodes(hctx)
	}
	if err != nil {
		c.reportDown(logger, err)
		return
	}
	c.keepPeers(nodes)
}

// keepPeers keeps the other nodes' stream counters from their heartbeats.
func (c *clusterStore) keepPeers(nodes []storage.NodeStatus) {
	peers := make([]peerCounters, 0, len(nodes))
	for _, n := range nodes {
		if n.Name == c.node {
			continue
		}
		var rows []spec.Status
		if len(n.Streams) > 0 && json.Unmarshal(n.Streams, &rows) != nil {
			continue // not a list of statuses: a newer node's, or damaged
		}
		p := peerCounters{seen: n.LastSeen, streams: make(map[int64]spec.ClusterTotals, len(rows))}
		for i := range rows {
			t := p.streams[rows[i].ID]
			t.Add(&rows[i])
			p.streams[rows[i].ID] = t
		}
		peers = append(peers, p)
	}
	c.peers.Store(&peers)
}

// clusterTotals returns, in a cluster, the other nodes' counters to add to
// this node's (those whose heartbeat is not stale), and true; with SQLite
// or no storage, false. The caller holds a.mu.
func (a *App) clusterTotals() ([]peerCounters, bool) {
	if a.store == nil || a.store.cluster == nil {
		return nil, false
	}
	p := a.store.cluster.peers.Load()
	if p == nil {
		return nil, true
	}
	fresh := make([]peerCounters, 0, len(*p))
	now := time.Now()
	for _, n := range *p {
		if now.Sub(n.seen) <= staleAfter*heartbeatEvery {
			fresh = append(fresh, n)
		}
	}
	return fresh, true
}

// withTotals sets hs's cluster totals: its own counters and the peers'.
func withTotals(hs spec.HostStatus, peers []peerCounters) spec.HostStatus {
	var t spec.ClusterTotals
	t.Add(&hs.Status)
	for _, p := range peers {
		if pt, ok := p.streams[hs.ID]; ok {
			t.Sum(pt)
		}
	}
	hs.Status.Cluster = &t
	return hs
}

// hostStatus is inst's HostStatus with, in a cluster, its totals over
// the nodes. The caller holds a.mu.
func (a *App) hostStatus(inst *instance) spec.HostStatus {
	hs := inst.hostStatus()
	if peers, ok := a.clusterTotals(); ok {
		hs = withTotals(hs, peers)
	}
	return hs
}

// adminAddress is where this process's admin endpoint was last reached
// (the API records the Host of its requests), for the heartbeat.
var adminAddress atomicString

type atomicString struct{ v atomic.Pointer[string] }

func (s *atomicString) Load() string {
	if p := s.v.Load(); p != nil {
		return *p
	}
	return ""
}

// NoteAdminAddress records the address the API was reached at, for the
// cluster view.
func NoteAdminAddress(host string) {
	if host != "" && adminAddress.Load() != host {
		adminAddress.v.Store(&host)
	}
}

// binaryVersion is the version of this binary: its module version and
// VCS revision, as far as the build recorded them.
var binaryVersion = sync.OnceValue(func() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return ""
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += " " + s.Value[:12]
		}
	}
	return v
})

// ---- the cluster view ----

// Node statuses of the cluster view.
const (
	NodeUp       = "up"
	NodeStale    = "stale"
	NodeSnapshot = "snapshot"
)

// ClusterNode is one node as GET /api/v1/cluster shows it.
type ClusterNode struct {
	Name    string `json:"name"`
	Address string `json:"address,omitempty"`
	Version string `json:"version,omitempty"`
	// LastSeen is when its last heartbeat was stored.
	LastSeen      jsontime.Time `json:"last_seen"`
	AppliedChange int64         `json:"applied_change"`
	// Lag is how many changes it has not applied yet.
	Lag int64 `json:"lag"`
	// Status is NodeUp, NodeStale (staleAfter heartbeats missed) or
	// NodeSnapshot (it runs from its local snapshot).
	Status string `json:"status"`
	// Streams are the streams it runs, with their counters and health, as
	// its stats answer them.
	Streams []spec.Status `json:"streams"`
}

// Cluster is the answer of GET /api/v1/cluster.
type Cluster struct {
	// Node is the name of the node that answers.
	Node string `json:"node"`
	// Storage is "postgres" or "sqlite" ("" without storage).
	Storage string `json:"storage"`
	// LastChange is the newest change in the database.
	LastChange int64 `json:"last_change"`
	// Error says why the other nodes are missing, when the database
	// cannot be read.
	Error string        `json:"error,omitempty"`
	Nodes []ClusterNode `json:"nodes"`
}

// ClusterView returns the nodes that share this node's storage, this node
// included; with SQLite (or while the database cannot be read), this node
// only.
func (a *App) ClusterView(ctx context.Context) Cluster {
	store := a.storage()
	self := ClusterNode{Name: a.nodeName(), Address: adminAddress.Load(), Version: binaryVersion(), LastSeen: jsontime.Of(time.Now()),
		Status: NodeUp, Streams: a.Statuses()}
	out := Cluster{Node: self.Name, Nodes: []ClusterNode{self}}
	if store == nil {
		return out
	}
	c := store.cluster
	if c == nil {
		out.Storage = "sqlite"
		return out
	}
	out.Storage = "postgres"
	self.AppliedChange = c.Applied()
	if c.fromSnapshot.Load() {
		self.Status = NodeSnapshot
	}
	out.Nodes[0] = self
	last, err := c.LastChange(ctx)
	var nodes []storage.NodeStatus
	if err == nil {
		nodes, err = c.Nodes(ctx)
	}
	if err != nil {
		out.Error = err.Error()
		out.LastChange = self.AppliedChange
		return out
	}
	out.LastChange = last
	out.Nodes = out.Nodes[:0]
	now := time.Now()
	for _, n := range nodes {
		cn := ClusterNode{Name: n.Name, Address: n.Address, Version: n.Version, LastSeen: jsontime.Of(n.LastSeen), AppliedChange: n.AppliedChange,
			Lag: max(0, last-n.AppliedChange), Status: NodeUp, Streams: []spec.Status{}}
		if n.Name == self.Name {
			cn = self
			cn.LastSeen = jsontime.Of(n.LastSeen)
			cn.Lag = max(0, last-self.AppliedChange)
		} else {
			if len(n.Streams) > 0 {
				_ = json.Unmarshal(n.Streams, &cn.Streams)
			}
			switch {
			case now.Sub(n.LastSeen) > staleAfter*heartbeatEvery:
				cn.Status = NodeStale
			case n.Snapshot:
				cn.Status = NodeSnapshot
			}
		}
		out.Nodes = append(out.Nodes, cn)
	}
	if !slices.ContainsFunc(out.Nodes, func(n ClusterNode) bool { return n.Name == self.Name }) {
		self.Lag = max(0, last-self.AppliedChange)
		out.Nodes = append(out.Nodes, self)
	}
	slices.SortFunc(out.Nodes, func(x, y ClusterNode) int {
		switch {
		case x.Name < y.Name:
			return -1
		case x.Name > y.Name:
			return 1
		}
		return 0
	})
	return out
}

// NodeStats is one node's stream stats, for GET
// /api/v1/streams/stats?node=all.
type NodeStats struct {
	Node  string
	Stats []spec.Status
}

// ClusterStats returns the stats of every node (this one's live, the
// others' from their last heartbeat), ordered by node name; with SQLite,
// this node's only.
func (a *App) ClusterStats(ctx context.Context) ([]NodeStats, error) {
	view := a.ClusterView(ctx)
	if view.Error != "" {
		return nil, fmt.Errorf("reading the other nodes' stats: %s: %w", view.Error, storage.ErrUnavailable)
	}
	out := make([]NodeStats, 0, len(view.Nodes))
	for _, n := range view.Nodes {
		out = append(out, NodeStats{Node: n.Name, Stats: n.Streams})
	}
	return out, nil
}

// Node returns this node's name (node_name, or the host name).
func (a *App) Node() string { return a.nodeName() }
