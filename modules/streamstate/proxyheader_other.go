//go:build !unix

package streamstate

import "net"

func init() {
	readProxyHeader = func(net.Conn, []byte) (int, headerState, error) {
		return 0, headerInvalid, errProxyUnsupported
	}
}
