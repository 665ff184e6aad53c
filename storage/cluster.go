package storage

import (
	"context"
	"encoding/json"
	"errors"
	"time"
)

// What a store shared by several Aegis nodes adds to Store (issue 14): the
// history of writes that every node follows, and the nodes' heartbeats.
// Postgres implements it; SQLite, which one node owns, does not.

var (
	// ErrStale means a write was refused because the database holds
	// changes this node has not applied yet (see Cluster.SetApplied). The
	// transaction was rolled back and nothing changed: the node applies
	// the changes it missed and tries the write again, so that its checks
	// (If-Match versions, port clashes) see every other node's writes.
	ErrStale = errors.New("this node has not applied the newest changes yet")

	// ErrHistoryPruned means the changes after the one asked for are no
	// longer all kept: the caller reloads every stream and certificate.
	ErrHistoryPruned = errors.New("the change history needed was pruned")

	// ErrNodeNameTaken means another running node already uses this
	// node's name.
	ErrNodeNameTaken = errors.New("another running node has this node name")
)

// Change kinds and operations.
const (
	ChangeStream      = "stream"
	ChangeCertificate = "certificate"

	OpCreate = "create"
	OpUpdate = "update"
	OpDelete = "delete"
)

// Change is one committed write to the shared streams or certificates. IDs
// increase in commit order, cluster-wide.
type Change struct {
	ID       int64     `json:"id"`
	Kind     string    `json:"kind"` // ChangeStream or ChangeCertificate
	Op       string    `json:"op"`   // OpCreate, OpUpdate or OpDelete
	ObjectID int64     `json:"object_id"`
	Node     string    `json:"node"` // the node that made it
	At       time.Time `json:"at"`
}

// NodeStatus is what a node reports of itself in its heartbeat.
type NodeStatus struct {
	Name          string    `json:"name"`
	Address       string    `json:"address,omitempty"` // where its admin endpoint listens
	Version       string    `json:"version,omitempty"` // of the binary
	AppliedChange int64     `json:"applied_change"`
	Snapshot      bool      `json:"snapshot,omitempty"` // runs from its local snapshot
	LastSeen      time.Time `json:"last_seen"`          // set by the database
	// Streams is the node's per-stream counters and health, as the
	// node's stats API answers them.
	Streams json.RawMessage `json:"streams,omitempty"`
}

// Cluster is a Store that several nodes share.
//
// Every write of the Store methods (hosts and certificates) also appends a
// Change in the same transaction and notifies the listening nodes. Writes
// are serialized cluster-wide, and each one first checks that this node
// has applied every earlier change (ErrStale otherwise); a node's own
// committed write counts as applied.
type Cluster interface {
	Store

	// Node is this node's name, as given when the store was opened.
	Node() string

	// ClaimNode makes sure no other running node uses this node's name,
	// and holds the name until Close; ErrNodeNameTaken otherwise.
	ClaimNode(ctx context.Context) error

	// LastChange returns the ID of the newest change, or 0.
	LastChange(ctx context.Context) (int64, error)

	// ChangesAfter returns at most limit changes with IDs above after,
	// oldest first, or ErrHistoryPruned when some of them are gone.
	ChangesAfter(ctx context.Context, after int64, limit int) ([]Change, error)

	// SetApplied records that this node has applied every change up to
	// id; later writes check against it (ErrStale).
	SetApplied(id int64)

	// Applied returns the ID SetApplied (or this node's last write) set.
	Applied() int64

	// Listen calls notify with the change ID of each notification, and
	// with 0 after every (re)connect (when notifications may have been
	// missed), until ctx is done. It reconnects by itself within about a
	// second of the database coming back.
	Listen(ctx context.Context, notify func(changeID int64)) error

	// Heartbeat stores this node's status; the database sets LastSeen.
	Heartbeat(ctx context.Context, s NodeStatus) error

	// Nodes returns every node that has sent a heartbeat, by name.
	Nodes(ctx context.Context) ([]NodeStatus, error)

	// AppendHistory stores samples of this node's streams and prunes
	// those older than HistoryRetention.
	AppendHistory(ctx context.Context, samples []HistorySample) error

	// History returns each node's samples of a stream after since.
	History(ctx context.Context, streamID int64, since time.Time) ([]NodeHistory, error)
}
