//go:build !unix

package storage

import "os"

// unwritable tells why the database at path cannot be written, as far as
// this system lets us ask: only that the file is gone.
func unwritable(path string) error {
	_, err := os.Stat(path)
	return err
}
