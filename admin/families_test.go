package admin_test

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// needIPv6 skips the test when ::1 cannot be bound.
func needIPv6(t *testing.T) {
	t.Helper()
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("IPv6 loopback unavailable: %v", err)
	}
	ln.Close()
}

// answers reports whether a TCP echo and a UDP echo through host:port both
// answer, and fails the test if one does and the other does not.
func answers(t *testing.T, host string, port int) bool {
	t.Helper()
	tcp := false
	c, err := net.DialTimeout("tcp", net.JoinHostPort(host, fmt.Sprint(port)), 2*time.Second)
	switch {
	case err == nil:
		got, rerr := tryRoundTrip(c, "ping")
		c.Close()
		tcp = rerr == nil && got == "ping"
	case !errors.Is(err, syscall.ECONNREFUSED):
		t.Fatalf("dial %s:%d: %v", host, port, err)
	}
	u := testenv.DialUDP(t, "", host, port)
	udp := udpRoundTrip(t, u, "ping", 700*time.Millisecond) == "ping"
	if tcp != udp {
		t.Fatalf("%s:%d: TCP answers %v, UDP answers %v", host, port, tcp, udp)
	}
	return tcp
}

// TestListenFamilies: 0.0.0.0 is every IPv4 address and nothing else (the
// kernel's default dual-stack "::" socket would answer ::1 too), "::" is
// both families, and validation agrees with the kernel: 0.0.0.0:P and
// [::1]:P coexist, 0.0.0.0:P and [::]:P clash, through validate-port and
// through creates.
func TestListenFamilies(t *testing.T) {
	needIPv6(t)
	checkNoLeaks(t)
	// One upstream port with a TCP echo and a UDP echo.
	upPort := freePort(t)
	addr := fmt.Sprintf("127.0.0.1:%d", upPort)
	loopback.Serve(t, addr, echo)
	loopback.ServeUDP(t, addr, func(pc *net.UDPConn, p []byte, from netip.AddrPort) { _, _ = pc.WriteToUDPAddrPort(p, from) })
	v4, both := freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	mk := func(id int64, addr string, port int) obj {
		return stream(id, port, upPort, obj{"protocol": "tcp+udp", "listen_address": addr})
	}

	s1 := mk(1, "0.0.0.0", v4)
	inst.create(s1)
	if !answers(t, "127.0.0.1", v4) {
		t.Errorf("stream on 0.0.0.0 does not answer on 127.0.0.1")
	}
	if answers(t, "::1", v4) {
		t.Errorf("stream on 0.0.0.0 answers on ::1")
	}

	type result struct {
		Valid  bool `json:"valid"`
		Errors []struct {
			Field   string `json:"field"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	check := func(addr string) result {
		t.Helper()
		var res result
		inst.call("POST", "/api/v1/streams/validate-port", obj{"protocol": "tcp+udp", "listen_address": addr, "listen_port": v4}).want(t, http.StatusOK).decode(t, &res)
		return res
	}
	if res := check("::1"); !res.Valid {
		t.Errorf("validate-port [::1]:%d beside 0.0.0.0: %+v, want valid", v4, res)
	}
	for _, addr := range []string{"::", "127.0.0.1"} {
		if res := check(addr); res.Valid || len(res.Errors) == 0 || !strings.Contains(res.Errors[0].Message, "s-") {
			t.Errorf("validate-port [%s]:%d beside 0.0.0.0: %+v, want an error naming stream 1", addr, v4, res)
		}
	}

	// ::1 beside 0.0.0.0: created, and each answers its own family.
	s2 := mk(2, "::1", v4)
	inst.create(s2)
	if !answers(t, "::1", v4) || !answers(t, "127.0.0.1", v4) {
		t.Errorf("0.0.0.0 and ::1 on port %d do not both answer", v4)
	}
	// :: clashes with 0.0.0.0 (and ::1), and the error names stream 1.
	s3 := mk(3, "::", v4)
	e := inst.call("POST", "/api/v1/streams", s3).apiErr(t, http.StatusBadRequest)
	if !strings.Contains(fmt.Sprint(e), "stream 1") {
		t.Errorf("create [::]:%d beside 0.0.0.0: %+v, want an error naming stream 1", v4, e)
	}

	// "::" is both families.
	s4 := mk(4, "::", both)
	inst.create(s4)
	if !answers(t, "127.0.0.1", both) || !answers(t, "::1", both) {
		t.Errorf("stream on :: does not answer on both 127.0.0.1 and ::1")
	}
}
