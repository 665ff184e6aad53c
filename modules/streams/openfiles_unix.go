//go:build unix

package streams

import (
	"fmt"
	"os"
	"syscall"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// fdHeadroom is what a port range must leave of the open-file limit for
// everything else: connections, storage, logs.
const fdHeadroom = 256

// checkOpenFiles refuses a port range whose sockets would not fit in the
// process's open-file limit beside the files open now, before any is
// bound.
func checkOpenFiles(s *spec.Stream) error {
	if !s.IsRange() {
		return nil
	}
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return nil
	}
	open := 0
	if fds, err := os.ReadDir("/proc/self/fd"); err == nil {
		open = len(fds)
	}
	return openFilesError(s, uint64(lim.Cur), open) // int64 on FreeBSD
}

// openFilesError is the error for a range of s under an open-file limit
// of limit with open files open, or nil when it fits.
func openFilesError(s *spec.Stream, limit uint64, open int) error {
	ports := s.LastPort() - s.ListenPort + 1
	need := ports
	if s.HasTCP() && s.HasUDP() {
		need *= 2
	}
	if uint64(need+open)+fdHeadroom <= limit {
		return nil
	}
	return &spec.FieldError{ID: s.ID, Name: s.Name, Field: "listen_port_end", Value: int64(s.ListenPortEnd),
		Reason: fmt.Sprintf("%d ports need %d sockets, %d files are open already (a reload or an edit keeps a range's old sockets until the new ones serve), and the open-file limit is %d (%d kept for connections); raise it (ulimit -n, or LimitNOFILE= in the systemd unit) or listen on fewer ports",
			ports, need, open, limit, fdHeadroom)}
}
