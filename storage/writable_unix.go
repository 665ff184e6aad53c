//go:build unix

package storage

import (
	"errors"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// unwritable tells why the database at path cannot be written: the file,
// its write-ahead log or their directory refuses writes (read-only file
// system, immutable file, permissions), or the file is gone. It returns
// nil when all look writable. It asks with access(2) and never opens the
// files: closing a descriptor of the database would drop the POSIX locks
// SQLite holds on it in this process.
func unwritable(path string) error {
	if _, err := os.Stat(path); err != nil {
		return err
	}
	for _, p := range []string{path, path + "-wal", filepath.Dir(path)} {
		err := unix.Access(p, unix.W_OK)
		if errors.Is(err, unix.ENOENT) && p != path {
			continue
		}
		if err != nil {
			return &os.PathError{Op: "access", Path: p, Err: err}
		}
	}
	return nil
}
