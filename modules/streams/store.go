package streams

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// StorageConfig says where the stream hosts created through the API,
// the certificates and the connection log are kept: an SQLite file (one
// node), or a PostgreSQL database that several nodes share.
type StorageConfig struct {
	// Path is the SQLite database file. Default: streams.db in Caddy's
	// data directory.
	Path string `json:"path,omitempty"`

	// Postgres keeps everything in a PostgreSQL database instead, shared
	// by every node that names it: an edit on one node is applied by all.
	// Key is then required, the same on every node.
	Postgres *PostgresConfig `json:"postgres,omitempty"`

	// Disabled runs without storage: only the config's streams run, the
	// API cannot create any, and connection logs go to Caddy's log only.
	// Default: false.
	Disabled bool `json:"disabled,omitempty"`

	// LogRetention is how many connection-log entries are kept per
	// stream; older ones are deleted. -1 keeps all. Default: 0, meaning
	// 10,000.
	LogRetention int `json:"log_retention,omitempty"`

	// Key encrypts the private keys of uploaded certificates at rest: 64
	// hex digits (`openssl rand -hex 32`), or a placeholder such as
	// {env.AEGIS_STREAMS_KEY}. Default: the key in streams.key beside the
	// database file, created (mode 0600) on first start; required with
	// Postgres.
	Key string `json:"key,omitempty"`
}

// PostgresConfig names the PostgreSQL database of a cluster of nodes.
type PostgresConfig struct {
	// DSN is the database's URL or key=value string, e.g.
	// postgres://aegis:secret@db.internal:5432/aegis?sslmode=verify-full,
	// or a placeholder such as {env.AEGIS_PG_DSN}. Required.
	DSN string `json:"dsn,omitempty"`
}

// DefaultKeyFile is the key file's name beside the database.
const DefaultKeyFile = "streams.key"

// DefaultStorageFile is the database's file name in Caddy's data directory.
const DefaultStorageFile = "streams.db"

// storagePath is the database file the config names, or the default.
func (a *App) storagePath() string { return a.Storage.path() }

// path is the database file sc names, or the default; sc may be nil.
func (sc *StorageConfig) path() string {
	if sc != nil && sc.Path != "" {
		return sc.Path
	}
	return filepath.Join(caddy.AppDataDir(), DefaultStorageFile)
}

// keyFile is the key file beside the database sc names.
func (sc *StorageConfig) keyFile() string {
	return filepath.Join(filepath.Dir(sc.path()), DefaultKeyFile)
}

// keyName names sc's key in errors and the commands' output, as storage
// names a key file ("key file <path>").
func (sc *StorageConfig) keyName() string {
	if sc != nil && sc.Key != "" {
		return "the configured storage_key"
	}
	return "key file " + sc.keyFile()
}

// where names the database sc names in messages: the SQLite file, or
// "PostgreSQL" (the DSN may hold a password).
func (sc *StorageConfig) where() string {
	if sc != nil && sc.Postgres != nil {
		return "PostgreSQL"
	}
	return sc.path()
}

// openTimeout bounds opening a PostgreSQL store.
const openTimeout = 15 * time.Second

// openStore opens the storage sc names (sc may be nil: the defaults) as
// node, with the key that seals its private keys: the configured
// storage_key, or, for SQLite, the key file beside the database (made on
// the first start, and never while the database holds keys sealed with
// another: storage.OpenOptions.KeyFile). It is the one place that opens
// the configured storage, for the app and for the `aegis streams`
// commands; noKeyCheck is for `aegis streams forget-keys` alone, and
// unreachable, for the app's node that may start from its snapshot, opens
// a PostgreSQL store that cannot be reached yet. It returns the key too,
// which the commands use to seal private keys in export files.
func (sc *StorageConfig) openStore(node string, noKeyCheck bool) (storage.Store, []byte, error) {
	var key []byte
	if sc != nil && sc.Key != "" {
		var err error
		if key, err = storage.ParseKey(caddy.NewReplacer().ReplaceAll(sc.Key, "")); err != nil {
			return nil, nil, fmt.Errorf("storage key: %v", err)
		}
	}
	if sc != nil && sc.Postgres != nil {
		if key == nil {
			return nil, nil, errors.New("storage postgres needs storage_key (storage.key in JSON): the same 64 hex digits on every node, e.g. from `openssl rand -hex 32`, or a placeholder such as {env.AEGIS_STREAMS_KEY}; the nodes share the sealed private keys")
		}
		ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
		defer cancel()
		dsn := caddy.NewReplacer().ReplaceAll(sc.Postgres.DSN, "")
		db, err := storage.OpenPostgres(ctx, dsn, storage.PostgresOptions{
			Key: key, KeySource: sc.keyName(), Node: node, NoKeyCheck: noKeyCheck})
		if err != nil {
			return nil, nil, err
		}
		return db, key, nil
	}
	opts := storage.OpenOptions{NoKeyCheck: noKeyCheck, Node: node}
	if key != nil {
		opts.Key, opts.KeySource = key, sc.keyName()
	} else {
		opts.KeyFile = sc.keyFile()
	}
	db, err := storage.OpenWith(sc.path(), opts)
	if err != nil {
		return nil, nil, err
	}
	if key == nil {
		// OpenWith has read or made it.
		if key, err = storage.ReadKeyFile(opts.KeyFile); err != nil {
			db.Close()
			return nil, nil, err
		}
	}
	return db, key, nil
}

