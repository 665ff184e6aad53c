package storage

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"reflect"
	"slices"
	"strings"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// Actions of an audit entry.
const (
	AuditCreate     = "create"
	AuditUpdate     = "update"
	AuditEnable     = "enable"
	AuditDisable    = "disable"
	AuditDelete     = "delete"
	AuditCertCreate = "cert_create"
	AuditCertUpdate = "cert_update"
	AuditCertDelete = "cert_delete"
)

// AuditRetention is the number of audit entries kept: each write prunes
// the older ones in its transaction.
const AuditRetention = 10000

// Limits of AuditQuery.Limit.
const (
	DefaultAuditLimit = 50
	MaxAuditLimit     = 1000
)

// AuditSource is who asked for a change: what an audit entry records
// beside the change. The API puts it on the context of a write
// (WithAudit); a write whose context has none (the aegis streams
// commands, a node applying another's change) stores no audit entry.
type AuditSource struct {
	// Actor is the authenticated user, or "admin endpoint".
	Actor string
	// Remote is the client's address (host:port).
	Remote string
}

type auditKey struct{}

// WithAudit returns ctx with src: the writes made with it store an audit
// entry in their transaction.
func WithAudit(ctx context.Context, src AuditSource) context.Context {
	return context.WithValue(ctx, auditKey{}, src)
}

// auditFrom is the AuditSource of ctx, if it has one.
func auditFrom(ctx context.Context) (AuditSource, bool) {
	src, ok := ctx.Value(auditKey{}).(AuditSource)
	return src, ok
}

// AuditChange is one field a change set: its JSON name, the value before
// (null on create) and after (null on delete, or when the setting went
// back to its default).
type AuditChange struct {
	Field string `json:"field"`
	From  any    `json:"from"`
	To    any    `json:"to"`
}

// AuditEntry is one change made through the API.
type AuditEntry struct {
	ID     int64         `json:"id"`
	Time   jsontime.Time `json:"time"`
	Node   string        `json:"node"`
	Actor  string        `json:"actor"`
	Remote string        `json:"remote"`
	// Action is one of the Audit… constants.
	Action        string `json:"action"`
	StreamID      int64  `json:"stream_id"`
	CertificateID int64  `json:"certificate_id"`
	// Name is the stream's or certificate's name (the new one on a
	// rename).
	Name string `json:"name"`
	// Changes are never null; [] on delete.
	Changes []AuditChange `json:"changes"`
}

// AuditQuery selects audit entries, newest first; to page back, pass the
// smallest ID of one page as Before of the next.
type AuditQuery struct {
	// StreamID, when > 0, selects one stream's entries.
	StreamID int64
	// Limit is the most entries returned: 0 means DefaultAuditLimit, more
	// than MaxAuditLimit means MaxAuditLimit.
	Limit int
	// Before, when > 0, returns only entries with an ID below it.
	Before int64
}

// streamChanges is the field-by-field difference between two streams, in
// their JSON form, fields in order of name.
func streamChanges(old, new *spec.Stream) []AuditChange {
	var a, b map[string]json.RawMessage
	if old != nil {
		a = jsonFields(old)
	}
	if new != nil {
		b = jsonFields(new)
	}
	delete(a, "id")
	delete(b, "id")
	return diffFields(a, b)
}

// certAuditFields are the certificate's fields an audit entry shows: no
// certificate PEM (long, and its dates and domains say what changed) and,
// as spec.Certificate has none, never a private key.
var certAuditFields = []string{"name", "source", "domains", "issuer", "not_before", "not_after"}

// certChanges is streamChanges for certificates: certAuditFields only.
func certChanges(old, new *spec.Certificate) []AuditChange {
	pick := func(c *spec.Certificate) map[string]json.RawMessage {
		if c == nil {
			return nil
		}
		all := jsonFields(c)
		out := make(map[string]json.RawMessage, len(certAuditFields))
		for _, f := range certAuditFields {
			if v, ok := all[f]; ok {
				out[f] = v
			}
		}
		return out
	}
	return diffFields(pick(old), pick(new))
}

// jsonFields is v's JSON object as its fields.
func jsonFields(v any) map[string]json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		return nil
	}
	var m map[string]json.RawMessage
	if json.Unmarshal(b, &m) != nil {
		return nil
	}
	return m
}

