// Package storage keeps stream hosts, the connection log and TLS
// certificates in a database: an embedded SQLite file for one node, or a
// PostgreSQL database that several Aegis nodes share.
//
// Store is the interface the streams app and the admin API use. It has two
// implementations, which share their logic (core, in sqldb.go: hosts,
// certificates, the connection log's queries, the sealing of private
// keys) and differ in how they run statements and transactions:
//
//   - SQLite, on an SQLite file (pure Go, no cgo; Open, OpenWith);
//   - Postgres, on PostgreSQL with pgx (OpenPostgres), which also
//     implements Cluster: every write of hosts and certificates is
//     serialized cluster-wide under an advisory lock, refused with
//     ErrStale while this node has not applied every earlier change, and
//     recorded in the changes table with a notification (ChangesChannel)
//     in its transaction; nodes follow the changes with Listen and
//     ChangesAfter, claim their names (ClaimNode) and send heartbeats.
//
// LogWriter puts connection-log entries into a Store in batches, off the
// connection path; each entry carries the name of the node that logged it.
//
// The private keys of custom certificates are stored sealed with AES-256-GCM
// under a key the store is opened with (OpenOptions.Key or .KeyFile,
// PostgresOptions.Key, ParseKey), which a sealed canary in the database
// ties to it (KeyCheck); no type the store returns holds a private key,
// except the bytes CertificateKey returns. SealPrivateKey and
// OpenPrivateKey seal the same way, for export files.
//
// A database that cannot be written or reached is an *UnavailableError
// (ErrUnavailable) that names it and its cause; the same store works again
// once the cause is gone.
//
// The package imports no Caddy package: it knows nothing of listeners or
// handlers. It stores the schema's spec.Stream: the settings the database
// must index or constrain (id, listen address and port, protocol,
// enabled, certificate) in columns, the others in one JSON column, so a
// new setting needs no change here.
package storage

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// Errors a Store returns, wrapped with what failed; test for them with
// errors.Is.
var (
	// ErrNotFound means no host has the given ID.
	ErrNotFound = errors.New("not found")

	// ErrConflict means a host with the given ID already exists.
	ErrConflict = errors.New("already exists")

	// ErrInvalid means an argument cannot be stored or queried as given,
	// such as a negative ID or an unknown action.
	ErrInvalid = errors.New("invalid argument")

	// ErrSchemaTooNew means the database was written by a newer version of
	// this package, with migrations this version does not know. It is
	// refused rather than used, since this version could damage it.
	ErrSchemaTooNew = errors.New("database schema is newer than this version supports")

	// ErrInUse means a certificate cannot be deleted because stream hosts
	// use it; the error is an *InUseError that names them.
	ErrInUse = errors.New("in use")

	// ErrNoKey means a private key had to be sealed or opened, but the
	// store was opened without an encryption key (see OpenWith).
	ErrNoKey = errors.New("no encryption key for private keys is configured")

	// ErrWrongKey means a sealed private key does not open with the
	// store's key: the key is not the one it was sealed with, or the
	// sealed bytes were changed or moved to another certificate.
	ErrWrongKey = errors.New("the private key cannot be decrypted with this key (was the key file replaced?)")
)

