package storage

import (
	"database/sql"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
)

// The connection log is stored in pages: a row of conn_log_pages holds up
// to connLogPage entries of one stream and one node, oldest first, as a
// JSON array of arrays (entries, see pageEntry), with the IDs of its
// first and last entry and their number. One row per entry cost SQLite
// about 6.6 µs of the proxy's CPU per entry (its VM runs each column, the
// table's and the index's B-trees take each row); pages cost about 1.1 µs
// per entry, prune and commit included (BenchmarkConnLogSteady without
// pauses), and a DNS-shaped stream writes thousands of entries a second.
// The entries stay readable with SQL (json_each, json_extract), and the
// filters of ConnLogQuery run in Go over the decoded pages (matches).

// connLogPage is the most entries one page holds. Per entry, a page of
// 8 cost SQLite about 0.8 µs, of 64 about 0.46 µs, of 128 0.39 µs (one
// CPU, no pauses, the steady 500-entry batches of
// BenchmarkConnLogSteady). On a store that slices the log
// (core.logSliced) a full page is two of AppendConnLogs' slices: its
// encoding, then its INSERT, each about 15 µs, as long as one INSERT of
// 2 rows was when the log had a row per entry.
const connLogPage = 64

// pageEntry is an entry as a page stores it: a JSON array of
// pageColumns, in that order (conn_log's old columns), NULL for a value
// left out (no port, no time, no datagram counts).
type pageEntry struct {
	ID                int64
	SourceIP          string
	SourcePort        int
	BytesSent         int64
	BytesReceived     int64
	DurationMS        int64
	Action            string
	DisconnectReason  string
	StartedAt         *int64 // Unix milliseconds
	EndedAt           *int64
	Protocol          string
	DatagramsSent     *int64
	DatagramsReceived *int64
	Upstream          string
}

// pageColumns name the values of a page's entry, in order.
var pageColumns = [...]string{"id", "source_ip", "source_port", "bytes_sent", "bytes_received", "duration_ms",
	"action", "disconnect_reason", "started_at", "ended_at", "protocol", "datagrams_sent", "datagrams_received", "upstream"}

// appendPageEntry appends e, with the ID id, as a page's JSON array.
func appendPageEntry(b []byte, id int64, e ConnLog) []byte {
	proto := e.Protocol
	if proto == "" {
		proto = ConnTCP
	}
	b = strconv.AppendInt(append(b, '['), id, 10)
	b = appendJSONString(append(b, ','), e.SourceIP)
	b = appendNullInt(append(b, ','), int64(e.SourcePort), e.SourcePort != 0)
	b = strconv.AppendInt(append(b, ','), e.BytesSent, 10)
	b = strconv.AppendInt(append(b, ','), e.BytesReceived, 10)
	b = strconv.AppendInt(append(b, ','), e.DurationMS, 10)
	b = appendJSONString(append(b, ','), e.Action)
	b = appendJSONString(append(b, ','), e.DisconnectReason)
	b = appendNullInt(append(b, ','), e.StartedAt.UnixMilli(), !e.StartedAt.IsZero())
	b = appendNullInt(append(b, ','), e.EndedAt.UnixMilli(), !e.EndedAt.IsZero())
	b = appendJSONString(append(b, ','), proto)
	b = appendNullInt(append(b, ','), ptrValue(e.DatagramsSent), e.DatagramsSent != nil)
	b = appendNullInt(append(b, ','), ptrValue(e.DatagramsReceived), e.DatagramsReceived != nil)
	b = appendJSONString(append(b, ','), e.Upstream)
	return append(b, ']')
}

// appendNullInt appends v, or null when it is not valid.
func appendNullInt(b []byte, v int64, valid bool) []byte {
	if !valid {
		return append(b, "null"...)
	}
	return strconv.AppendInt(b, v, 10)
}

func ptrValue(p *int64) int64 {
	if p == nil {
		return 0
	}
	return *p
}

// appendJSONString appends s as a JSON string. Bytes that are not UTF-8
// become U+FFFD, as encoding/json makes them.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			b = append(b, s[start:i]...)
			switch c {
			case '"', '\\':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i++
			start = i
			continue
		}
		i += size
	}
	return append(append(b, s[start:]...), '"')
}