// diffFields lists the fields whose JSON differs between a and b, a field
// missing on one side (omitted as empty) as null.
func diffFields(a, b map[string]json.RawMessage) []AuditChange {
	names := make([]string, 0, len(a)+len(b))
	for k := range a {
		names = append(names, k)
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			names = append(names, k)
		}
	}
	slices.Sort(names)
	out := []AuditChange{}
	for _, k := range names {
		from, to := a[k], b[k]
		if bytes.Equal(from, to) {
			continue
		}
		var fv, tv any
		if from != nil {
			_ = json.Unmarshal(from, &fv)
		}
		if to != nil {
			_ = json.Unmarshal(to, &tv)
		}
		if reflect.DeepEqual(fv, tv) {
			continue
		}
		out = append(out, AuditChange{Field: k, From: fv, To: tv})
	}
	return out
}

// updateAction is the action of a stream update: enable or disable when
// enabled is the only change.
func updateAction(changes []AuditChange) string {
	if len(changes) == 1 && changes[0].Field == "enabled" {
		if on, _ := changes[0].To.(bool); on {
			return AuditEnable
		}
		return AuditDisable
	}
	return AuditUpdate
}

// audit stores e in tx if ctx carries an AuditSource, and prunes the
// entries beyond AuditRetention.
func (s *core) audit(ctx context.Context, tx writeTx, e AuditEntry) error {
	src, ok := auditFrom(ctx)
	if !ok {
		return nil
	}
	if e.Changes == nil {
		e.Changes = []AuditChange{}
	}
	changes, err := json.Marshal(e.Changes)
	if err != nil {
		return fmt.Errorf("audit: %w", err)
	}
	if _, err := tx.exec(ctx, `INSERT INTO audit_log (at, node, actor, remote, action, stream_id, certificate_id, name, changes)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		millis(s.nowMillis()), s.node, src.Actor, src.Remote, e.Action, e.StreamID, e.CertificateID, e.Name, string(changes)); err != nil {
		return fmt.Errorf("audit: inserting: %w", err)
	}
	if _, err := tx.exec(ctx, `DELETE FROM audit_log WHERE id <= (
		SELECT id FROM audit_log ORDER BY id DESC LIMIT 1 OFFSET ?)`, AuditRetention); err != nil {
		return fmt.Errorf("audit: pruning: %w", err)
	}
	return nil
}

// AuditLog returns audit entries, newest first, as selected by q.
func (s *core) AuditLog(ctx context.Context, q AuditQuery) ([]AuditEntry, error) {
	limit, where, args := pageQuery(q.Limit, DefaultAuditLimit, MaxAuditLimit, q.StreamID, q.Before)
	query := `SELECT id, at, node, actor, remote, action, stream_id, certificate_id, name, changes FROM audit_log`
	if len(where) > 0 {
		query += " WHERE " + strings.Join(where, " AND ")
	}
	query += " ORDER BY id DESC LIMIT ?"
	args = append(args, limit)
	out := []AuditEntry{}
	err := s.reads.queryEach(ctx, query, args, func(r rowScanner) error {
		var (
			e       AuditEntry
			at      sql.NullInt64
			changes string
		)
		if err := r.Scan(&e.ID, &at, &e.Node, &e.Actor, &e.Remote, &e.Action, &e.StreamID, &e.CertificateID, &e.Name, &changes); err != nil {
			return err
		}
		e.Time = jsontime.Of(fromMillis(at))
		if err := json.Unmarshal([]byte(changes), &e.Changes); err != nil || e.Changes == nil {
			e.Changes = []AuditChange{}
		}
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: reading audit log: %w", err)
	}
	return out, nil
}

// pageQuery starts the query of a page of entries, newest first: the
// limit (def for 0, most at the most) and the conditions (joined with
// AND) and their arguments that select one stream's (streamID > 0) and
// those below an id (before > 0).
func pageQuery(limit, def, most int, streamID, before int64) (int, []string, []any) {
	switch {
	case limit <= 0:
		limit = def
	case limit > most:
		limit = most
	}
	var (
		where []string
		args  []any
	)
	if streamID > 0 {
		where = append(where, "stream_id = ?")
		args = append(args, streamID)
	}
	if before > 0 {
		where = append(where, "id < ?")
		args = append(args, before)
	}
	return limit, where, args
}
