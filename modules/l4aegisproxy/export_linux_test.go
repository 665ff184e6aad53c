package l4aegisproxy

import "github.com/aegis-proxy/caddy-aegis/modules/streamstate"

// Parked is the number of connections the parker holds.
func Parked() int {
	parkMu.Lock()
	defer parkMu.Unlock()
	if thePark == nil {
		return 0
	}
	return thePark.count
}

// ProxyState is the state the proxy handler counts dials into.
func ProxyState(h *Handler) *streamstate.State { return h.state }

// AcceptedFD is the socket of an accepted connection.
func AcceptedFD(a Accepted) int { return a.fd }

// SetParkedHook makes f run, under the parker's lock, as each connection's
// sockets are parked; it returns the function that takes f away.
func SetParkedHook(f func(*streamstate.Session)) (restore func()) {
	parked = f
	return func() { parked = func(*streamstate.Session) {} }
}
