package admin_test

import (
	"encoding/csv"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"
)

// dialFrom connects to 127.0.0.1:port from the loopback address src.
func dialFrom(t *testing.T, src string, port int) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestConnectionLogFiltersAndCSV filters a stream's stored log by source
// address and network, reason and time, and downloads what a filter
// selects as CSV; bad filters are refused naming the parameter.
func TestConnectionLogFiltersAndCSV(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"whitelist_cidrs": []string{"127.0.0.1/32", "127.0.0.2/32"}})))
	start := time.Now().UTC()
	for _, src := range []string{"127.0.0.1", "127.0.0.1", "127.0.0.2"} {
		c := dialFrom(t, src, port)
		roundTrip(t, c, "hi")
		c.Close()
	}
	// Refusals are logged once per source for a while: two sources.
	for _, src := range []string{"127.0.0.3", "127.0.0.4"} {
		c := dialFrom(t, src, port)
		expectClosed(t, c, 5*time.Second)
		c.Close()
	}
	eventually(t, "5 stored entries", func() bool { return len(inst.connLog(sid, "").Entries) == 5 })
	end := time.Now().UTC().Add(time.Second)
	all := inst.connLog(sid, "").Entries
	blockedReason := ""
	for _, e := range all {
		if e.Action == "blocked" {
			blockedReason = e.DisconnectReason
		}
	}
	if blockedReason == "" {
		t.Fatalf("no blocked entry with a reason: %+v", all)
	}
	count := func(q string) int { return len(inst.connLog(sid, "?"+q).Entries) }
	ts := func(t time.Time) string { return url.QueryEscape(t.Format(time.RFC3339Nano)) }
	for _, tc := range []struct {
		query string
		want  int
	}{
		{"source=127.0.0.1", 2},
		{"source=127.0.0.2", 1},
		{"source=127.0.0.0/29", 5},
		{"source=127.0.0.2/31", 2},
		{"source=10.0.0.0/8", 0},
		{"source=::1", 0},
		// The log keeps IPv4 sources as IPv4: an IPv4-mapped address or
		// network means the same IPv4 ones.
		{"source=::ffff:127.0.0.1", 2},
		{"source=" + url.QueryEscape("::ffff:127.0.0.0/125"), 5},
		{"source=" + url.QueryEscape("::ffff:127.0.0.2/128"), 1},
		{"source=" + url.QueryEscape("::/0"), 0},
		{"source=" + url.QueryEscape("0.0.0.0/0"), 5},
		{"reason=" + blockedReason, 2},
		{"reason=" + blockedReason + "&source=127.0.0.1", 0},
		{"since=" + ts(start.Add(-time.Second)), 5},
		{"since=" + ts(end), 0},
		{"until=" + ts(start.Add(-time.Second)), 0},
		{"since=" + ts(start.Add(-time.Second)) + "&until=" + ts(end), 5},
		{"action=allowed&source=127.0.0.0/24", 3},
		{"source=127.0.0.0/24&limit=2", 2},
	} {
		if got := count(tc.query); got != tc.want {
			t.Errorf("%s: %d entries, want %d", tc.query, got, tc.want)
		}
	}
	// Paging keeps the filter: 2 + 1 of source 127.0.0.0/31.
	if got, pages := inst.pageAll(sid, "source=127.0.0.0/31&limit=1"); len(got) != 2 || pages != 2 {
		t.Errorf("paging a filter: %d entries in %d pages", len(got), pages)
	}

	// CSV: the filtered entries, newest first, a header of the JSON names.
	r := inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections?format=csv&action=allowed&limit=100000", sid), nil).want(t, http.StatusOK)
	if ct := r.header.Get("Content-Type"); !strings.HasPrefix(ct, "text/csv") {
		t.Errorf("Content-Type %q", ct)
	}
	if cd := r.header.Get("Content-Disposition"); cd != fmt.Sprintf(`attachment; filename="stream-%d-log.csv"`, sid) {
		t.Errorf("Content-Disposition %q", cd)
	}
	rows, err := csv.NewReader(strings.NewReader(string(r.body))).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 4 {
		t.Fatalf("%d CSV rows, want a header and 3:\n%s", len(rows), r.body)
	}
	for _, col := range []string{"id", "stream_id", "source_ip", "bytes_sent", "bytes_received", "action", "disconnect_reason", "started_at", "ended_at", "upstream"} {
		if !slices.Contains(rows[0], col) {
			t.Errorf("CSV header %v lacks %s", rows[0], col)
		}
	}
	col := func(name string) int { return slices.Index(rows[0], name) }
	var csvIDs []int64
	for _, row := range rows[1:] {
		var n int64
		fmt.Sscan(row[col("id")], &n)
		csvIDs = append(csvIDs, n)
		if row[col("action")] != "allowed" || row[col("bytes_sent")] != "2" || row[col("source_ip")] > "127.0.0.2" {
			t.Errorf("CSV row %v", row)
		}
	}
	if want := ids(inst.connLog(sid, "?action=allowed").Entries); !slices.Equal(csvIDs, want) {
		t.Errorf("CSV ids %v, want %v", csvIDs, want)
	}

	// Validation: 400s naming the parameter.
	for _, tc := range []struct{ query, field, says string }{
		{"source=127.0.0.300", "source", "IP address"},
		{"source=10.0.0.0/33", "source", "CIDR"},
		{"source=fe80::1%25eth0", "source", "IP address"},
		{"reason=Not%20a%20reason", "reason", "disconnect_reason"},
		{"since=today", "since", "RFC 3339"},
		{"until=2026-13-01T00:00:00Z", "until", "RFC 3339"},
		{"since=2026-12-06T15:00:00Z&until=2026-12-06T14:00:00Z", "until", "after since"},
		{"limit=1001", "limit", "1 to 1000"},
		{"limit=100001&format=csv", "limit", "1 to 100000"},
		{"format=xml", "format", "json (the default) or csv"},
		{"sort=id", "sort", "source"},
	} {
		e := inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections?%s", sid, tc.query), nil).apiErr(t, http.StatusBadRequest)
		if e.Field != tc.field || !strings.Contains(e.Error, tc.says) {
			t.Errorf("%s: field %q, %q; want %q saying %q", tc.query, e.Field, e.Error, tc.field, tc.says)
		}
	}
}

// TestConnectionLogCSVNoFormulas downloads the log of a node whose name a
// spreadsheet would run as a formula: the CSV cell starts with ' so that
// it is text, and the JSON keeps the name as it is.
func TestConnectionLogCSVNoFormulas(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	app := streamsApp()
	app["node_name"] = "=HYPERLINK(\"http://x\")"
	inst := startCaddy(t, app, nil)
	sid := id(inst.create(stream(0, port, up.Port, nil)))
	c := dial(t, port)
	roundTrip(t, c, "hi")
	c.Close()
	eventually(t, "a stored entry", func() bool { return len(inst.connLog(sid, "").Entries) == 1 })
	if raw := string(inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections", sid), nil).body); !strings.Contains(raw, `"node":"=HYPERLINK(\"http://x\")"`) {
		t.Fatalf("the JSON's node: %s", raw)
	}
	r := inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections?format=csv", sid), nil).want(t, http.StatusOK)
	rows, err := csv.NewReader(strings.NewReader(string(r.body))).ReadAll()
	if err != nil || len(rows) != 2 {
		t.Fatalf("CSV %q: %v", r.body, err)
	}
	if node := rows[1][slices.Index(rows[0], "node")]; node != `'=HYPERLINK("http://x")` {
		t.Fatalf("the CSV's node cell %q, want it to start with '", node)
	}
}
