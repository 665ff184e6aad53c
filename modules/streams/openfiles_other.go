//go:build !unix

package streams

import "github.com/aegis-proxy/caddy-aegis/spec"

// checkOpenFiles: no open-file limit to check on this system.
func checkOpenFiles(*spec.Stream) error { return nil }
