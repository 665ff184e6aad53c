package spec

import (
	"encoding/json"
	"errors"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
)

// The types the API returns, and the errors of the writes it serves.

// Errors of the streams app's management functions (which the API
// serves), for errors.Is. Validation problems are *FieldError values,
// joined with errors.Join when there are several.
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
	// ErrInUse: the certificate is used by streams (the error names them).
	ErrInUse = errors.New("in use")
)

// Sources of a stream host.
const (
	SourceConfig = "config"
	SourceAPI    = "api"
)

// Status is a stream's runtime status, as the API shows it.
type Status struct {
	ID       int64  `json:"id"`
	Name     string `json:"name"`
	Protocol string `json:"protocol"`
	// Listening is true while the stream's listeners serve it: for tcp+udp
	// only when both are up.
	Listening bool `json:"listening"`
	// Healthy is the last health check's outcome; null when health checks
	// are off or none has run yet.
	Healthy *bool `json:"healthy"`
	// HealthStatus is "healthy", "unhealthy", "pending" (checks on, none
	// done yet) or "not_checked" (checks off, or a UDP-only stream, which a
	// TCP dial cannot check).
	HealthStatus    string         `json:"health_status"`
	LastHealthError string         `json:"last_health_error"`
	LastHealthCheck *jsontime.Time `json:"last_health_check"`
	// ActiveConnections are open now.
	ActiveConnections int64 `json:"active_connections"`
	// TotalConnections were accepted since the last reload, blocked ones
	// included.
	TotalConnections uint64 `json:"total_connections"`
	// BlockedConnections were refused by the ACL or max_connections since
	// the last reload.
	BlockedConnections uint64 `json:"blocked_connections"`
	// BytesSent went client → upstream since the last reload.
	BytesSent uint64 `json:"bytes_sent"`
	// BytesReceived went upstream → client since the last reload.
	BytesReceived uint64 `json:"bytes_received"`
	// LogEntriesDropped were not logged, or not stored: a log queue was
	// full, or storage failed to write them.
	LogEntriesDropped uint64 `json:"log_entries_dropped"`
	// DatagramsDropped are UDP datagrams of open NAT entries dropped since
	// the last reload: over a rate limit, or a socket buffer was full.
	DatagramsDropped uint64 `json:"datagrams_dropped"`
	// Upstreams is the status of each upstream, for a stream with
	// upstreams; left out for a stream with one upstream_host.
	Upstreams []UpstreamStatus `json:"upstreams,omitempty"`
	// Cluster is the stream's counters summed over the nodes that share
	// this node's PostgreSQL storage: set in the rows of GET
	// /api/v1/streams and GET /api/v1/streams/{id}, left out elsewhere
	// and with SQLite.
	Cluster *ClusterTotals `json:"cluster,omitempty"`
}

// ClusterTotals are a stream's counters summed over the nodes of a
// cluster that run it: this node's as they are now, every other node's as
// its last heartbeat gave them, leaving out the nodes whose heartbeat is
// stale. Each node's numbers count since its own last reload.
type ClusterTotals struct {
	// Nodes is how many nodes were summed, this one included.
	Nodes              int    `json:"nodes"`
	ActiveConnections  int64  `json:"active_connections"`
	TotalConnections   uint64 `json:"total_connections"`
	BlockedConnections uint64 `json:"blocked_connections"`
	BytesSent          uint64 `json:"bytes_sent"`
	BytesReceived      uint64 `json:"bytes_received"`
}

// Add adds one node's status of the stream.
func (t *ClusterTotals) Add(s *Status) {
	t.Nodes++
	t.ActiveConnections += s.ActiveConnections
	t.TotalConnections += s.TotalConnections
	t.BlockedConnections += s.BlockedConnections
	t.BytesSent += s.BytesSent
	t.BytesReceived += s.BytesReceived
}

// Sum adds another set of totals.
func (t *ClusterTotals) Sum(o ClusterTotals) {
	t.Nodes += o.Nodes
	t.ActiveConnections += o.ActiveConnections
	t.TotalConnections += o.TotalConnections
	t.BlockedConnections += o.BlockedConnections
	t.BytesSent += o.BytesSent
	t.BytesReceived += o.BytesReceived
}

