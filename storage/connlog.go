package storage

import (
	"cmp"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// validConnLog checks what the connection log requires of an entry.
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

// connLogPagesVersion is the first SQLite schema version that stores the
// connection log in pages (conn_log_pages, conn_log_ids).
const connLogPagesVersion = 13

// connLogPrunePages is the most pages one statement of PruneConnLogs
// deletes on a store that slices the log.
const connLogPrunePages = 8

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

// The fixed statements of the connection log, which each store keeps
// prepared (writeTx.execKept, writeTx.queryRowKept).
const (
	connLogTakeIDs = `UPDATE conn_log_ids SET next = next + ? RETURNING next`
	// connLogLock takes the lock of conn_log_ids, as connLogTakeIDs does,
	// before a transaction that deletes pages (a prune, a stream's
	// removal) touches them. On PostgreSQL two of those on one stream
	// otherwise lock its pages in different orders and one fails with a
	// deadlock; SQLite has one writer at a time.
	connLogLock   = `UPDATE conn_log_ids SET next = next`
	connLogInsert = `INSERT INTO conn_log_pages (stream_id, last_id, first_id, n, node, entries) VALUES (?, ?, ?, ?, ?, ?)`
	connLogDelete = `DELETE FROM conn_log_pages WHERE stream_id = ? AND last_id BETWEEN ? AND ? RETURNING n`
	// connLogCut changes a page only if it still holds the entries it
	// was cut from (n), as read in the same transaction.
	connLogCut = `UPDATE conn_log_pages SET first_id = ?, n = ?, entries = ? WHERE stream_id = ? AND last_id = ? AND n = ?`
)

// connLogKept are the statements a SQLite store prepares for execKept and
// queryRowKept.
var connLogKept = []string{connLogTakeIDs, connLogInsert, connLogCut, connLogLock}

// AppendConnLogs stores a batch of entries in one transaction, tagged
// with the store's node name; see Store. It takes the batch's IDs at
// once (conn_log_ids), in the batch's order, and writes each stream's
// entries in pages of up to connLogPage (with the LogWriter's pauses
// between pages and between a full page's encoding and its INSERT, on a
// store that slices the log). The pages of one stream never overlap;
// those of several streams of one batch may.
func (s *core) AppendConnLogs(ctx context.Context, entries []ConnLog) error {
	if len(entries) == 0 {
		return nil
	}
	if err := checkConnLogs(entries); err != nil {
		return err
	}
	order := make([]int32, len(entries))
	for i := range order {
		order[i] = int32(i)
	}
	slices.SortStableFunc(order, func(a, b int32) int { return cmp.Compare(entries[a].StreamID, entries[b].StreamID) })
	err := s.be.inTx(ctx, false, func(tx writeTx) error {
		var next int64
		if err := tx.queryRowKept(ctx, connLogTakeIDs, len(entries)).Scan(&next); err != nil {
			return fmt.Errorf("taking IDs: %w", err)
		}
		base := next - int64(len(entries)) // the ID of entries[0]
		page := make([]byte, 0, 256*min(len(entries), connLogPage))
		for start := 0; start < len(order); {
			if start > 0 {
				s.pauseSlices(ctx)
			}
			stream := entries[order[start]].StreamID
			page = append(page[:0], '[')
			end := start
			for ; end < len(order) && end-start < connLogPage && entries[order[end]].StreamID == stream; end++ {
				if end > start {
					page = append(page, ',')
				}
				page = appendPageEntry(page, base+int64(order[end]), entries[order[end]])
			}
			page = append(page, ']')
			if end-start > connLogPage/2 {
				s.pauseSlices(ctx) // a full page is two slices: its encoding, its INSERT
			}
			first, last := base+int64(order[start]), base+int64(order[end-1])
			if _, err := tx.execKept(ctx, connLogInsert, stream, last, first, end-start, s.node, string(page)); err != nil {
				return fmt.Errorf("inserting: %w", err)
			}
			start = end
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: appending conn log: %w", err)
	}
	return nil
}

// connLogChunk is how many pages one query of ConnLogs reads.
const connLogChunk = 32

// errEnoughPages stops the reading of pages once ConnLogs has its entries.
var errEnoughPages = errors.New("enough pages")

// ConnLogs returns entries newest first, as selected by q. It reads the
// pages that may hold them, newest first (by their last ID), and decodes
// and filters their entries until no page left can hold one of the
// newest Limit: the pages of several streams of one batch may overlap,
// so an entry is sure to be among those only once every page left ends
// below it.
func (s *core) ConnLogs(ctx context.Context, q ConnLogQuery) ([]ConnLog, error) {
	if q.StreamID < 0 {
		return nil, fmt.Errorf("storage: reading conn log: stream_id %d: must be >= 0: %w", q.StreamID, ErrInvalid)
	}
	if q.Action != "" && q.Action != ActionAllowed && q.Action != ActionBlocked {
		return nil, fmt.Errorf("storage: reading conn log: action %q: must be \"\", %q or %q: %w",
			q.Action, ActionAllowed, ActionBlocked, ErrInvalid)
	}
	limit, where, args := pageQuery(q.Limit, DefaultConnLogLimit, MaxConnLogExportLimit, q.StreamID, 0)
	if q.Before > 0 {
		where = append(where, "first_id < ?")
		args = append(args, q.Before)
	}
	if q.Node != "" {
		where = append(where, "node = ?")
		args = append(args, q.Node)
	}
	// The pages are read in chunks of connLogChunk, newest first: a query
	// for all of them would have PostgreSQL send every page of the table
	// even when the first few hold the answer (pgx reads a result to its
	// end when it is closed early).
	where = append(where, "last_id < ?")
	query := `SELECT stream_id, node, last_id, entries FROM conn_log_pages WHERE ` + strings.Join(where, " AND ") +
		fmt.Sprintf(" ORDER BY last_id DESC LIMIT %d", connLogChunk)
	args = append(args, int64(math.MaxInt64))
	cursor := &args[len(args)-1] // the lowest last_id read so far

	var (
		out    []ConnLog
		lowest int64 = math.MaxInt64 // the lowest ID in out
		buf    []pageEntry
		pages  int // read by the current chunk's query
	)
	page := func(r rowScanner) error {
		var (
			stream, last int64
			node, text   string
		)
		if err := r.Scan(&stream, &node, &last, &text); err != nil {
			return err
		}
		pages++
		*cursor = last
		if above := len(out); above >= limit {
			if lowest <= last { // pages overlap: count those above this one's
				above = 0
				for i := range out {
					if out[i].ID > last {
						above++
					}
				}
			}
			if above >= limit {
				return errEnoughPages
			}
		}
		var err error
		if buf, err = decodePage(text, buf); err != nil {
			return fmt.Errorf("stream %d, page of entry %d: %w", stream, last, err)
		}
		for i := len(buf) - 1; i >= 0; i-- {
			if pe := &buf[i]; q.matches(pe) {
				out = append(out, pe.connLog(stream, node))
				lowest = min(lowest, pe.ID)
			}
		}
		return nil
	}
	for {
		pages = 0
		err := s.reads.queryEach(ctx, query, args, page)
		if err != nil && !errors.Is(err, errEnoughPages) {
			return nil, fmt.Errorf("storage: reading conn log: %w", err)
		}
		if err != nil || pages < connLogChunk {
			break
		}
	}
	slices.SortFunc(out, func(a, b ConnLog) int { return cmp.Compare(b.ID, a.ID) })
	return out[:min(len(out), limit)], nil
}

// PruneConnLogs keeps the newest keep entries of one stream; see Store.
// It reads the stream's pages, newest first, and in one transaction
// deletes those past the newest keep entries and cuts the oldest entries
// off the page that holds the last one to keep. On a store that slices
// the log it deletes connLogPrunePages pages per statement, with the
// LogWriter's pauses between. An error deletes nothing, and leaves the
// entries to the next prune.
//
// The page list is read before the transaction, and another writer may
// change those pages meanwhile: another node pruning the same shared
// stream, or the stream's removal. So the transaction reads the page to
// cut again and cuts it only as it finds it (a page gone or already cut
// short enough is left alone), and counts the entries of the pages it
// deletes as they are deleted, not as they were listed.
func (s *core) PruneConnLogs(ctx context.Context, streamID int64, keep int) (int64, error) {
	if keep < 0 {
		return 0, fmt.Errorf("storage: pruning conn log of stream %d: keep %d: must be >= 0: %w", streamID, keep, ErrInvalid)
	}
	type page struct{ last, n int64 }
	var (
		pages []page
		kept  int64 // entries in the pages before pages[cut]
		cut   = -1  // the newest page with entries past keep
	)
	err := s.reads.queryEach(ctx, `SELECT last_id, n FROM conn_log_pages WHERE stream_id = ? ORDER BY last_id DESC`,
		[]any{streamID}, func(r rowScanner) error {
			var p page
			if err := r.Scan(&p.last, &p.n); err != nil {
				return err
			}
			if cut < 0 && kept+p.n > int64(keep) {
				cut = len(pages)
			}
			if cut < 0 {
				kept += p.n
			}
			pages = append(pages, p)
			return nil
		})
	if err != nil || cut < 0 {
		if err != nil {
			err = fmt.Errorf("storage: pruning conn log of stream %d: finding the entries to delete: %w", streamID, err)
		}
		return 0, err
	}
	var deleted int64
	err = s.be.inTx(ctx, false, func(tx writeTx) error {
		deleted = 0
		if _, err := tx.execKept(ctx, connLogLock); err != nil {
			return err
		}
		old := pages[cut:]
		if left := int64(keep) - kept; left > 0 {
			cut, err := cutConnLogPage(ctx, tx, streamID, old[0].last, left)
			if err != nil {
				return err
			}
			deleted += cut
			old = old[1:]
		}
		step := len(old)
		if s.logSliced {
			step = connLogPrunePages
		}
		for len(old) > 0 {
			n := min(step, len(old))
			err := tx.queryEach(ctx, connLogDelete, []any{streamID, old[n-1].last, old[0].last}, func(r rowScanner) error {
				var entries int64
				err := r.Scan(&entries)
				deleted += entries
				return err
			})
			if err != nil {
				return err
			}
			if old = old[n:]; len(old) > 0 {
				s.pauseSlices(ctx)
			}
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("storage: pruning conn log of stream %d: deleting: %w", streamID, err)
	}
	return deleted, nil
}

// cutConnLogPage cuts the oldest entries off one page of a stream, in
// tx, so that it keeps its newest left, and returns how many it cut. It
// reads the page in tx: a page that another writer deleted, or cut to
// left entries or fewer, since the caller listed it is left as it is
// (0 cut), and so is one changed between that read and the UPDATE
// (connLogCut checks n).
func cutConnLogPage(ctx context.Context, tx writeTx, streamID, last, left int64) (int64, error) {
	var (
		n    int64
		text string
	)
	err := tx.queryRow(ctx, `SELECT n, entries FROM conn_log_pages WHERE stream_id = ? AND last_id = ?`,
		streamID, last).Scan(&n, &text)
	if errors.Is(err, sql.ErrNoRows) || err == nil && n <= left {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	rest, first, err := cutPage(text, int(n-left))
	if err != nil {
		return 0, fmt.Errorf("page of entry %d: %w", last, err)
	}
	changed, err := tx.execKept(ctx, connLogCut, first, left, rest, streamID, last, n)
	if err != nil || changed == 0 {
		return 0, err
	}
	return n - left, nil
}
