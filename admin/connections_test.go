package admin_test

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// logEntry is a connection-log entry as the API returns it.
type logEntry struct {
	ID               int64  `json:"id"`
	StreamID         int64  `json:"stream_id"`
	SourceIP         string `json:"source_ip"`
	BytesSent        int64  `json:"bytes_sent"`
	BytesReceived    int64  `json:"bytes_received"`
	Action           string `json:"action"`
	DisconnectReason string `json:"disconnect_reason"`
	Upstream         string `json:"upstream"`
}

type logPage struct {
	Entries    []logEntry `json:"entries"`
	NextBefore *int64     `json:"next_before"`
}

func (inst *instance) connLog(sid int64, query string) logPage {
	inst.t.Helper()
	var p logPage
	inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections%s", sid, query), nil).want(inst.t, 200).decode(inst.t, &p)
	if p.Entries == nil {
		inst.t.Fatalf("connections%s: entries is not an array", query)
	}
	return p
}

// pageAll follows next_before from the first page of query and returns
// every entry and the page count.
func (inst *instance) pageAll(sid int64, query string) ([]logEntry, int) {
	inst.t.Helper()
	var all []logEntry
	pages := 0
	q := query
	for {
		p := inst.connLog(sid, "?"+q)
		pages++
		all = append(all, p.Entries...)
		if p.NextBefore == nil {
			return all, pages
		}
		if len(p.Entries) == 0 || *p.NextBefore != p.Entries[len(p.Entries)-1].ID {
			inst.t.Fatalf("next_before %d is not the last entry of its page %v", *p.NextBefore, p.Entries)
		}
		if pages > 100 {
			inst.t.Fatal("paging does not end")
		}
		v, err := url.ParseQuery(query)
		if err != nil {
			inst.t.Fatal(err)
		}
		v.Set("before", fmt.Sprint(*p.NextBefore))
		q = v.Encode()
	}
}

func ids(entries []logEntry) []int64 {
	out := make([]int64, len(entries))
	for i, e := range entries {
		out[i] = e.ID
	}
	return out
}

// TestConnectionLogPaging pages through a stream's connection log, newest
// first, with and without an action filter.
func TestConnectionLogPaging(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, nil)))
	const allowed, blocked = 30, 4
	for i := range allowed {
		c := dial(t, port)
		roundTrip(t, c, fmt.Sprintf("m%02d", i))
		c.Close()
	}
	eventually(t, "30 allowed entries in the log", func() bool {
		return len(inst.connLog(sid, "?limit=1000").Entries) == allowed
	})
	// Blocked attempts are logged once per source per minute: four sources,
	// the first of them refused twice.
	inst.call("PUT", fmt.Sprintf("/api/v1/streams/%d", sid), stream(0, port, up.Port, obj{"blacklist_cidrs": []string{"127.0.0.2/31", "127.0.0.4/31"}})).want(t, 200)
	for i := range blocked + 1 {
		src := fmt.Sprintf("127.0.0.%d", 2+max(i-1, 0))
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			t.Fatal(err)
		}
		expectClosed(t, c, 5*time.Second)
		c.Close()
	}
	eventually(t, "every entry in the log", func() bool {
		return len(inst.connLog(sid, "?limit=1000").Entries) == allowed+blocked
	})

	whole := inst.connLog(sid, "?limit=1000")
	if whole.NextBefore != nil {
		t.Fatalf("one page with everything has next_before %d", *whole.NextBefore)
	}
	all := ids(whole.Entries)
	if !slices.IsSortedFunc(all, func(a, b int64) int { return int(b - a) }) || len(slices.Compact(slices.Clone(all))) != len(all) {
		t.Fatalf("ids are not newest first and distinct: %v", all)
	}
	for i, e := range whole.Entries {
		wantAction := "allowed"
		if i < blocked {
			wantAction = "blocked" // the newest
		}
		wantSource := "127.0.0.1"
		if i < blocked {
			wantSource = fmt.Sprintf("127.0.0.%d", 2+blocked-1-i)
		}
		if e.Action != wantAction || e.StreamID != sid || e.SourceIP != wantSource {
			t.Fatalf("entry %d: %+v, want action %s from %s", i, e, wantAction, wantSource)
		}
		if wantAction == "allowed" && (e.BytesSent != 3 || e.BytesReceived != 3 || e.DisconnectReason != "client_close") {
			t.Fatalf("allowed entry %d: %+v", i, e)
		}
		if wantAction == "blocked" && e.DisconnectReason != "acl_denied" {
			t.Fatalf("blocked entry %d: %+v", i, e)
		}
	}
	if def := inst.connLog(sid, ""); len(def.Entries) != allowed+blocked || def.NextBefore != nil {
		t.Fatalf("default page: %d entries, next_before %v", len(def.Entries), def.NextBefore)
	}

	for _, tc := range []struct {
		query string
		want  []int64
		pages int
	}{
		{"limit=7", all, 5},
		{"limit=17", all, 2}, // the last page is full and still the last
		{"limit=1", all, allowed + blocked},
		{"limit=3&action=blocked", all[:blocked], 2},
		{"limit=8&action=allowed", all[blocked:], 4},
		{"limit=5&before=" + fmt.Sprint(all[10]), all[11:], 5},
	} {
		got, pages := inst.pageAll(sid, tc.query)
		if !slices.Equal(ids(got), tc.want) || pages != tc.pages {
			t.Errorf("paging %s: %d pages of %v, want %d pages of %v", tc.query, pages, ids(got), tc.pages, tc.want)
		}
	}

	for _, q := range []struct{ query, field string }{
		{"limit=0", "limit"}, {"limit=1001", "limit"}, {"limit=x", "limit"}, {"limit=-1", "limit"},
		{"before=0", "before"}, {"before=x", "before"}, {"action=dropped", "action"},
		{"sort=asc", "sort"}, {"limit=1&limit=2", "limit"},
	} {
		e := inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections?%s", sid, q.query), nil).apiErr(t, http.StatusBadRequest)
		if e.Field != q.field {
			t.Errorf("?%s: field %q, want %q", q.query, e.Field, q.field)
		}
	}
	inst.call("GET", "/api/v1/streams/999/connections", nil).apiErr(t, http.StatusNotFound)
}