// UpstreamStatus is one upstream's runtime status.
type UpstreamStatus struct {
	Host string `json:"host"`
	Port int    `json:"port"`
	// Backup is the upstream's setting.
	Backup bool `json:"backup,omitempty"`
	// Healthy is false while new connections skip it: its last dial
	// failed within fail_timeout_seconds, or its last health check did.
	Healthy bool `json:"healthy"`
	// LastError is the error of its last failed dial or health check.
	LastError string `json:"last_error"`
	// ActiveConnections are open now (UDP: NAT entries); TotalConnections
	// and the bytes count since the stream started, across reloads.
	ActiveConnections int64  `json:"active_connections"`
	TotalConnections  uint64 `json:"total_connections"`
	DialFailures      uint64 `json:"dial_failures"`
	BytesSent         uint64 `json:"bytes_sent"`
	BytesReceived     uint64 `json:"bytes_received"`
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
	// Upstream is the host:port the connection went to ("" while it is
	// being dialed).
	Upstream string `json:"upstream,omitempty"`
	// ListenPort is the port the connection came in on, for a stream
	// with a port range.
	ListenPort int `json:"listen_port,omitempty"`
}

// PortCheck asks whether a stream could listen on an address and port.
type PortCheck struct {
	Protocol      string `json:"protocol"`
	ListenAddress string `json:"listen_address"`
	ListenPort    int    `json:"listen_port"`
	// ListenPortEnd, when set, checks every port from ListenPort to it.
	ListenPortEnd int `json:"listen_port_end,omitempty"`
	// SNI, when set, checks the port as one shared by server name.
	SNI []string `json:"sni,omitempty"`
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

// Sources of a certificate.
const (
	// SourceCustom is a certificate uploaded with its private key.
	SourceCustom = "custom"
	// SourceManaged is a certificate Caddy's TLS automation obtains and
	// renews for Domains; Caddy keeps its key.
	SourceManaged = "managed"
)

// Certificate is a TLS certificate as stored, without its private key: no
// field holds it, so nothing can serialize it by accident. The store's
// CertificateKey returns the key of a custom certificate.
//
// The store keeps what it is given: parse and validate certificates before
// storing them (package certcheck).
type Certificate struct {
	// ID identifies the certificate; > 0 once stored. Hosts refer to it
	// as ssl_cert_id.
	ID int64 `json:"id"`

	// Name is a human-readable name.
	Name string `json:"name"`

	// Source is SourceCustom or SourceManaged.
	Source string `json:"source"`

	// Domains are the names the certificate is for: the leaf's DNS names
	// and IP addresses for a custom certificate, the names to obtain a
	// certificate for when managed. Empty is returned as nil.
	Domains []string `json:"domains"`

	// Issuer names the certificate's issuer; "" while a managed
	// certificate has not been obtained.
	Issuer string `json:"issuer,omitempty"`

	// NotBefore and NotAfter bound the certificate's validity, stored to
	// the millisecond, returned in UTC; zero while unknown.
	NotBefore jsontime.Time `json:"not_before,omitzero"`
	NotAfter  jsontime.Time `json:"not_after,omitzero"`

	// CertificatePEM is the chain of a custom certificate, leaf first: the
	// public part only. Empty for a managed certificate.
	CertificatePEM string `json:"certificate,omitempty"`

	// CreatedAt is when the certificate was created, in UTC, to the
	// millisecond. Set by the store.
	CreatedAt jsontime.Time `json:"created_at,omitzero"`

	// UpdatedAt is when the certificate was last written, in UTC, to the
	// millisecond. Set by the store.
	UpdatedAt jsontime.Time `json:"updated_at,omitzero"`
}

// CertInput is a certificate as the API takes it: a custom certificate's
// PEM chain and private key, or, for a certificate that Caddy obtains and
// renews (managed), its domain names. The private key is never returned.
type CertInput struct {
	Name        string   `json:"name"`
	Certificate string   `json:"certificate,omitempty"`
	PrivateKey  string   `json:"private_key,omitempty"`
	Domains     []string `json:"domains,omitempty"`
}

// CertStatus is a stored certificate, without its private key, with the
// streams that use it.
type CertStatus struct {
	Certificate
	// UsedBy are the ids of the streams whose ssl_cert_id it is.
	UsedBy []int64 `json:"used_by"`
	// Warnings about the certificate (e.g. it expires within 30 days),
	// on create and update.
	Warnings []string `json:"warnings,omitempty"`
}
