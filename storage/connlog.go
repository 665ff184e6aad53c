package storage

import (
	"context"
	"database/sql"
	"fmt"
	"math/bits"
	"strings"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// validConnLog checks what the conn_log table requires of an entry.
func validConnLog(e ConnLog) error {
	if e.StreamID <= 0 {
		return fmt.Errorf("stream_id %d: must be > 0: %w", e.StreamID, ErrInvalid)
	}
	if e.Action != ActionAllowed && e.Action != ActionBlocked {
		return fmt.Errorf("action %q: must be %q or %q: %w", e.Action, ActionAllowed, ActionBlocked, ErrInvalid)
	}
	switch e.Protocol {
	case "", ConnTCP:
		if e.DatagramsSent != nil || e.DatagramsReceived != nil {
			return fmt.Errorf("datagrams_sent, datagrams_received: only %q entries have them, not %q: %w", ConnUDP, ConnTCP, ErrInvalid)
		}
	case ConnUDP:
	default:
		return fmt.Errorf("protocol %q: must be %q or %q: %w", e.Protocol, ConnTCP, ConnUDP, ErrInvalid)
	}
	return nil
}

// checkConnLogs checks a batch of entries before it is written.
func checkConnLogs(entries []ConnLog) error {
	for i, e := range entries {
		if err := validConnLog(e); err != nil {
			return fmt.Errorf("storage: appending conn log: entry %d: %w", i, err)
		}
	}
	return nil
}

// connLogColumns are the conn_log columns an entry is written to, in the
// order of connLogBoxes.appendRow (and of its col constants).
var connLogColumns = []string{"node", "stream_id", "source_ip", "source_port", "bytes_sent", "bytes_received",
	"duration_ms", "action", "disconnect_reason", "started_at", "ended_at",
	"protocol", "datagrams_sent", "datagrams_received", "upstream"}

// connLogBoxes turns a batch's entries into rows of values a driver takes
// as they are (int64, string, nil for NULL): database/sql would otherwise
// convert each sql.NullInt64 and *int64 through an interface call or
// reflection, for every one of thousands of rows a second. Putting a
// string, or an int64 of 256 or more, in an interface allocates, and the
// rows of a batch mostly repeat their neighbours' node, stream, source,
// action, reason, protocol and upstream, and often their times: so each
// column keeps the previous row's value in its box and reuses the box
// when the next row's value is the same (an interface compared with a
// plain value allocates nothing). Use one per batch.
type connLogBoxes struct {
	last [connLogColumnCount]any
}

// Indexes of connLogColumns, for connLogBoxes.last.
const (
	colNode = iota
	colStreamID
	colSourceIP
	colSourcePort
	colBytesSent
	colBytesReceived
	colDurationMS
	colAction
	colReason
	colStartedAt
	colEndedAt
	colProtocol
	colDatagramsSent
	colDatagramsReceived
	colUpstream
	connLogColumnCount // len(connLogColumns)
)

// newConnLogBoxes returns the boxes for one batch whose rows are tagged with node.
func newConnLogBoxes(node string) connLogBoxes {
	var b connLogBoxes
	b.last[colNode] = node
	return b
}

// appendRow appends e's row in connLogColumns order, tagged with the
// store's node, to args.
func (b *connLogBoxes) appendRow(args []any, e ConnLog) []any {
	proto := e.Protocol
	if proto == "" {
		proto = ConnTCP
	}
	var port any
	if e.SourcePort != 0 {
		port = b.int(colSourcePort, int64(e.SourcePort))
	}
	return append(args, b.last[colNode], b.int(colStreamID, e.StreamID), b.str(colSourceIP, e.SourceIP), port,
		b.int(colBytesSent, e.BytesSent), b.int(colBytesReceived, e.BytesReceived), b.int(colDurationMS, e.DurationMS),
		b.str(colAction, e.Action), b.str(colReason, e.DisconnectReason),
		b.millis(colStartedAt, e.StartedAt.Time), b.millis(colEndedAt, e.EndedAt.Time), b.str(colProtocol, proto),
		b.ptr(colDatagramsSent, e.DatagramsSent), b.ptr(colDatagramsReceived, e.DatagramsReceived),
		b.str(colUpstream, e.Upstream))
}

// int is v in an interface, column c's last box when it holds v.
func (b *connLogBoxes) int(c int, v int64) any {
	if b.last[c] != v {
		b.last[c] = v
	}
	return b.last[c]
}

// str is s in an interface, column c's last box when it holds s.
func (b *connLogBoxes) str(c int, s string) any {
	if b.last[c] != s {
		b.last[c] = s
	}
	return b.last[c]
}

// ptr is *p as an int64, or NULL (nil) for a nil p.
func (b *connLogBoxes) ptr(c int, p *int64) any {
	if p == nil {
		return nil
	}
	return b.int(c, *p)
}

// millis is t in Unix milliseconds as an int64, or NULL (nil) for the zero
// time.
func (b *connLogBoxes) millis(c int, t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return b.int(c, t.UnixMilli())
}

// connLogVersion is the first SQLite schema version whose conn_log has
// every column of connLogColumns (10 added upstream).
const connLogVersion = 10

// connLogSlice is the most entries one statement of AppendConnLogs
// writes on a store that slices the log (core.logSliced): logpace.Slice,
// about 10 µs of SQLite's work.
const connLogSlice = logpace.Slice

// connLogPrunes is the most entries one statement of PruneConnLogs
// deletes on a store that slices the log: about as long as 16 inserts,
// longer than an insert's slice, but a prune comes once per Retention
// entries.
const connLogPrunes = 64

type logWriterKey struct{}

// forLogWriter marks ctx as the LogWriter's, with the pacer of its slices:
// AppendConnLogs and PruneConnLogs pause between their slices
// (pauseSlices), and SQLite commits their transactions without a sync
// (SQLite.inTx).
func forLogWriter(ctx context.Context, pace *logpace.Pacer) context.Context {
	return context.WithValue(ctx, logWriterKey{}, pace)
}

// isLogWriter reports whether ctx is the LogWriter's (forLogWriter).
func isLogWriter(ctx context.Context) bool { return ctx.Value(logWriterKey{}) != nil }

// pauseSlices pauses between two slices of the LogWriter's writes to a
// store that slices the log (see logpace).
func (s *core) pauseSlices(ctx context.Context) {
	if pace, _ := ctx.Value(logWriterKey{}).(*logpace.Pacer); s.logSliced && pace != nil {
		pace.Pause()
	}
}

// connLogInserts are the INSERT statements of the connection log: the
// one at index k writes 1<<k entries. A batch is written as a sum of
// them, the biggest first (100 entries: 64 + 32 + 4; on a store that
// slices the log, 50×2, with the LogWriter's pauses between, so that
// no connection's events wait behind more than one), so that a store
// runs a handful of fixed statements, which it keeps prepared
// (writeTx.execKept), whatever the batch sizes: parsing a statement of
// hundreds of parameters for each batch cost a fifth of its write. 64
// entries of 15 parameters stay below either database's limit.
var connLogInserts = func() []string {
	row := "(?" + strings.Repeat(", ?", len(connLogColumns)-1) + ")"
	head := `INSERT INTO conn_log (` + strings.Join(connLogColumns, ", ") + `) VALUES ` + row
	out := make([]string, 7)
	for k := range out {
		out[k] = head + strings.Repeat(", "+row, 1<<k-1)
	}
	return out
}()

// AppendConnLogs stores a batch of entries in one transaction, with
// connLogInserts, tagged with the store's node name; see Store.
func (s *core) AppendConnLogs(ctx context.Context, entries []ConnLog) error {
	if len(entries) == 0 {
		return nil
	}
	if err := checkConnLogs(entries); err != nil {
		return err
	}
	err := s.be.inTx(ctx, false, func(tx writeTx) error {
		args := make([]any, 0, min(len(entries), 1<<(len(connLogInserts)-1))*len(connLogColumns))
		boxes := newConnLogBoxes(s.node)
		biggest := len(connLogInserts) - 1
		if s.logSliced {
			biggest = bits.Len(connLogSlice) - 1
		}
		for rest := entries; len(rest) > 0; {
			if len(rest) < len(entries) {
				s.pauseSlices(ctx)
			}
			k := min(bits.Len(uint(len(rest)))-1, biggest)
			args = args[:0]
			for _, e := range rest[:1<<k] {
				args = boxes.appendRow(args, e)
			}
			if _, err := tx.execKept(ctx, connLogInserts[k], args...); err != nil {
				return fmt.Errorf("inserting: %w", err)
			}
			rest = rest[1<<k:]
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: appending conn log: %w", err)
	}
	return nil
}

// ConnLogs returns entries newest first, as selected by q.
func (s *core) ConnLogs(ctx context.Context, q ConnLogQuery) ([]ConnLog, error) {
	if q.StreamID < 0 {
		return nil, fmt.Errorf("storage: reading conn log: stream_id %d: must be >= 0: %w", q.StreamID, ErrInvalid)
	}
	if q.Action != "" && q.Action != ActionAllowed && q.Action != ActionBlocked {
		return nil, fmt.Errorf("storage: reading conn log: action %q: must be \"\", %q or %q: %w",
			q.Action, ActionAllowed, ActionBlocked, ErrInvalid)
	}
	limit, where, args := pageQuery(q.Limit, DefaultConnLogLimit, MaxConnLogExportLimit, q.StreamID, q.Before)
	if q.Action != "" {
		where = append(where, "action = ?")
		args = append(args, q.Action)
	}
	if q.Node != "" {
		where = append(where, "node = ?")
		args = append(args, q.Node)
	}
	if q.Source.IsValid() {
		where = append(where, "aegis_in_net(source_ip, ?)")
		args = append(args, q.Source.Masked().String())
	}
	if q.Reason != "" {
		where = append(where, "disconnect_reason = ?")
		args = append(args, q.Reason)
	}
	if !q.Since.IsZero() {
		where = append(where, "ended_at >= ?")
		args = append(args, q.Since.UnixMilli())
	}
	if !q.Until.IsZero() {
		where = append(where, "ended_at < ?")
		args = append(args, q.Until.UnixMilli())
	}
	query := `SELECT id, node, stream_id, source_ip, source_port, bytes_sent, bytes_received,
		duration_ms, action, disconnect_reason, started_at, ended_at,
		protocol, datagrams_sent, datagrams_received, upstream FROM conn_log`
	if len(where) > 0 {
		query += " WHERE " + strings.Join(where, " AND ")
	}
	query += " ORDER BY id DESC LIMIT ?"
	args = append(args, limit)

	var out []ConnLog
	err := s.reads.queryEach(ctx, query, args, func(r rowScanner) error {
		var (
			e              ConnLog
			port           sql.NullInt64
			started, ended sql.NullInt64
		)
		if err := r.Scan(&e.ID, &e.Node, &e.StreamID, &e.SourceIP, &port, &e.BytesSent, &e.BytesReceived,
			&e.DurationMS, &e.Action, &e.DisconnectReason, &started, &ended,
			&e.Protocol, &e.DatagramsSent, &e.DatagramsReceived, &e.Upstream); err != nil {
			return err
		}
		e.SourcePort = int(port.Int64)
		e.StartedAt = jsontime.Of(fromMillis(started))
		e.EndedAt = jsontime.Of(fromMillis(ended))
		out = append(out, e)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("storage: reading conn log: %w", err)
	}
	return out, nil
}

// PruneConnLogs keeps the newest keep entries of one stream; see Store.
// It finds the newest entry beyond the ones to keep, then deletes it and
// every older one (both walk the (stream_id, id) index) in one
// transaction: on a store that slices the log, in statements of
// connLogPrunes entries (connLogPrune, kept prepared) with the LogWriter's
// pauses between, since one statement deleting thousands of entries would
// hold the LogWriter's goroutine, and every connection waiting for the
// scheduler behind it, for milliseconds. One transaction, not one per
// slice, writes each page of the table and its index once, not once per
// slice: a prune cost the steady log (BenchmarkConnLogSteady) a fifth of
// its CPU more in transactions of connLogPrunes entries. An error deletes
// nothing, and leaves the entries to the next prune.
func (s *core) PruneConnLogs(ctx context.Context, streamID int64, keep int) (int64, error) {
	if keep < 0 {
		return 0, fmt.Errorf("storage: pruning conn log of stream %d: keep %d: must be >= 0: %w", streamID, keep, ErrInvalid)
	}
	var last int64
	found := false
	err := s.reads.queryEach(ctx, `SELECT id FROM conn_log WHERE stream_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?`,
		[]any{streamID, keep}, func(r rowScanner) error {
			found = true
			return r.Scan(&last)
		})
	if err != nil || !found {
		if err != nil {
			err = fmt.Errorf("storage: pruning conn log of stream %d: finding the entries to delete: %w", streamID, err)
		}
		return 0, err
	}
	var n int64
	err = s.be.inTx(ctx, false, func(tx writeTx) error {
		if !s.logSliced {
			var err error
			n, err = tx.exec(ctx, `DELETE FROM conn_log WHERE stream_id = ? AND id <= ?`, streamID, last)
			return err
		}
		for {
			deleted, err := tx.execKept(ctx, connLogPrune, streamID, last, connLogPrunes)
			if n += deleted; err != nil || deleted < connLogPrunes {
				return err
			}
			s.pauseSlices(ctx)
		}
	})
	if err != nil {
		return 0, fmt.Errorf("storage: pruning conn log of stream %d: deleting: %w", streamID, err)
	}
	return n, nil
}

// connLogPrune deletes the oldest entries of a stream up to an id, at
// most a given number, for PruneConnLogs on a store that slices the log.
const connLogPrune = `DELETE FROM conn_log WHERE id IN (
	SELECT id FROM conn_log WHERE stream_id = ? AND id <= ? ORDER BY id LIMIT ?)`
