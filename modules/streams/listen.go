package streams

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"syscall"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
)

// bound counts the stream addresses that this process's stream listeners
// hold, across config loads: a reload binds the same address again with
// SO_REUSEPORT while the old listener still runs, and that must not be
// mistaken for a port taken by somebody else.
var bound = struct {
	sync.Mutex
	m map[string]int
}{m: map[string]int{}}

func boundKey(s *Stream) string { return "tcp/" + s.ListenHostPort() }

// listen binds the stream's TCP listener. A port that something else holds
// (another program, or Caddy's own admin endpoint or HTTP servers, which
// also use SO_REUSEPORT and would otherwise silently share it) is refused
// with an error that names the stream, the port and the fix.
func listen(ctx caddy.Context, s *Stream) (net.Listener, error) {
	key := boundKey(s)
	bound.Lock()
	defer bound.Unlock()
	if bound.m[key] == 0 {
		probe, err := net.Listen("tcp", s.ListenHostPort())
		if err != nil {
			return nil, bindError(s, err)
		}
		probe.Close()
	}
	na := caddy.NetworkAddress{Network: "tcp", Host: s.ListenAddress, StartPort: uint(s.ListenPort), EndPort: uint(s.ListenPort)}
	// Accepted sockets inherit SO_KEEPALIVE from the listener, which spares
	// Go's four setsockopt calls on each of them.
	ln, err := na.Listen(ctx, 0, net.ListenConfig{KeepAlive: -1, Control: l4aegisproxy.KeepAliveControl})
	if err != nil {
		return nil, bindError(s, err)
	}
	bound.m[key]++
	return ln.(net.Listener), nil
}

// unbind forgets one listener of the stream's address.
func unbind(s *Stream) {
	key := boundKey(s)
	bound.Lock()
	defer bound.Unlock()
	if bound.m[key]--; bound.m[key] <= 0 {
		delete(bound.m, key)
	}
}

func bindError(s *Stream, err error) error {
	what := "cannot listen"
	hint := "check listen_address and listen_port"
	switch {
	case errors.Is(err, syscall.EADDRINUSE):
		what = "already in use (by another program, or by Caddy's admin endpoint or an HTTP server)"
		hint = "choose a free port"
	case errors.Is(err, syscall.EACCES):
		what = "permission denied"
		hint = "use a port above 1023 or give the binary CAP_NET_BIND_SERVICE"
	case errors.Is(err, syscall.EADDRNOTAVAIL):
		what = "address not available on this machine"
		hint = "use an address of one of this machine's interfaces, or 0.0.0.0"
	}
	return fmt.Errorf("stream %d (%q): listen_port %d on %q: %s: %v; %s",
		s.ID, s.DisplayName(), s.ListenPort, s.ListenAddress, what, err, hint)
}
