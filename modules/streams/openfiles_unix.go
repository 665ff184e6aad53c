//go:build unix

package streams

import (
	"fmt"
	"syscall"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// fdHeadroom is what a port range must leave of the open-file limit for
// everything else: the other streams, connections, storage, logs.
const fdHeadroom = 256

// checkOpenFiles refuses a port range whose sockets would not fit in the
// process's open-file limit, before any is bound.
func checkOpenFiles(s *spec.Stream) error {
	if !s.IsRange() {
		return nil
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return nil
	}
	return openFilesError(s, lim.Cur)
}

// openFilesError is the error for a range of s under an open-file limit
// of limit, or nil when it fits.
func openFilesError(s *spec.Stream, limit uint64) error {
	ports := s.LastPort() - s.ListenPort + 1
	need := ports
	if s.HasTCP() && s.HasUDP() {
		need *= 2
	}
	if uint64(need)+fdHeadroom <= limit {
		return nil
	}
	return &spec.FieldError{ID: s.ID, Name: s.Name, Field: "listen_port_end", Value: int64(s.ListenPortEnd),
		Reason: fmt.Sprintf("%d ports need %d sockets, and the open-file limit is %d (%d kept for connections); raise it (ulimit -n, or LimitNOFILE= in the systemd unit) or listen on fewer ports",
			ports, need, limit, fdHeadroom)}
}