// decodePage decodes a page's entries (oldest first) into buf[:0]: the
// JSON appendPageEntry writes, and that of the migrations (SQLite's
// json_array, PostgreSQL's json_build_array, with their whitespace). It
// takes what encoding/json would take into a []pageEntry of arrays, and
// gives the same entries (TestDecodePageAsJSON, FuzzConnLogPage), about
// ten times as fast: a filter that selects few entries decodes every
// page of a stream.
func decodePage(text string, buf []pageEntry) ([]pageEntry, error) {
	d := pageDecoder{s: text}
	buf, err := d.page(buf[:0])
	if err != nil {
		return buf[:0], fmt.Errorf("decoding a page of the connection log: %w", err)
	}
	return buf, nil
}

// page decodes the whole text into buf.
func (d *pageDecoder) page(buf []pageEntry) ([]pageEntry, error) {
	if !d.next('[') {
		return buf, d.fail("[")
	}
	if !d.next(']') {
		for {
			buf = append(buf, pageEntry{})
			if err := d.entry(&buf[len(buf)-1]); err != nil {
				return buf, fmt.Errorf("entry %d: %w", len(buf)-1, err)
			}
			if d.next(',') {
				continue
			}
			if d.next(']') {
				break
			}
			return buf, d.fail(", or ]")
		}
	}
	if d.space(); d.i != len(d.s) {
		return buf, d.fail("the end")
	}
	return buf, nil
}

// pageDecoder reads a page's JSON text.
type pageDecoder struct {
	s string
	i int
}

func (d *pageDecoder) fail(want string) error {
	if d.i >= len(d.s) {
		return fmt.Errorf("the text ends where %s should be", want)
	}
	return fmt.Errorf("%q at byte %d, want %s", d.s[d.i], d.i, want)
}

// space skips JSON whitespace.
func (d *pageDecoder) space() {
	for d.i < len(d.s) && (d.s[d.i] == ' ' || d.s[d.i] == '\t' || d.s[d.i] == '\n' || d.s[d.i] == '\r') {
		d.i++
	}
}

// next skips whitespace and then c, if c is next.
func (d *pageDecoder) next(c byte) bool {
	if d.space(); d.i < len(d.s) && d.s[d.i] == c {
		d.i++
		return true
	}
	return false
}

// null skips whitespace and then null, if it is next.
func (d *pageDecoder) null() bool {
	if d.space(); strings.HasPrefix(d.s[d.i:], "null") {
		d.i += 4
		return true
	}
	return false
}

// entry decodes one entry's array into pe, a zero pageEntry.
func (d *pageDecoder) entry(pe *pageEntry) error {
	if !d.next('[') {
		return d.fail("[")
	}
	for k, name := range pageColumns {
		if k > 0 && !d.next(',') {
			return d.fail(", and " + name)
		}
		var err error
		switch k {
		case 0:
			pe.ID, err = d.int()
		case 1:
			pe.SourceIP, err = d.str()
		case 2:
			var port int64
			port, err = d.int()
			pe.SourcePort = int(port)
			if err == nil && int64(pe.SourcePort) != port {
				err = fmt.Errorf("%d does not fit an int", port)
			}
		case 3:
			pe.BytesSent, err = d.int()
		case 4:
			pe.BytesReceived, err = d.int()
		case 5:
			pe.DurationMS, err = d.int()
		case 6:
			pe.Action, err = d.str()
		case 7:
			pe.DisconnectReason, err = d.str()
		case 8:
			pe.StartedAt, err = d.nullInt()
		case 9:
			pe.EndedAt, err = d.nullInt()
		case 10:
			pe.Protocol, err = d.str()
		case 11:
			pe.DatagramsSent, err = d.nullInt()
		case 12:
			pe.DatagramsReceived, err = d.nullInt()
		case 13:
			pe.Upstream, err = d.str()
		}
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
	}
	if !d.next(']') {
		return d.fail("]")
	}
	return nil
}

// int decodes an integer; null is 0.
func (d *pageDecoder) int() (int64, error) {
	if d.null() {
		return 0, nil
	}
	start := d.i
	if d.i < len(d.s) && d.s[d.i] == '-' {
		d.i++
	}
	digits := d.i
	for d.i < len(d.s) && d.s[d.i] >= '0' && d.s[d.i] <= '9' {
		d.i++
	}
	switch {
	case d.i == digits:
		return 0, d.fail("a number")
	case d.s[digits] == '0' && d.i > digits+1:
		return 0, fmt.Errorf("%q: a number does not start with 0", d.s[start:d.i])
	case d.i < len(d.s) && (d.s[d.i] == '.' || d.s[d.i] == 'e' || d.s[d.i] == 'E'):
		return 0, fmt.Errorf("at byte %d: not an integer", start)
	}
	return strconv.ParseInt(d.s[start:d.i], 10, 64)
}