// Store keeps stream hosts, their connection log and certificates.
//
// Every write is one transaction. Host and certificate writes take an apply
// callback that runs inside the transaction, after the change is written
// and before it is committed, with the host (or certificate) as it will be
// stored: the caller applies the change to the running proxy there. If apply returns an error, the
// transaction is rolled back and the method returns that error wrapped (so
// errors.Is and errors.As see it); the database is unchanged. Either the
// host is stored and live, or nothing is left behind.
//
// One window remains: the commit itself can fail after apply succeeded (a
// full disk, an I/O error). The method then returns an error although apply
// returned nil, and the caller should undo what apply did. A nil apply is
// allowed and does nothing.
//
// apply runs while the store holds its write lock: it should be quick, it
// may read from the store (it sees the state before the change), and it must
// not write to the store, which would wait for the lock it is inside of.
//
// Methods are safe for concurrent use.
type Store interface {
	// ListHosts returns every host, ordered by ID.
	ListHosts(ctx context.Context) ([]Stored, error)

	// GetHost returns the host with the given ID, or ErrNotFound.
	GetHost(ctx context.Context, id int64) (Stored, error)

	// CreateHost stores a new host and returns it as stored. With s.ID 0
	// the store assigns an ID; with s.ID > 0 that ID is used, and
	// ErrConflict is returned if it is taken. CreatedAt and UpdatedAt are
	// set to the current time and Version to a new version. IDs of
	// deleted hosts are not assigned again.
	CreateHost(ctx context.Context, s spec.Stream, apply func(h Stored) error) (Stored, error)

	// UpdateHost replaces every setting of the host with ID s.ID and
	// returns it as stored, or ErrNotFound. CreatedAt is kept, UpdatedAt
	// set to the current time and Version to a new version. apply
	// receives the host before and after the change.
	UpdateHost(ctx context.Context, s spec.Stream, apply func(old, new Stored) error) (Stored, error)

	// DeleteHost deletes the host with the given ID and its connection log,
	// or returns ErrNotFound. apply receives the host as it was.
	DeleteHost(ctx context.Context, id int64, apply func(old Stored) error) error

	// AppendConnLogs stores a batch of connection-log entries in one
	// transaction: all of them or, on error, none. The entries' IDs are
	// ignored and assigned by the store, in order. An entry whose StreamID
	// is not > 0, whose Action is neither ActionAllowed nor ActionBlocked,
	// whose Protocol is not "", ConnTCP or ConnUDP, or that has datagram
	// counts without being ConnUDP fails the batch with ErrInvalid. The
	// store does not keep the slice.
	AppendConnLogs(ctx context.Context, entries []ConnLog) error

	// ConnLogs returns connection-log entries, newest first, as selected
	// by q.
	ConnLogs(ctx context.Context, q ConnLogQuery) ([]ConnLog, error)

	// AuditLog returns audit entries (the changes made through the API,
	// which the writes whose context has an AuditSource store in their
	// transaction), newest first, as selected by q.
	AuditLog(ctx context.Context, q AuditQuery) ([]AuditEntry, error)

	// PruneConnLogs deletes all but the newest keep entries of one stream's
	// connection log and returns how many it deleted. keep 0 deletes them
	// all; a negative keep is ErrInvalid. The deletes are one transaction:
	// after an error none are deleted, and 0 is returned.
	PruneConnLogs(ctx context.Context, streamID int64, keep int) (int64, error)

	// ListCertificates returns every certificate, ordered by ID, without
	// private keys.
	ListCertificates(ctx context.Context) ([]spec.Certificate, error)

	// GetCertificate returns the certificate with the given ID, or
	// ErrNotFound.
	GetCertificate(ctx context.Context, id int64) (spec.Certificate, error)

	// CertificateKey returns the private key of the custom certificate
	// with the given ID, decrypted: the PEM given when it was stored. It
	// is for the engine that serves TLS; never return it through the API.
	// It fails with ErrNotFound, with ErrInvalid for a managed
	// certificate (Caddy keeps those keys), with ErrNoKey when the store
	// has no key and with ErrWrongKey when its key does not open it.
	CertificateKey(ctx context.Context, id int64) ([]byte, error)

	// CreateCertificate stores a new certificate and returns it as stored;
	// IDs, CreatedAt and UpdatedAt are handled as CreateHost does. A
	// custom certificate needs CertificatePEM and keyPEM, which is stored
	// sealed (ErrNoKey without a store key); a managed one must have
	// neither. An unknown Source is ErrInvalid. The store does not parse
	// either PEM: validate them first (package certcheck). apply does
	// not receive the private key: the caller has it.
	CreateCertificate(ctx context.Context, c spec.Certificate, keyPEM []byte, apply func(c spec.Certificate) error) (spec.Certificate, error)

	// UpdateCertificate replaces every field of the certificate with ID
	// c.ID and returns it as stored, or ErrNotFound; CreatedAt and
	// UpdatedAt are handled as UpdateHost does. A nil or empty keyPEM
	// keeps the stored private key (which the store cannot check against
	// a new chain); a custom certificate that had none (it was managed)
	// needs one. Making a certificate managed drops its chain and key.
	// apply receives the certificate before and after the change.
	UpdateCertificate(ctx context.Context, c spec.Certificate, keyPEM []byte, apply func(old, new spec.Certificate) error) (spec.Certificate, error)

	// DeleteCertificate deletes the certificate with the given ID, or
	// returns ErrNotFound. While stream hosts have it as their
	// ssl_cert_id or upstream_tls_client_cert_id (whether or not TLS is
	// enabled on them) it refuses
	// with an *InUseError (errors.Is ErrInUse) that lists them. Streams
	// defined only in the Caddy config are not in the store: check those
	// in apply, which receives the certificate as it was.
	DeleteCertificate(ctx context.Context, id int64, apply func(old spec.Certificate) error) error

	// Close releases the store. Calls after Close fail.
	Close() error
}