// activeConn is an open connection as the API lists it.
type activeConn struct {
	ID                uint64 `json:"id"`
	Protocol          string `json:"protocol"`
	Source            string `json:"source"`
	SourceIP          string `json:"source_ip"`
	BytesSent         uint64 `json:"bytes_sent"`
	BytesReceived     uint64 `json:"bytes_received"`
	DatagramsSent     uint64 `json:"datagrams_sent"`
	DatagramsReceived uint64 `json:"datagrams_received"`
}

func (inst *instance) active(sid int64) []activeConn {
	inst.t.Helper()
	var l []activeConn
	inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/active", sid), nil).want(inst.t, 200).decode(inst.t, &l)
	if l == nil {
		inst.t.Fatal("active: not an array")
	}
	return l
}

// TestActiveConnections lists a stream's open TCP connection and a UDP NAT
// entry and closes each.
func TestActiveConnections(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	udpUp := udpEchoServer(t)
	tp, upPort := freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	tcpID := id(inst.create(stream(0, tp, up.Port, nil)))
	udpID := id(inst.create(stream(0, upPort, udpUp, obj{"protocol": "udp", "idle_timeout_seconds": 60})))

	if l := inst.active(tcpID); len(l) != 0 {
		t.Fatalf("active before any connection: %+v", l)
	}
	c := dial(t, tp)
	roundTrip(t, c, "hello")
	var conn activeConn
	eventually(t, "the open connection with its bytes", func() bool {
		l := inst.active(tcpID)
		if len(l) != 1 {
			return false
		}
		conn = l[0]
		return conn.BytesSent == 5 && conn.BytesReceived == 5
	})
	if conn.Protocol != "tcp" || conn.Source != c.LocalAddr().String() || conn.SourceIP != "127.0.0.1" || conn.ID == 0 {
		t.Fatalf("active connection: %+v (client %s)", conn, c.LocalAddr())
	}

	u := udpDial(t, upPort)
	if got := udpRoundTrip(t, u, "ping", 5*time.Second); got != "ping" {
		t.Fatalf("udp: %q", got)
	}
	var ul []activeConn
	eventually(t, "the UDP entry with its datagram counted", func() bool {
		ul = inst.active(udpID)
		// The reply is counted just after it is sent.
		return len(ul) == 1 && ul[0].DatagramsSent == 1 && ul[0].DatagramsReceived == 1
	})
	if ul[0].Protocol != "udp" || ul[0].Source != u.LocalAddr().String() || ul[0].BytesSent != 4 || ul[0].BytesReceived != 4 {
		t.Fatalf("active UDP entries: %+v (client %s)", ul, u.LocalAddr())
	}

	// Close the TCP connection: 204, the client sees it end, the log
	// says admin_closed; a second close is 404.
	path := fmt.Sprintf("/api/v1/streams/%d/active/%d", tcpID, conn.ID)
	inst.call("DELETE", path, nil).want(t, http.StatusNoContent)
	expectClosed(t, c, 5*time.Second)
	inst.call("DELETE", path, nil).apiErr(t, http.StatusNotFound)
	eventually(t, "an admin_closed entry", func() bool {
		return slices.ContainsFunc(inst.connLog(tcpID, "").Entries, func(e logEntry) bool { return e.DisconnectReason == "admin_closed" })
	})
	inst.waitLogLine(tcpID, "admin_closed")
	eventually(t, "no active TCP connection", func() bool { return len(inst.active(tcpID)) == 0 })
	// The stream goes on.
	if got := roundTrip(t, dial(t, tp), "next"); got != "next" {
		t.Fatalf("a new connection: %q", got)
	}

	// Close the UDP entry.
	upath := fmt.Sprintf("/api/v1/streams/%d/active/%d", udpID, ul[0].ID)
	inst.call("DELETE", upath, nil).want(t, http.StatusNoContent)
	eventually(t, "no UDP entry", func() bool { return len(inst.active(udpID)) == 0 })
	inst.call("DELETE", upath, nil).apiErr(t, http.StatusNotFound)
	inst.waitLogLine(udpID, "admin_closed")

	inst.call("DELETE", fmt.Sprintf("/api/v1/streams/%d/active/%d", tcpID, 1<<40), nil).apiErr(t, http.StatusNotFound)
	inst.call("GET", "/api/v1/streams/999/active", nil).apiErr(t, http.StatusNotFound)
}

