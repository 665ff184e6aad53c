package storage

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
	"time"
)

// HistoryRetention is how long the stream_history table keeps a sample.
const HistoryRetention = 24 * time.Hour

// HistorySample is one 10 s sample of a stream on a node, as the
// stream_history table of the PostgreSQL store keeps it: the rates over
// the 10 s that end at Time, and the state at Time.
type HistorySample struct {
	StreamID int64
	Time     time.Time
	// BytesSent (client → upstream), BytesReceived, Connections (new ones),
	// Blocked and DialFailures are per second.
	BytesSent, BytesReceived, Connections, Blocked, DialFailures float64
	Active                                                       int64
	// Healthy is nil for a stream without health checks.
	Healthy *bool
}

// NodeHistory is one node's samples of a stream, oldest first.
type NodeHistory struct {
	Node    string
	Samples []HistorySample
}

// historyRowsPerInsert bounds one INSERT's rows (10 parameters each).
const historyRowsPerInsert = 1000

// AppendHistory stores samples of this node's streams in one
// transaction (a sample already stored is kept), and deletes every
// node's samples older than HistoryRetention.
func (p *Postgres) AppendHistory(ctx context.Context, samples []HistorySample) error {
	err := p.be.inTx(ctx, false, func(tx writeTx) error {
		const row = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
		for rest := samples; len(rest) > 0; {
			n := min(len(rest), historyRowsPerInsert)
			args := make([]any, 0, n*10)
			for _, s := range rest[:n] {
				var healthy sql.NullBool
				if s.Healthy != nil {
					healthy = sql.NullBool{Bool: *s.Healthy, Valid: true}
				}
				args = append(args, p.node, s.StreamID, s.Time.UnixMilli(), s.BytesSent, s.BytesReceived,
					s.Connections, s.Active, s.Blocked, s.DialFailures, healthy)
			}
			query := `INSERT INTO stream_history (node, stream_id, t, bytes_sent, bytes_received,
				connections, active, blocked, dial_failures, healthy) VALUES ` + row + strings.Repeat(", "+row, n-1) +
				` ON CONFLICT DO NOTHING`
			if _, err := tx.exec(ctx, query, args...); err != nil {
				return fmt.Errorf("inserting: %w", err)
			}
			rest = rest[n:]
		}
		if _, err := tx.exec(ctx, `DELETE FROM stream_history WHERE t < ?`,
			p.now().Add(-HistoryRetention).UnixMilli()); err != nil {
			return fmt.Errorf("pruning: %w", err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: appending stream history: %w", err)
	}
	return nil
}

// History returns each node's samples of stream streamID after since,
// nodes by name, samples oldest first.
func (p *Postgres) History(ctx context.Context, streamID int64, since time.Time) ([]NodeHistory, error) {
	var out []NodeHistory
	err := p.reads.queryEach(ctx, `SELECT node, t, bytes_sent, bytes_received, connections, active,
		blocked, dial_failures, healthy FROM stream_history WHERE stream_id = ? AND t > ? ORDER BY node, t`,
		[]any{streamID, since.UnixMilli()}, func(r rowScanner) error {
			var (
				node    string
				t       int64
				s       HistorySample
				healthy sql.NullBool
			)
			if err := r.Scan(&node, &t, &s.BytesSent, &s.BytesReceived, &s.Connections, &s.Active,
				&s.Blocked, &s.DialFailures, &healthy); err != nil {
				return err
			}
			s.StreamID = streamID
			s.Time = time.UnixMilli(t).UTC()
			if healthy.Valid {
				h := healthy.Bool
				s.Healthy = &h
			}
			if len(out) == 0 || out[len(out)-1].Node != node {
				out = append(out, NodeHistory{Node: node})
			}
			out[len(out)-1].Samples = append(out[len(out)-1].Samples, s)
			return nil
		})
	if err != nil {
		return nil, fmt.Errorf("storage: reading stream history: %w", err)
	}
	return out, nil
}
