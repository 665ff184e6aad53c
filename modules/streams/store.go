package streams

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// StorageConfig says where the stream hosts created through the API and
// the connection log are kept.
type StorageConfig struct {
	// Path is the SQLite database file. Default: streams.db in Caddy's
	// data directory.
	Path string `json:"path,omitempty"`

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
	// database file, created (mode 0600) on first start.
	Key string `json:"key,omitempty"`
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

// openStore opens the database sc names (sc may be nil: the defaults) with
// the key that seals its private keys: the configured storage_key, or the
// key file beside the database (made on the first start, and never while
// the database holds keys sealed with another: storage.OpenOptions.KeyFile).
// It is the one place that opens the configured storage, for the app and
// for the `aegis streams` commands; noKeyCheck is for `aegis streams
// forget-keys` alone. It returns the key too, which the commands use to
// seal private keys in export files.
func (sc *StorageConfig) openStore(noKeyCheck bool) (*storage.SQLite, []byte, error) {
	path := sc.path()
	opts := storage.OpenOptions{NoKeyCheck: noKeyCheck}
	if sc != nil && sc.Key != "" {
		key, err := storage.ParseKey(caddy.NewReplacer().ReplaceAll(sc.Key, ""))
		if err != nil {
			return nil, nil, fmt.Errorf("storage key: %v", err)
		}
		opts.Key, opts.KeySource = key, sc.keyName()
	} else {
		opts.KeyFile = sc.keyFile()
	}
	db, err := storage.OpenWith(path, opts)
	if err != nil {
		return nil, nil, err
	}
	key := opts.Key
	if key == nil {
		// OpenWith has read or made it.
		if key, err = storage.ReadKeyFile(opts.KeyFile); err != nil {
			db.Close()
			return nil, nil, err
		}
	}
	return db, key, nil
}

// sharedStore is an open database and its connection-log writer, shared by
// the configs that name the same file (a reload overlaps two).
type sharedStore struct {
	path string
	db   *storage.SQLite
	logw *storage.LogWriter
	// The settings it was opened with, which hold until the last config
	// using it is gone.
	retention int
	key       string
}

var stores = caddy.NewUsagePool()

// Destruct flushes the connection log and closes the database.
func (s *sharedStore) Destruct() error {
	werr := s.logw.Close()
	if err := s.db.Close(); err != nil {
		return err
	}
	return werr
}

func (s *sharedStore) release() { _, _ = stores.Delete(s.path) }

// logSink hands a stream's connection-log entry to the writer, which
// batches it into the database. It never blocks: when the writer is behind,
// the entry is dropped (and counted in the stream's log_entries_dropped).
func (s *sharedStore) logSink(r streamstate.LogRecord) bool {
	e := storage.ConnLog{
		StreamID:         r.StreamID,
		SourceIP:         r.Source.Addr().Unmap().String(),
		SourcePort:       int(r.Source.Port()),
		BytesSent:        int64(r.BytesSent),
		BytesReceived:    int64(r.BytesReceived),
		DurationMS:       r.Duration.Milliseconds(),
		Action:           r.Action(),
		DisconnectReason: r.Reason.String(),
		StartedAt:        jsontime.Of(r.Start),
		EndedAt:          jsontime.Of(r.Start.Add(r.Duration)),
		Protocol:         storage.ConnTCP,
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

// openStorage opens (or joins) the database and returns the stored hosts.
func (a *App) openStorage() ([]storage.Stored, error) {
	if a.Storage != nil && a.Storage.Disabled {
		return nil, nil
	}
	path := a.storagePath()
	retention := 0
	if a.Storage != nil {
		retention = a.Storage.LogRetention
	}
	logger := a.logger
	keySetting := ""
	if a.Storage != nil {
		keySetting = a.Storage.Key
	}
	v, loaded, err := stores.LoadOrNew(path, func() (caddy.Destructor, error) {
		db, _, err := a.Storage.openStore(false)
		if err != nil {
			return nil, err
		}
		if w := storage.DirWarning(path); w != "" {
			logger.Warn("storage directory open to other users", zap.String("path", path), zap.String("warning", w))
		}
		w := storage.NewLogWriter(db, storage.LogWriterOptions{
			Retention: retention,
			OnError: func(err error) {
				logger.Error("writing the connection log to storage", zap.String("path", path), zap.Error(err))
			},
			OnDrop: countDropped,
			OnRecover: func(lost uint64) {
				logger.Info("the connection log is written to storage again", zap.String("path", path), zap.Uint64("entries_lost", lost))
			},
		})
		return &sharedStore{path: path, db: db, logw: w, retention: retention, key: keySetting}, nil
	})
	var keyErr *storage.KeyError
	if errors.As(err, &keyErr) {
		return nil, err // says what to do
	}
	if err != nil {
		return nil, fmt.Errorf("storage: %v; fix the path or key (storage sqlite <path>), or turn storage off (storage off)", err)
	}
	a.store = v.(*sharedStore)
	if loaded && (a.store.retention != retention || a.store.key != keySetting) {
		a.logger.Warn("storage settings changed while the database stays open: log_retention and storage_key apply after Caddy restarts",
			zap.String("path", path), zap.Int("log_retention_in_use", a.store.retention), zap.Int("log_retention_configured", retention),
			zap.Bool("storage_key_changed", a.store.key != keySetting))
	}
	ctx, cancel := context.WithTimeout(a.ctx, 10*time.Second)
	defer cancel()
	hosts, err := a.store.db.ListHosts(ctx)
	if err != nil {
		return nil, fmt.Errorf("storage %s: reading stream hosts: %v", path, err)
	}
	return hosts, nil
}
