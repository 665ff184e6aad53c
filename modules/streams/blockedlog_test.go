package streams_test

import (
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// 15,000 refused datagrams from 5,000 sources: each of the first
// MaxBlockedSources sources is logged once, the others within
// BlockedLinesPerSecond, and a "blocked connections not logged" line
// counts the rest. Before, the table of sources was cleared when full, and
// every refusal was logged (15,000 lines): a flood of forged UDP sources
// could fill a disk through the log (issue 22).
func TestBlockedLogBoundedPastSourceTable(t *testing.T) {
	checkNoLeaks(t)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, 9, map[string]any{"protocol": "udp", "blacklist_cidrs": []string{"127.0.0.0/8"}})))

	const sources, rounds = 5000, 3
	dst := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
	start := time.Now()
	for r := range rounds {
		for i := range sources {
			src := &net.UDPAddr{IP: net.IPv4(127, 1, byte(i/250), byte(i%250+1))}
			c, err := net.ListenUDP("udp4", src)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := c.WriteToUDP([]byte(fmt.Sprint(r)), dst); err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
	}
	took := time.Since(start)
	st := inst.waitStats(1, "every datagram refused", func(s spec.Status) bool { return s.BlockedConnections >= sources*rounds*9/10 })

	type line struct {
		Msg       string `json:"msg"`
		StreamID  int64  `json:"stream_id"`
		Action    string `json:"action"`
		NotLogged uint64 `json:"not_logged"`
	}
	var blocked, summaries int
	var notLogged uint64
	ok := testenv.Within(2*streamstate.BlockedSummaryEvery+5*time.Second, func() bool {
		blocked, summaries, notLogged = 0, 0, 0
		for _, l := range testenv.LogLines(t, inst.logFile, func(l line) bool { return l.StreamID == 1 }) {
			switch {
			case l.Msg == "connection" && l.Action == "blocked":
				blocked++
			case l.Msg == "blocked connections not logged":
				summaries++
				notLogged += l.NotLogged
			}
		}
		// Each round after the first repeats the remembered sources,
		// which are not logged again within the minute, by design.
		return summaries > 0 && uint64(blocked)+notLogged+(rounds-1)*streamstate.MaxBlockedSources >= st.BlockedConnections
	})
	limit := streamstate.MaxBlockedSources + streamstate.BlockedLinesPerSecond*int(took/time.Second+2)
	t.Logf("%d refusals in %s: %d logged, %d not logged in %d summary lines (limit %d lines)", st.BlockedConnections, took, blocked, notLogged, summaries, limit)
	if !ok {
		t.Errorf("no summary of the refusals not logged, or it does not count them: %d logged, %d not logged, %d blocked", blocked, notLogged, st.BlockedConnections)
	}
	if blocked < streamstate.MaxBlockedSources || blocked > limit {
		t.Errorf("%d refusals logged, want %d to %d", blocked, streamstate.MaxBlockedSources, limit)
	}
}