// TestConnectionLogProtocolAndDatagrams sends datagrams through a real UDP
// stream whose upstream answers each one twice, and a connection through a
// TCP stream: the stored entries, as the API returns them, say their
// protocol, and the UDP entries carry the exact datagram counts each way
// (a refused UDP client's: none relayed); the TCP entry has no such keys.
func TestConnectionLogProtocolAndDatagrams(t *testing.T) {
	checkNoLeaks(t)
	tcpUp := newServer(t, echo)
	twice := loopback.ServeUDP(t, "127.0.0.1:0", func(pc *net.UDPConn, p []byte, from netip.AddrPort) {
		_, _ = pc.WriteToUDPAddrPort(p, from)
		_, _ = pc.WriteToUDPAddrPort(p, from)
	})
	pTCP, pUDP, pDenied := freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	tcpID := id(inst.create(stream(0, pTCP, tcpUp.Port, nil)))
	udpID := id(inst.create(stream(0, pUDP, twice.Port, obj{"protocol": "udp", "idle_timeout_seconds": 1})))
	deniedID := id(inst.create(stream(0, pDenied, twice.Port, obj{"protocol": "udp", "whitelist_cidrs": []string{"192.0.2.0/24"}})))

	c := dial(t, pTCP)
	if got := roundTrip(t, c, "tcp"); got != "tcp" {
		t.Fatalf("through the TCP stream: %q", got)
	}
	c.Close()
	const sent = 3
	u := udpDial(t, pUDP)
	for i := range sent {
		msg := fmt.Sprint("datagram ", i)
		if got := udpRoundTrip(t, u, msg, 5*time.Second); got != msg {
			t.Fatalf("first reply: %q, want %q", got, msg)
		}
		if got := testenv.UDPRead(t, u, 5*time.Second); got != msg {
			t.Fatalf("second reply: %q, want %q", got, msg)
		}
	}
	if got := udpRoundTrip(t, udpDial(t, pDenied), "denied", 100*time.Millisecond); got != "" {
		t.Fatalf("a refused client got a reply: %q", got)
	}

	// entry waits for the one stored entry of stream sid and returns it
	// with its keys as the API sent them.
	entry := func(sid int64) obj {
		t.Helper()
		var e obj
		eventually(t, fmt.Sprintf("the stored entry of stream %d", sid), func() bool {
			entries, _ := inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections", sid), nil).want(t, http.StatusOK).obj(t)["entries"].([]any)
			if len(entries) == 0 {
				return false
			}
			if len(entries) > 1 {
				t.Fatalf("stream %d has %d entries: %v", sid, len(entries), entries)
			}
			e = entries[0].(obj)
			return true
		})
		return e
	}
	for _, tc := range []struct {
		sid  int64
		want obj // these keys with these values
		none []string
	}{
		{sid: tcpID, want: obj{"protocol": "tcp", "action": "allowed", "bytes_sent": 3, "bytes_received": 3},
			none: []string{"datagrams_sent", "datagrams_received"}},
		{sid: udpID, want: obj{"protocol": "udp", "action": "allowed", "disconnect_reason": "idle_timeout",
			"datagrams_sent": sent, "datagrams_received": 2 * sent, "bytes_sent": sent * 10, "bytes_received": 2 * sent * 10}},
		{sid: deniedID, want: obj{"protocol": "udp", "action": "blocked", "disconnect_reason": "acl_denied",
			"datagrams_sent": 0, "datagrams_received": 0}},
	} {
		e := entry(tc.sid)
		for k, v := range tc.want {
			if got, ok := e[k]; !ok || norm(got) != norm(v) {
				t.Errorf("stream %d: entry's %s = %v, want %v; entry %s", tc.sid, k, got, v, norm(e))
			}
		}
		for _, k := range tc.none {
			if _, ok := e[k]; ok {
				t.Errorf("stream %d: entry has %s: %s", tc.sid, k, norm(e))
			}
		}
	}
}
