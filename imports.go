// Package caddyaegis registers every Aegis Streams module with Caddy, so that
// `xcaddy build --with github.com/aegis-proxy/caddy-aegis` builds them in.
package caddyaegis

import (
	_ "github.com/aegis-proxy/caddy-aegis/admin"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisguard"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegisproxy"
	_ "github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	_ "github.com/aegis-proxy/caddy-aegis/modules/pgcerts"
	_ "github.com/aegis-proxy/caddy-aegis/modules/streams"
)