// sharedStore is an open store and its connection-log writer, shared by
// the configs that name the same database (a reload overlaps two). With
// PostgreSQL it also runs the node's follower (see cluster.go), which
// outlives config reloads but not the store.
type sharedStore struct {
	name string // the pool key: the SQLite path, or "postgres " + DSN
	db   storage.Store
	// cluster is db as a store that several nodes share; nil for SQLite.
	cluster *clusterStore
	logw    *storage.LogWriter
	// The settings it was opened with, which hold until the last config
	// using it is gone.
	retention int
	key       string

	// where is the database as messages name it: the SQLite file, or
	// "PostgreSQL" (the DSN may hold a password).
	where string

	// The follower (cluster only): stop ends it, done is closed when it
	// has.
	stop context.CancelFunc
	done chan struct{}
}

var stores = caddy.NewUsagePool()

// Destruct stops the follower, flushes the connection log and closes the
// database.
func (s *sharedStore) Destruct() error {
	if s.stop != nil {
		s.stop()
		<-s.done
	}
	werr := s.logw.Close()
	if err := s.db.Close(); err != nil {
		return err
	}
	return werr
}

func (s *sharedStore) release() { _, _ = stores.Delete(s.name) }

// logSink hands a stream's connection-log entry to the writer, which
// batches it into the database. It never blocks: when the writer is behind,
// the entry is dropped (and counted in the stream's log_entries_dropped).
func (s *sharedStore) logSink(r streamstate.LogRecord) bool {
	ip := r.SourceIP
	if ip == "" {
		ip = r.Source.Addr().Unmap().String()
	}
	e := storage.ConnLog{
		StreamID:         r.StreamID,
		SourceIP:         ip,
		SourcePort:       int(r.Source.Port()),
		BytesSent:        int64(r.BytesSent),
		BytesReceived:    int64(r.BytesReceived),
		DurationMS:       r.Duration.Milliseconds(),
		Action:           r.Action(),
		DisconnectReason: r.Reason.String(),
		StartedAt:        jsontime.Of(r.Start),
		EndedAt:          jsontime.Of(r.Start.Add(r.Duration)),
		Protocol:         storage.ConnTCP,
		Upstream:         r.Upstream,
	}
	if r.UDP {
		n := &[2]int64{int64(r.DatagramsSent), int64(r.DatagramsReceived)} // one allocation for both
		e.Protocol, e.DatagramsSent, e.DatagramsReceived = storage.ConnUDP, &n[0], &n[1]
	}
	return s.logw.Enqueue(e)
}

// countDropped counts a batch of connection-log entries that storage
// failed to write in their streams' log_entries_dropped.
func countDropped(batch []storage.ConnLog) {
	n := make(map[int64]uint64, 1)
	for _, e := range batch {
		n[e.StreamID]++
	}
	streamstate.CountLogDropped(n)
}

// storageFix ends an error of opening the storage with what to do.
const storageFix = "fix the path or key (storage sqlite <path>), the database (storage postgres <dsn>), or turn storage off (storage off)"