// Stored is a stream host as stored: its settings, and when it was created
// and last changed.
//
// The store keeps what it is given: defaults and validation belong to
// package spec. Empty CIDR lists are returned as nil. Stored has no JSON
// form of its own: decoding one would go to the embedded Stream's
// UnmarshalJSON; the API answers with spec.HostStatus.
type Stored struct {
	spec.Stream

	// CreatedAt is when the host was created, in UTC, to the millisecond.
	// Set by the store.
	CreatedAt time.Time

	// UpdatedAt is when the host was last written, in UTC, to the
	// millisecond. Set by the store.
	UpdatedAt time.Time

	// Version is the host's version: every create and update gives it a
	// new one, above every version the store handed out before, to any
	// host. Set by the store.
	Version int64
}

// Actions a connection-log entry records.
const (
	// ActionAllowed is a connection that was relayed.
	ActionAllowed = "allowed"
	// ActionBlocked is a connection that was refused (ACL, limits).
	ActionBlocked = "blocked"
)

// Protocols of a connection-log entry.
const (
	// ConnTCP is a TCP connection.
	ConnTCP = "tcp"
	// ConnUDP is a UDP NAT entry: the datagrams of one client address
	// and port.
	ConnUDP = "udp"
)

// ConnLog is one entry of the connection log: one connection, written when
// it ended.
type ConnLog struct {
	// ID identifies the entry; assigned by the store, increasing.
	ID int64 `json:"id"`

	// Node is the name of the node that took the connection: the store
	// sets it to the node name it was opened with, whatever the entry
	// says; "" for a store opened without one and for entries stored
	// before entries had a node.
	Node string `json:"node,omitempty"`

	// Upstream is the upstream (host:port) the connection went to; ""
	// when none was reached, and for entries from before it was kept.
	Upstream string `json:"upstream,omitempty"`

	// StreamID is the ID of the stream that took the connection; > 0.
	StreamID int64 `json:"stream_id"`

	// SourceIP is the client's IP address.
	SourceIP string `json:"source_ip"`

	// SourcePort is the client's port; 0 when unknown.
	SourcePort int `json:"source_port,omitempty"`

	// BytesSent is the number of bytes relayed client→upstream, as the
	// spec's connection log defines it.
	BytesSent int64 `json:"bytes_sent"`

	// BytesReceived is the number of bytes relayed upstream→client.
	BytesReceived int64 `json:"bytes_received"`

	// DurationMS is how long the connection lasted, in milliseconds.
	DurationMS int64 `json:"duration_ms"`

	// Action is ActionAllowed or ActionBlocked.
	Action string `json:"action"`

	// DisconnectReason says why the connection ended, or why it was
	// blocked.
	DisconnectReason string `json:"disconnect_reason,omitempty"`

	// StartedAt is when the connection was accepted; stored to the
	// millisecond, returned in UTC.
	StartedAt jsontime.Time `json:"started_at,omitzero"`

	// EndedAt is when the connection ended; stored to the millisecond,
	// returned in UTC.
	EndedAt jsontime.Time `json:"ended_at,omitzero"`

	// Protocol is ConnTCP or ConnUDP. Default: "", stored as ConnTCP.
	Protocol string `json:"protocol"`

	// DatagramsSent is the number of datagrams relayed client→upstream
	// and DatagramsReceived upstream→client, as the log line's fields of
	// the same names. UDP entries only; nil for TCP and for UDP entries
	// stored before these counts were.
	DatagramsSent     *int64 `json:"datagrams_sent,omitempty"`
	DatagramsReceived *int64 `json:"datagrams_received,omitempty"`
}

// Limits of ConnLogQuery.Limit.
const (
	// DefaultConnLogLimit is the number of entries returned when
	// ConnLogQuery.Limit is 0.
	DefaultConnLogLimit = 50
	// MaxConnLogLimit is the most entries one page of the API returns.
	MaxConnLogLimit = 1000
	// MaxConnLogExportLimit is the most entries one query returns: the
	// API's CSV download.
	MaxConnLogExportLimit = 100000
)

// ConnLogQuery selects connection-log entries. Entries come newest first;
// to page back, pass the smallest ID of one page as Before of the next.
type ConnLogQuery struct {
	// StreamID selects one stream's entries; 0 selects every stream's.
	StreamID int64

	// Limit is the most entries returned. Default: 0, meaning
	// DefaultConnLogLimit; larger than MaxConnLogExportLimit means
	// MaxConnLogExportLimit.
	Limit int

	// Before, when > 0, returns only entries with an ID below it.
	Before int64

	// Action, when not "", returns only entries with that action
	// (ActionAllowed or ActionBlocked).
	Action string

	// Node, when not "", returns only the entries of the node of that
	// name.
	Node string

	// Source, when valid, returns only the entries whose source_ip is in
	// it (a single address is a /32 or /128).
	Source netip.Prefix

	// Reason, when not "", returns only the entries with that
	// disconnect_reason.
	Reason string

	// Since and Until, when not zero, return only the entries that ended
	// at or after Since and before Until.
	Since, Until time.Time
}
