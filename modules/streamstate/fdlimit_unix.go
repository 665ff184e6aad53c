//go:build unix

package streamstate

import "syscall"

// openFileLimit is the process's soft open-file limit, 0 if unknown.
func openFileLimit() uint64 {
	var l syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l); err != nil {
		return 0
	}
	if c := uint64(l.Cur); c < 1<<62 { // not RLIM_INFINITY
		return c
	}
	return 0
}
