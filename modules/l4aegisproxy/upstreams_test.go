package l4aegisproxy_test

import (
	"fmt"
	"io"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/aegis-proxy/caddy-aegis/internal/loopback"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
)

func TestUnmarshalCaddyfileUpstreams(t *testing.T) {
	var h l4aegisproxy.Handler
	err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(`aegis_proxy {
		upstream 10.0.0.1:5432 weight 2
		upstream [::1]:5432 backup
		load_balancing first
		fail_timeout 30s
		listen_port 30000
	}`))
	if err != nil {
		t.Fatal(err)
	}
	want := []l4aegisproxy.Upstream{{Address: "10.0.0.1:5432", Weight: 2}, {Address: "[::1]:5432", Backup: true}}
	if !reflect.DeepEqual(h.Upstreams, want) || h.Upstream != "" || h.LoadBalancing != "first" || h.FailTimeout != caddy.Duration(30*time.Second) || h.ListenPort != 30000 {
		t.Fatalf("got %+v", h)
	}
	for _, tc := range []struct{ in, want string }{
		{"aegis_proxy {\n upstream\n}", "upstream (none)"},
		{"aegis_proxy {\n upstream a\n}", `upstream "a": want <host:port>`},
		{"aegis_proxy {\n upstream a:1 weight 0\n}", `weight "0"`},
		{"aegis_proxy {\n upstream a:1 weight\n}", "weight: want a number"},
		{"aegis_proxy {\n upstream a:1 backup backup\n}", `"backup" given twice`},
		{"aegis_proxy {\n upstream a:1 {\n x\n }\n}", "blocks are not supported"},
		{"aegis_proxy {\n load_balancing first\n}", "want an upstream"},
		{"aegis_proxy {\n fail_timeout soon\n upstream a:1\n}", `fail_timeout "soon"`},
		{"aegis_proxy a:1 {\n listen_port first\n}", `listen_port "first"`},
	} {
		var h l4aegisproxy.Handler
		err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: got error %v, want one naming %s", tc.in, err, tc.want)
		}
	}
	for _, bad := range []l4aegisproxy.Handler{
		{Upstreams: []l4aegisproxy.Upstream{{Address: "a"}}},
		{Upstreams: []l4aegisproxy.Upstream{{Address: "a:1", Weight: 101}}},
		{Upstreams: []l4aegisproxy.Upstream{{Address: "a:1"}}, LoadBalancing: "fastest"},
		{Upstreams: []l4aegisproxy.Upstream{{Address: "a:1"}}, FailTimeout: -1},
	} {
		h := bad
		if err := h.Provision(newCtx(t)); err == nil {
			_ = h.Cleanup()
			t.Errorf("Provision(%+v) = nil, want an error", bad)
		}
	}
}

// TestPlainLayer4Failover: in a plain layer4 chain (no stream), a dial
// that fails goes on to the next upstream, and the first method keeps to
// the first one up.
func TestPlainLayer4Failover(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	live := loopback.Serve(t, "127.0.0.1:0", func(c net.Conn) { _, _ = c.Write([]byte("L")) })
	ch := startChain(t, "127.0.0.1:0", &l4aegisguard.Handler{}, &l4aegisproxy.Handler{LoadBalancing: "first",
		Upstreams: []l4aegisproxy.Upstream{{Address: dead}, {Address: live.Addr}}})
	for i := range 3 {
		c := dial(t, ch.addr)
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		b := make([]byte, 1)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "L" {
			t.Fatalf("connection %d: %q, %v", i, b, err)
		}
		c.Close()
	}
}

// FuzzUnmarshalCaddyfile: any Caddyfile either parses into a handler whose
// upstreams have an address, or is refused with an error that says where.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	for _, s := range []string{
		"aegis_proxy a:1",
		"aegis_proxy {\n upstream a:1 weight 3 backup\n upstream [::1]:2\n load_balancing source_hash\n fail_timeout 5s\n}",
		"aegis_proxy {\n upstream a:1 weight\n}",
		"aegis_proxy a:1 {\n upstream b:2\n}",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		tokens, err := caddyfile.Tokenize([]byte(in), "Fuzzfile")
		if err != nil || len(tokens) == 0 {
			return
		}
		var h l4aegisproxy.Handler
		if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			if !strings.Contains(err.Error(), "Fuzzfile:") {
				t.Fatalf("error %q does not say where", err)
			}
			return
		}
		if h.Upstream == "" && len(h.Upstreams) == 0 {
			t.Fatal("parsed with no upstream")
		}
		for _, u := range h.Upstreams {
			if _, _, err := net.SplitHostPort(u.Address); err != nil || u.Weight < 0 || u.Weight > 100 {
				t.Fatalf("parsed a bad upstream %+v", u)
			}
		}
		_ = fmt.Sprint(h)
	})
}
