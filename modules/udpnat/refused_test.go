package udpnat

import (
	"net"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// One datagram to an upstream port that nothing listens on: the ICMP
// port unreachable must end the NAT entry without a second datagram.
func TestFirstRefusalEndsEntry(t *testing.T) {
	up, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	dead := up.LocalAddr().String()
	up.Close()
	tr := startRelay(t, Config{Upstream: dead, Policy: limits(t, streamstate.Limits{IdleTimeout: time.Minute})})
	c := tr.client(t)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	seen := false
	for time.Now().Before(deadline) {
		n := tr.r.Entries()
		if n == 1 {
			seen = true
		}
		if (seen || tr.state.Total.Load() > 0) && n == 0 {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("entry still open 3s after its upstream refused: entries %d, active %d, seen %v", tr.r.Entries(), tr.state.Active.Load(), seen)
}
