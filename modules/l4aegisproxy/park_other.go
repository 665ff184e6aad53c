//go:build !linux

package l4aegisproxy

import "github.com/aegis-proxy/caddy-aegis/modules/streamstate"

// parkState is empty where relays do not park (no raw path).
type parkState struct{}

func (*parkState) init() {}

// park never parks here.
func (*relay) park() bool { return false }

// Wake has nothing to wake here.
func (*relay) Wake(*streamstate.Session) {}