// openStorage opens (or joins) the store the config names, SQLite or
// PostgreSQL, and returns the stored hosts.
func (a *App) openStorage() ([]storage.Stored, error) {
	if a.Storage != nil && a.Storage.Disabled {
		return nil, nil
	}
	cfg := StorageConfig{}
	if a.Storage != nil {
		cfg = *a.Storage
	}
	name, err := a.storageName(cfg)
	if err != nil {
		return nil, err
	}
	logger := a.logger
	v, loaded, err := stores.LoadOrNew(name, func() (caddy.Destructor, error) {
		return a.openStore(cfg, name)
	})
	var keyErr *storage.KeyError
	if errors.As(err, &keyErr) {
		return nil, err // says what to do
	}
	if err != nil {
		return nil, fmt.Errorf("storage: %v; %s", err, storageFix)
	}
	a.store = v.(*sharedStore)
	if loaded && (a.store.retention != cfg.LogRetention || a.store.key != cfg.Key) {
		logger.Warn("storage settings changed while the database stays open: log_retention and storage_key apply after Caddy restarts",
			zap.String("storage", a.store.where), zap.Int("log_retention_in_use", a.store.retention), zap.Int("log_retention_configured", cfg.LogRetention),
			zap.Bool("storage_key_changed", a.store.key != cfg.Key))
	}
	if c := a.store.cluster; c != nil && c.Node() != a.nodeName() {
		return nil, fmt.Errorf("node_name %q: this process runs as node %q on the same database until Caddy restarts; keep node_name, or restart Caddy", a.nodeName(), c.Node())
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	hosts, err := a.store.db.ListHosts(ctx)
	if err != nil {
		return nil, fmt.Errorf("storage %s: reading stream hosts: %v", a.store.where, err)
	}
	return hosts, nil
}

// storageName checks the storage settings and returns the pool key of
// the store they name.
func (a *App) storageName(cfg StorageConfig) (string, error) {
	if cfg.Postgres == nil {
		return a.storagePath(), nil
	}
	switch {
	case cfg.Path != "":
		return "", fmt.Errorf("storage: both an SQLite path (%s) and postgres are set; keep one", cfg.Path)
	case cfg.Postgres.DSN == "":
		return "", errors.New("storage postgres: the dsn is empty; give the database's URL, e.g. storage postgres {env.AEGIS_PG_DSN}")
	case cfg.Key == "":
		_, _, err := cfg.openStore(a.nodeName(), false) // says what is missing
		return "", err
	}
	return "postgres " + cfg.Postgres.DSN, nil
}

// openStore opens the store that name (from storageName) names, and its
// connection-log writer; with PostgreSQL, also the node's follower.
func (a *App) openStore(cfg StorageConfig, name string) (*sharedStore, error) {
	logger := a.logger
	s := &sharedStore{name: name, retention: cfg.LogRetention, key: cfg.Key, where: cfg.where()}
	if cfg.Postgres == nil {
		db, _, err := cfg.openStore(a.nodeName(), false)
		if err != nil {
			return nil, err
		}
		if w := storage.DirWarning(name); w != "" {
			logger.Warn("storage directory open to other users", zap.String("path", name), zap.String("warning", w))
		}
		s.db = db
	} else {
		c, err := openCluster(&cfg, a.nodeName(), snapshotPath(), logger)
		if err != nil {
			return nil, err
		}
		s.db, s.cluster = c, c
	}
	where := s.where
	// A node of a cluster keeps the entries while PostgreSQL is out of
	// reach, up to the writer's queue, and stores them when it is back.
	var retry time.Duration
	if s.cluster != nil {
		retry = time.Second
	}
	s.logw = storage.NewLogWriter(s.db, storage.LogWriterOptions{
		Retry:     retry,
		Retention: cfg.LogRetention,
		OnError: func(err error) {
			logger.Error("writing the connection log to storage", zap.String("storage", where), zap.Error(err))
		},
		OnDrop: countDropped,
		OnRecover: func(lost uint64) {
			logger.Info("the connection log is written to storage again", zap.String("storage", where), zap.Uint64("entries_lost", lost))
		},
	})
	if s.cluster != nil {
		ctx, stop := context.WithCancel(context.Background())
		s.stop, s.done = stop, make(chan struct{})
		go s.follow(ctx, logger)
	}
	return s, nil
}

// nodeName is this node's name: node_name, or the host name.
func (a *App) nodeName() string {
	if a.NodeName != "" {
		return a.NodeName
	}
	return defaultNodeName()
}

// defaultNodeName is the host name, or "aegis" when it is unknown.
func defaultNodeName() string {
	if h, err := os.Hostname(); err == nil && h != "" {
		return h
	}
	return "aegis"
}
