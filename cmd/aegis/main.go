// Command aegis is Caddy with the standard modules, caddy-l4 and the Aegis
// Streams modules built in.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"

	_ "github.com/caddyserver/caddy/v2/modules/standard"
	_ "github.com/mholt/caddy-l4"

	_ "github.com/aegis-proxy/caddy-aegis"
)

func main() {
	caddycmd.Main()
}
