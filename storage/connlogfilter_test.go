package storage

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
)

func TestConnLogFilters(t *testing.T) { eachBackend(t, testConnLogFilters) }

// testConnLogFilters selects entries by source network, reason and end
// time, in SQL, alone and together.
func testConnLogFilters(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	base := time.Date(2026, 12, 6, 15, 0, 0, 0, time.UTC)
	sources := []string{"10.0.0.1", "10.0.1.2", "192.168.1.1", "2001:db8::1", "2001:db8:1::1", "not-an-ip"}
	reasons := []string{"client_closed", "idle_timeout"}
	var batch []ConnLog
	for i := range 24 {
		end := base.Add(time.Duration(i) * time.Minute)
		batch = append(batch, ConnLog{StreamID: 1, Action: ActionAllowed, BytesSent: int64(i),
			SourceIP: sources[i%len(sources)], DisconnectReason: reasons[i%len(reasons)],
			StartedAt: jsontime.Of(end.Add(-time.Second)), EndedAt: jsontime.Of(end)})
	}
	batch = append(batch, ConnLog{StreamID: 2, Action: ActionAllowed, BytesSent: 99, SourceIP: "10.0.0.1",
		DisconnectReason: "client_closed", EndedAt: jsontime.Of(base)})
	if err := s.AppendConnLogs(ctx, batch); err != nil {
		t.Fatal(err)
	}
	// want lists the indexes (BytesSent) of stream 1 that match, newest first.
	want := func(match func(i int) bool) []int64 {
		out := []int64{}
		for i := 23; i >= 0; i-- {
			if match(i) {
				out = append(out, int64(i))
			}
		}
		return out
	}
	src := func(i int) string { return sources[i%len(sources)] }
	for _, tc := range []struct {
		name string
		q    ConnLogQuery
		want []int64
	}{
		{"one address", ConnLogQuery{Source: netip.MustParsePrefix("10.0.0.1/32")}, want(func(i int) bool { return src(i) == "10.0.0.1" })},
		{"IPv4 network", ConnLogQuery{Source: netip.MustParsePrefix("10.0.0.0/16")}, want(func(i int) bool { return src(i) == "10.0.0.1" || src(i) == "10.0.1.2" })},
		{"IPv6 network", ConnLogQuery{Source: netip.MustParsePrefix("2001:db8::/48")}, want(func(i int) bool { return src(i) == "2001:db8::1" })},
		{"everything IPv4", ConnLogQuery{Source: netip.MustParsePrefix("0.0.0.0/0")}, want(func(i int) bool { return i%len(sources) < 3 })},
		{"reason", ConnLogQuery{Reason: "idle_timeout"}, want(func(i int) bool { return i%2 == 1 })},
		{"since", ConnLogQuery{Since: base.Add(20 * time.Minute)}, want(func(i int) bool { return i >= 20 })},
		{"until", ConnLogQuery{Until: base.Add(2 * time.Minute)}, want(func(i int) bool { return i < 2 })},
		{"all together", ConnLogQuery{Source: netip.MustParsePrefix("10.0.0.0/8"), Reason: "client_closed",
			Since: base.Add(5 * time.Minute), Until: base.Add(19 * time.Minute)},
			want(func(i int) bool { return i%len(sources) < 2 && i%2 == 0 && i >= 5 && i < 19 })},
	} {
		tc.q.StreamID = 1
		got, err := s.ConnLogs(ctx, tc.q)
		if err != nil {
			t.Errorf("%s: %v", tc.name, err)
			continue
		}
		sent := []int64{}
		for _, e := range got {
			sent = append(sent, e.BytesSent)
		}
		if !slices.Equal(sent, tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, sent, tc.want)
		}
	}
	// More than a page, for the CSV download.
	var many []ConnLog
	for i := range 1500 {
		many = append(many, ConnLog{StreamID: 3, Action: ActionBlocked, SourceIP: fmt.Sprintf("10.9.%d.%d", i/256, i%256)})
	}
	if err := s.AppendConnLogs(ctx, many); err != nil {
		t.Fatal(err)
	}
	got, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 3, Limit: MaxConnLogExportLimit, Source: netip.MustParsePrefix("10.9.0.0/21")})
	if err != nil || len(got) != 1500 {
		t.Fatalf("export: %d entries, %v", len(got), err)
	}
}

// TestInNetwork: the log's source filter takes an IPv4-mapped address as
// its IPv4 one, /0 holds its family, a zone is left out, and a text that
// is not an address is in no network.
func TestInNetwork(t *testing.T) {
	for _, tc := range []struct {
		ip, net string
		want    bool
	}{
		{"10.0.0.1", "10.0.0.0/8", true},
		{"10.0.0.1", "10.0.0.1/32", true},
		{"11.0.0.1", "10.0.0.0/8", false},
		{"::ffff:10.0.0.1", "10.0.0.0/8", true},
		{"::ffff:10.0.0.1", "::ffff:10.0.0.0/104", true},
		{"10.0.0.1", "0.0.0.0/0", true},
		{"2001:db8::1", "0.0.0.0/0", false},
		{"2001:db8::1", "::/0", true},
		{"10.0.0.1", "::/0", false},
		{"fe80::1%eth0", "fe80::/10", true},
		{"not-an-ip", "0.0.0.0/0", false},
		{"", "::/0", false},
	} {
		if got := inNetwork(tc.ip, netip.MustParsePrefix(tc.net)); got != tc.want {
			t.Errorf("inNetwork(%q, %q) = %v, want %v", tc.ip, tc.net, got, tc.want)
		}
	}
}
