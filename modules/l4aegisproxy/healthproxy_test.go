package l4aegisproxy_test

import (
	"bufio"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	proxyproto "github.com/pires/go-proxyproto"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// startChecks provisions a handler that health-checks upstream every 20ms
// and sends PROXY headers of version ver, sharing the state of stream id.
func startChecks(t *testing.T, id int64, upstream string, ver int) *streamstate.State {
	t.Helper()
	h := &l4aegisproxy.Handler{Upstream: upstream, StreamID: id, ProxyProtocol: ver,
		DialTimeout: caddy.Duration(time.Second), HealthCheckInterval: caddy.Duration(20 * time.Millisecond)}
	if err := h.Provision(newCtx(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = h.Cleanup() })
	return streamstate.Lookup(id)
}

func waitHealth(t *testing.T, st *streamstate.State, healthy bool) {
	t.Helper()
	testenv.Eventually(t, fmt.Sprintf("healthy = %v", healthy), func() bool {
		h := st.Health()
		return h != nil && h.Healthy == healthy
	})
}

// TestHealthCheckSendsProxyHeader: on a stream that sends PROXY headers, a
// health check's connection carries one too, with the LOCAL command (v2)
// or UNKNOWN (v1), as HAProxy's check-send-proxy does, so that a PROXY
// reader sees no broken connection per check. A down upstream is still
// reported down.
func TestHealthCheckSendsProxyHeader(t *testing.T) {
	for _, ver := range []int{1, 2} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			var mu sync.Mutex
			var headers []*proxyproto.Header
			var errs []error
			up := newUpstream(t, "127.0.0.1:0", func(c net.Conn) {
				defer c.Close()
				_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
				hdr, err := proxyproto.Read(bufio.NewReader(c))
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					errs = append(errs, err)
					return
				}
				headers = append(headers, hdr)
			})
			st := startChecks(t, int64(9230+ver), up.Addr, ver)
			testenv.Eventually(t, "5 health checks", func() bool {
				mu.Lock()
				defer mu.Unlock()
				return len(headers)+len(errs) >= 5
			})
			mu.Lock()
			for _, err := range errs {
				t.Errorf("a health check's connection: %v", err)
			}
			for _, h := range headers {
				if int(h.Version) != ver || h.Command != proxyproto.LOCAL || h.TransportProtocol != proxyproto.UNSPEC {
					t.Errorf("header %+v, want version %d, LOCAL, UNSPEC", h, ver)
				}
			}
			mu.Unlock()
			waitHealth(t, st, true)
			up.Close(time.Second)
			waitHealth(t, st, false)
		})
	}
}

// TestHealthCheckNginxProxyProtocol runs the checks against nginx with
// `listen … proxy_protocol`: its error log gets no "broken header" line,
// which a bare TCP check causes on each check.
func TestHealthCheckNginxProxyProtocol(t *testing.T) {
	for _, ver := range []int{1, 2} {
		t.Run(fmt.Sprintf("v%d", ver), func(t *testing.T) {
			port := testenv.FreePort(t)
			ngx := testenv.Nginx(t, fmt.Sprintf(`    server {
        listen 127.0.0.1:%d proxy_protocol;
        return "ok\n";
    }`, port))
			addr := fmt.Sprintf("127.0.0.1:%d", port)
			testenv.Eventually(t, "nginx listening", func() bool {
				c, err := net.Dial("tcp", addr)
				if err == nil {
					_, _ = c.Write([]byte("PROXY UNKNOWN\r\n"))
					c.Close()
				}
				return err == nil
			})
			connected := func() int { return strings.Count(ngx.Log(), " connected to ") }
			before := connected()
			st := startChecks(t, int64(9240+ver), addr, ver)
			testenv.Eventually(t, "5 health checks at nginx", func() bool { return connected() >= before+5 })
			waitHealth(t, st, true)
			time.Sleep(50 * time.Millisecond) // nginx reads the last header
			if log := ngx.Log(); strings.Contains(log, "broken header") {
				t.Errorf("nginx's error log:\n%s", log)
			}
			ngx.Stop()
			waitHealth(t, st, false)
		})
	}
}