// nullInt decodes an integer, or null as nil.
func (d *pageDecoder) nullInt() (*int64, error) {
	if d.null() {
		return nil, nil
	}
	v, err := d.int()
	if err != nil {
		return nil, err
	}
	return &v, nil
}

// str decodes a string; null is "". A string with an escape, or that is
// not UTF-8, is left to encoding/json.
func (d *pageDecoder) str() (string, error) {
	if d.null() {
		return "", nil
	}
	if d.i >= len(d.s) || d.s[d.i] != '"' {
		return "", d.fail("a string")
	}
	start := d.i
	escaped, high := false, false
	for d.i++; d.i < len(d.s); d.i++ {
		switch c := d.s[d.i]; {
		case c == '"':
			d.i++
			if text := d.s[start+1 : d.i-1]; !escaped && (!high || utf8.ValidString(text)) {
				return text, nil
			}
			var out string
			err := json.Unmarshal([]byte(d.s[start:d.i]), &out)
			return out, err
		case c == '\\':
			escaped = true
			d.i++ // the escaped byte: not the end
		case c < 0x20:
			return "", fmt.Errorf("at byte %d: a control character in a string", d.i)
		case c >= utf8.RuneSelf:
			high = true
		}
	}
	return "", d.fail(`the string's closing "`)
}

// connLog is pe as the API returns it, of the page's stream and node.
func (pe *pageEntry) connLog(streamID int64, node string) ConnLog {
	return ConnLog{ID: pe.ID, Node: node, StreamID: streamID, Upstream: pe.Upstream,
		SourceIP: pe.SourceIP, SourcePort: pe.SourcePort, BytesSent: pe.BytesSent, BytesReceived: pe.BytesReceived,
		DurationMS: pe.DurationMS, Action: pe.Action, DisconnectReason: pe.DisconnectReason,
		StartedAt: jsontime.Of(fromMillisPtr(pe.StartedAt)), EndedAt: jsontime.Of(fromMillisPtr(pe.EndedAt)),
		Protocol: pe.Protocol, DatagramsSent: pe.DatagramsSent, DatagramsReceived: pe.DatagramsReceived}
}

// fromMillisPtr is fromMillis of a value a page may leave out.
func fromMillisPtr(v *int64) time.Time {
	return fromMillis(sql.NullInt64{Int64: ptrValue(v), Valid: v != nil})
}

// matches reports whether pe is selected by q's filters of an entry
// (Before, Action, Source, Reason, Since, Until; the stream and the node
// are the page's, which the query selects).
func (q *ConnLogQuery) matches(pe *pageEntry) bool {
	switch {
	case q.Before > 0 && pe.ID >= q.Before,
		q.Action != "" && pe.Action != q.Action,
		q.Reason != "" && pe.DisconnectReason != q.Reason,
		q.Source.IsValid() && !inNetwork(pe.SourceIP, q.Source),
		!q.Since.IsZero() && (pe.EndedAt == nil || *pe.EndedAt < q.Since.UnixMilli()),
		!q.Until.IsZero() && (pe.EndedAt == nil || *pe.EndedAt >= q.Until.UnixMilli()):
		return false
	}
	return true
}

// inNetwork reports whether the address ip is in the network pfx; a text
// that is not an address is in none. An address's zone is left out, and
// an IPv4-mapped address is in its IPv4 networks too.
func inNetwork(ip string, pfx netip.Prefix) bool {
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return false
	}
	addr = addr.WithZone("")
	return pfx.Contains(addr) || pfx.Contains(addr.Unmap())
}

// cutPage returns a page's entries without its oldest drop ones, and the
// ID of the oldest one left.
func cutPage(text string, drop int) (string, int64, error) {
	es, err := decodePage(text, nil)
	if err != nil {
		return "", 0, err
	}
	if drop <= 0 || drop >= len(es) {
		return "", 0, fmt.Errorf("cutting %d of a page's %d entries: must leave some", drop, len(es))
	}
	out := make([]byte, 0, len(text))
	out = append(out, '[')
	for i := range es[drop:] {
		if i > 0 {
			out = append(out, ',')
		}
		pe := &es[drop+i]
		out = appendPageEntry(out, pe.ID, pe.connLog(0, ""))
	}
	return string(append(out, ']')), es[drop].ID, nil
}
