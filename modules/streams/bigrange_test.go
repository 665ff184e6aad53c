package streams_test

import (
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// TestPortRangeTenThousand: the largest range binds, serves and reloads
// within seconds.
func TestPortRangeTenThousand(t *testing.T) {
	if testing.Short() {
		t.Skip("binds 10,000 ports")
	}
	checkNoLeaks(t)
	const n = spec.MaxPortRange
	first := testenv.FreeLowPortRange(t, n)
	up := newUpstream(t, echo)
	start := time.Now()
	inst := startCaddy(t, hosts(host(1, first, up.Port, map[string]any{"listen_port_end": first + n - 1, "upstream_port_fixed": true})))
	t.Logf("bound %d ports in %s", n, time.Since(start))
	for _, p := range []int{first, first + n/2, first + n - 1} {
		if got := roundTrip(t, dial(t, p), "x"); got != "x" {
			t.Fatalf("port %d: %q", p, got)
		}
	}
	// A reload binds the new sockets before the old ones close: beside
	// 10,000 open ones, 10,000 more do not fit in a limit of 20,000, and
	// the refusal says so before binding any; the old config serves on.
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	err := inst.load(hosts(host(1, first, up.Port, map[string]any{"listen_port_end": first + n - 1, "upstream_port_fixed": true, "name": "renamed"})))
	t.Logf("reload in %s (open-file limit %d): %v", time.Since(start), lim.Cur, err)
	if lim.Cur < 2*n+1000 {
		if err == nil || !strings.Contains(err.Error(), "listen_port_end") || !strings.Contains(err.Error(), "open-file limit") {
			t.Errorf("a reload over the open-file limit: %v", err)
		}
	} else if err != nil {
		t.Errorf("reload: %v", err)
	}
	if got := roundTrip(t, dial(t, first+n-1), "y"); got != "y" {
		t.Fatalf("after the reload: %q", got)
	}
}
