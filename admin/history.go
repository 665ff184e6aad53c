package admin

import (
	"encoding/csv"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// adminEndpointActor is the audit trail's actor of a change without an
// authenticated user (the admin endpoint, or streams_admin without
// authentication).
const adminEndpointActor = "admin endpoint"

// actor is who asks for r's change: the user a Caddy authentication
// handler in front of streams_admin (basic_auth) set as the
// http.auth.user.id placeholder, else adminEndpointActor.
func actor(r *http.Request) string {
	if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		if user, _ := repl.GetString("http.auth.user.id"); user != "" {
			return user
		}
	}
	return adminEndpointActor
}

// historyWindow is the default of history's since: the last hour.
const historyWindow = time.Hour

func (a *api) history(w http.ResponseWriter, r *http.Request, p params) error {
	since, step, err := parseHistoryQuery(r.URL.Query(), time.Now())
	if err != nil {
		return err
	}
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	h, err := app.History(r.Context(), p.id, since, step)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, h)
	return nil
}

// parseHistoryQuery reads history's parameters: since (RFC 3339, default
// an hour before now) and step (seconds, one of streams.HistorySteps,
// default 10).
func parseHistoryQuery(q url.Values, now time.Time) (time.Time, int, error) {
	since, step := now.Add(-historyWindow), streams.HistorySteps[0]
	steps := make([]string, len(streams.HistorySteps))
	for i, s := range streams.HistorySteps {
		steps[i] = strconv.Itoa(s)
	}
	err := eachParam(q, func(name, v string) error {
		switch name {
		case "since":
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return fieldError(name, v, fmt.Sprintf("since %q: must be an RFC 3339 time, e.g. 2026-12-06T15:00:00Z (default: an hour ago; samples go back 24 hours)", v))
			}
			since = t
		case "step":
			n, err := strconv.Atoi(v)
			if err != nil || !allDigits(v) || !slices.Contains(streams.HistorySteps, n) {
				return fieldError(name, v, fmt.Sprintf("step %q: must be one of %s (seconds; default 10)", v, strings.Join(steps, ", ")))
			}
			step = n
		default:
			return fieldError(name, v, fmt.Sprintf("unknown query parameter %q; the parameters are: since, step", name))
		}
		return nil
	})
	return since, step, err
}

// auditPage is one page of the audit trail.
type auditPage struct {
	// Entries are newest first.
	Entries []storage.AuditEntry `json:"entries"`
	// NextBefore is the before parameter of the next (older) page, or
	// null when this page is the last.
	NextBefore *int64 `json:"next_before"`
}

func (a *api) audit(w http.ResponseWriter, r *http.Request, _ params) error {
	q, err := parseAuditQuery(r.URL.Query())
	if err != nil {
		return err
	}
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	entries, err := app.AuditLog(r.Context(), q)
	if err != nil {
		return err
	}
	page := auditPage{Entries: entries}
	page.NextBefore, err = nextBefore(entries, q.Limit, func(e storage.AuditEntry) int64 { return e.ID },
		func(before int64) (bool, error) {
			next := q
			next.Limit, next.Before = 1, before
			more, err := app.AuditLog(r.Context(), next)
			return len(more) > 0, err
		})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, page)
	return nil
}

// parseAuditQuery reads the audit trail's parameters: limit (1 to
// MaxAuditLimit, default DefaultAuditLimit), before (an entry id) and
// stream_id.
func parseAuditQuery(q url.Values) (storage.AuditQuery, error) {
	out := storage.AuditQuery{Limit: storage.DefaultAuditLimit}
	err := eachParam(q, func(name, v string) error {
		switch name {
		case "limit":
			n, err := strconv.Atoi(v)
			if err != nil || !allDigits(v) || n < 1 || n > storage.MaxAuditLimit {
				return fieldError(name, v, fmt.Sprintf("limit %q: must be an integer from 1 to %d (default %d)",
					v, storage.MaxAuditLimit, storage.DefaultAuditLimit))
			}
			out.Limit = n
		case "before":
			id, err := parseBefore(name, v)
			if err != nil {
				return err
			}
			out.Before = id
		case "stream_id":
			id, ok := parseID(v)
			if !ok {
				return fieldError(name, v, fmt.Sprintf("stream_id %q: must be a positive integer, a stream's id", v))
			}
			out.StreamID = id
		default:
			return fieldError(name, v, fmt.Sprintf("unknown query parameter %q; the parameters are: before, limit, stream_id", name))
		}
		return nil
	})
	return out, err
}

// connLogCSVColumns are the CSV download's columns: the JSON names of
// storage.ConnLog's fields.
var connLogCSVColumns = []string{"id", "node", "stream_id", "source_ip", "source_port", "upstream", "protocol",
	"action", "disconnect_reason", "bytes_sent", "bytes_received", "datagrams_sent", "datagrams_received",
	"duration_ms", "started_at", "ended_at"}

// writeConnLogCSV writes entries as a CSV file to download.
func writeConnLogCSV(w http.ResponseWriter, id int64, entries []storage.ConnLog) {
	h := w.Header()
	h.Set("Content-Type", "text/csv; charset=utf-8")
	h.Set("Content-Disposition", fmt.Sprintf(`attachment; filename="stream-%d-log.csv"`, id))
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	cw := csv.NewWriter(w)
	_ = cw.Write(connLogCSVColumns)
	num := func(n int64) string { return strconv.FormatInt(n, 10) }
	opt := func(n *int64) string {
		if n == nil {
			return ""
		}
		return num(*n)
	}
	tm := func(t jsontime.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.UTC().Format(jsontime.Layout)
	}
	for _, e := range entries {
		port := ""
		if e.SourcePort != 0 {
			port = strconv.Itoa(e.SourcePort)
		}
		_ = cw.Write([]string{num(e.ID), csvText(e.Node), num(e.StreamID), csvText(e.SourceIP), port, csvText(e.Upstream), e.Protocol,
			e.Action, csvText(e.DisconnectReason), num(e.BytesSent), num(e.BytesReceived), opt(e.DatagramsSent), opt(e.DatagramsReceived),
			num(e.DurationMS), tm(e.StartedAt), tm(e.EndedAt)})
	}
	cw.Flush()
}

// csvText is a text cell a spreadsheet shows as text: one that starts
// with = + - @, a tab or a carriage return (which it would run as a
// formula) gets a ' in front.
func csvText(v string) string {
	if v != "" && strings.ContainsRune("=+-@\t\r", rune(v[0])) {
		return "'" + v
	}
	return v
}
