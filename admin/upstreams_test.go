package admin_test

import (
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// TestAPIUpstreams: a stream created with upstreams only shows the first
// one as upstream_host and upstream_port and balances over them; giving
// both with different values, or a misspelt key of an upstream, is a 400
// that names the fields; PATCH of upstreams alone moves upstream_host to
// the new first one; the status has a row per upstream.
func TestAPIUpstreams(t *testing.T) {
	checkNoLeaks(t)
	a, b := newServer(t, echo), newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	ups := []obj{{"host": "127.0.0.1", "port": a.Port}, {"host": "127.0.0.1", "port": b.Port, "weight": 2}}

	e := inst.call("POST", "/api/v1/streams", stream(0, port, b.Port, obj{"upstreams": ups})).apiErr(t, http.StatusBadRequest)
	if e.Field != "upstream_host" || !strings.Contains(e.Error, "upstream_host and upstream_port differ from the first of upstreams") {
		t.Errorf("upstream_port and upstreams disagree: %+v", e)
	}
	e = inst.call("POST", "/api/v1/streams", stream(0, port, 0, obj{"upstream_host": nil, "upstream_port": nil,
		"upstreams": []obj{{"host": "127.0.0.1", "port": a.Port, "wieght": 2}}})).apiErr(t, http.StatusBadRequest)
	if !strings.Contains(e.Error, `unknown field "wieght"`) {
		t.Errorf("a misspelt upstream key: %+v", e)
	}
	e = inst.call("POST", "/api/v1/streams", stream(0, port, 0, obj{"upstream_host": nil, "upstream_port": nil,
		"upstreams": ups, "load_balancing": "fastest"})).apiErr(t, http.StatusBadRequest)
	if e.Field != "load_balancing" {
		t.Errorf("a bad load_balancing: %+v", e)
	}

	got := inst.create(stream(0, port, 0, obj{"upstream_host": nil, "upstream_port": nil, "upstreams": ups, "load_balancing": "round_robin"}))
	if norm(got["upstream_port"]) != norm(a.Port) || got["upstream_host"] != "127.0.0.1" || norm(got["upstreams"]) != norm(ups) {
		t.Fatalf("created: %v", got)
	}
	path := fmt.Sprintf("/api/v1/streams/%d", id(got))
	for i := range 6 {
		msg := fmt.Sprint("m", i)
		c := dial(t, port)
		if r := roundTrip(t, c, msg); r != msg {
			t.Fatalf("round trip: %q", r)
		}
		c.Close()
	}
	var st struct {
		Status struct {
			Upstreams []struct {
				Port             int    `json:"port"`
				Healthy          bool   `json:"healthy"`
				TotalConnections uint64 `json:"total_connections"`
				BytesSent        uint64 `json:"bytes_sent"`
			} `json:"upstreams"`
		} `json:"status"`
	}
	inst.call("GET", path, nil).want(t, http.StatusOK).decode(t, &st)
	if u := st.Status.Upstreams; len(u) != 2 || u[0].Port != a.Port || u[0].TotalConnections != 2 || u[1].TotalConnections != 4 || !u[1].Healthy || u[1].BytesSent != 8 {
		t.Errorf("status.upstreams = %+v, want a 2 and b 4 connections", u)
	}
	// The stored connection log names each connection's upstream.
	var perUpstream map[string]int
	testenv.Eventually(t, "6 stored log entries", func() bool {
		entries := inst.connLog(id(got), "").Entries
		perUpstream = map[string]int{}
		for _, e := range entries {
			perUpstream[e.Upstream]++
		}
		return len(entries) == 6
	})
	if aa, bb := fmt.Sprintf("127.0.0.1:%d", a.Port), fmt.Sprintf("127.0.0.1:%d", b.Port); perUpstream[aa] != 2 || perUpstream[bb] != 4 {
		t.Errorf("stored log entries per upstream %v, want %s 2 and %s 4", perUpstream, aa, bb)
	}

	// PATCH upstreams alone: upstream_host and upstream_port follow.
	r := inst.call("PATCH", path, fmt.Sprintf(`{"upstreams": [{"host": "127.0.0.1", "port": %d}]}`, b.Port), ctMergePatch).want(t, http.StatusOK).obj(t)
	if norm(r["upstream_port"]) != norm(b.Port) {
		t.Errorf("after PATCH upstreams: %v", r)
	}
	// A PUT with upstreams needs no upstream_host and upstream_port.
	inst.call("PUT", path, stream(0, port, 0, obj{"upstream_host": nil, "upstream_port": nil, "upstreams": ups})).want(t, http.StatusOK)
}

// TestAPIPortRange: a stream with listen_port_end relays each port to its
// upstream port; validate-port checks a range as a range, naming the first
// port that clashes.
func TestAPIPortRange(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	first := testenv.FreePortRange(t, 10)
	inst := startCaddy(t, streamsApp(), nil)
	inst.create(stream(0, first+4, up.Port, obj{"listen_port_end": first + 5, "upstream_port_fixed": true}))
	for _, p := range []int{first + 4, first + 5} {
		if got := roundTrip(t, dial(t, p), "r"); got != "r" {
			t.Fatalf("port %d: %q", p, got)
		}
	}
	var res struct {
		Valid  bool `json:"valid"`
		Errors []struct {
			Field   string `json:"field"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	inst.call("POST", "/api/v1/streams/validate-port", obj{"protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": first, "listen_port_end": first + 9}).
		want(t, http.StatusOK).decode(t, &res)
	if res.Valid || len(res.Errors) != 1 || !strings.Contains(res.Errors[0].Message, fmt.Sprintf("first at port %d", first+4)) {
		t.Errorf("validate-port of an overlapping range: %+v", res)
	}
	inst.call("POST", "/api/v1/streams/validate-port", obj{"protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": first, "listen_port_end": first + 3}).
		want(t, http.StatusOK).decode(t, &res)
	if !res.Valid {
		t.Errorf("validate-port of a free range: %+v", res)
	}
	e := inst.call("POST", "/api/v1/streams", stream(0, first, up.Port, obj{"listen_port_end": first + 9})).apiErr(t, http.StatusBadRequest)
	if !strings.Contains(e.Error, "overlaps") {
		t.Errorf("create of an overlapping range: %+v", e)
	}
}

// TestAPISNI: streams with sni share a port through the API; validate-port
// takes sni, so a stream with names checks as one that may share.
func TestAPISNI(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	inst.create(stream(0, port, up.Port, nil))
	check := func(sni []string) (valid bool, msg string) {
		var res struct {
			Valid  bool `json:"valid"`
			Errors []struct {
				Message string `json:"message"`
			} `json:"errors"`
		}
		inst.call("POST", "/api/v1/streams/validate-port", obj{"protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": port, "sni": sni}).
			want(t, http.StatusOK).decode(t, &res)
		if len(res.Errors) > 0 {
			msg = res.Errors[0].Message
		}
		return res.Valid, msg
	}
	if valid, msg := check(nil); valid || !strings.Contains(msg, "overlaps") {
		t.Errorf("validate-port without sni on a taken port: %v %q", valid, msg)
	}
	if valid, msg := check([]string{"a.test"}); !valid {
		t.Errorf("validate-port with sni: %v %q", valid, msg)
	}
	got := inst.create(stream(0, port, up.Port, obj{"sni": []string{"a.test", "*.b.test"}}))
	if norm(got["sni"]) != `["a.test","*.b.test"]` {
		t.Errorf("created: %v", got)
	}
	// Without TLS: the default stream, the first one.
	if r := roundTrip(t, dial(t, port), "plain"); r != "plain" {
		t.Errorf("plain client: %q", r)
	}
	e := inst.call("POST", "/api/v1/streams", stream(0, port, up.Port, obj{"sni": []string{"x.b.test"}})).apiErr(t, http.StatusBadRequest)
	if e.Field != "sni" || !strings.Contains(e.Error, `overlaps "*.b.test"`) {
		t.Errorf("an overlapping name: %+v", e)
	}
}
