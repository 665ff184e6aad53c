package admin_test

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
)

// A stream that relays to its own listener, to another stream's, or to
// Caddy's admin endpoint is refused by the API, validate-port and the
// Caddyfile, with an error that names the streams or the admin endpoint
// (issue 22, item 1).
func TestUpstreamLoopRefused(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)

	for _, proto := range []string{"tcp", "udp", "tcp+udp"} {
		p := freePort(t)
		s := stream(0, p, p, obj{"protocol": proto, "name": "self-" + proto})
		e := inst.call("POST", "/api/v1/streams", s).apiErr(t, http.StatusBadRequest)
		want := fmt.Sprintf(`upstream_host "127.0.0.1": with upstream_port %d this is the stream's own listener (127.0.0.1:%d/%s)`, p, p, proto)
		if !strings.Contains(e.Error, want) || !strings.Contains(e.Error, `"self-`+proto+`"`) || e.Field != "upstream_host" {
			t.Errorf("%s stream relaying to itself: %+v, want an error on upstream_host with %q", proto, e, want)
		}
		// localhost, 0.0.0.0 and a wildcard listener are the same loop.
		for _, up := range []string{"localhost", "0.0.0.0"} {
			s := stream(0, p, p, obj{"protocol": proto, "upstream_host": up, "listen_address": nil})
			if e := inst.call("POST", "/api/v1/streams", s).apiErr(t, http.StatusBadRequest); !strings.Contains(e.Error, "this is the stream's own listener") {
				t.Errorf("%s stream on every address relaying to %s: %s", proto, up, e.Error)
			}
		}
	}

	// Into another stream: named on both sides.
	a := inst.create(stream(0, freePort(t), freePort(t), obj{"name": "first"}))
	aPort := int(a["listen_port"].(float64))
	e := inst.call("POST", "/api/v1/streams", stream(0, freePort(t), aPort, obj{"name": "second"})).apiErr(t, http.StatusBadRequest)
	if !strings.Contains(e.Error, `the new stream ("second")`) || !strings.Contains(e.Error, fmt.Sprintf(`the listener of stream %d ("first")`, id(a))) {
		t.Errorf("stream relaying into another: %s", e.Error)
	}
	// The other way: a stream may not listen where one relays to, and
	// validate-port says so.
	upPort := int(a["upstream_port"].(float64))
	e = inst.call("POST", "/api/v1/streams", stream(0, upPort, freePort(t), obj{"name": "third"})).apiErr(t, http.StatusBadRequest)
	if !strings.Contains(e.Error, fmt.Sprintf(`is where stream %d ("first") relays to`, id(a))) {
		t.Errorf("stream listening where another relays to: %s", e.Error)
	}
	var res struct {
		Valid  bool `json:"valid"`
		Errors []struct {
			Message string `json:"message"`
		} `json:"errors"`
	}
	inst.call("POST", "/api/v1/streams/validate-port", obj{"protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": upPort}).want(t, http.StatusOK).decode(t, &res)
	if res.Valid || len(res.Errors) != 1 || !strings.Contains(res.Errors[0].Message, `("first") relays to`) {
		t.Errorf("validate-port of the port a stream relays to: %+v", res)
	}
	// A port that another program holds while a stream relays to it is
	// that program's, not a loop: the answer says it is in use.
	held, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", upPort))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	res.Errors = nil
	inst.call("POST", "/api/v1/streams/validate-port", obj{"protocol": "tcp", "listen_address": "127.0.0.1", "listen_port": upPort}).want(t, http.StatusOK).decode(t, &res)
	if res.Valid || len(res.Errors) != 1 || !strings.Contains(res.Errors[0].Message, "in use") {
		t.Errorf("validate-port of a held port a stream relays to: %+v, want one error saying it is in use", res)
	}

	// Caddy's admin endpoint.
	e = inst.call("POST", "/api/v1/streams", stream(0, freePort(t), inst.adminPort, nil)).apiErr(t, http.StatusBadRequest)
	if !strings.Contains(e.Error, fmt.Sprintf("this is Caddy's admin endpoint (127.0.0.1:%d)", inst.adminPort)) {
		t.Errorf("stream relaying to the admin endpoint: %s", e.Error)
	}
	if got := inst.call("GET", "/api/v1/streams", nil).want(t, http.StatusOK).list(t); len(got) != 1 {
		t.Errorf("after the refusals: %d streams, want 1", len(got))
	}

	// The Caddyfile: the same loops refuse the config.
	p := freePort(t)
	err = inst.caddy.LoadCaddyfile(fmt.Sprintf(`{
	admin 127.0.0.1:%d
	streams {
		storage sqlite %s
		host 7 selfish {
			protocol udp
			listen 127.0.0.1:%d
			upstream 127.0.0.1:%d
		}
		host 8 admin {
			listen 127.0.0.1:%d
			upstream localhost:%d
		}
	}
}
`, inst.adminPort, inst.dbFile, p, p, freePort(t), inst.adminPort))
	if err == nil || !strings.Contains(err.Error(), fmt.Sprintf(`stream 7 ("selfish"): upstream_host "127.0.0.1": with upstream_port %d this is the stream's own listener (127.0.0.1:%d/udp)`, p, p)) ||
		!strings.Contains(err.Error(), `stream 8 ("admin"): upstream_host "localhost"`) || !strings.Contains(err.Error(), "Caddy's admin endpoint") {
		t.Errorf("Caddyfile with loops: %v", err)
	}
}
