package storage

import (
	"errors"
	"os"
	"path/filepath"

	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// ErrUnavailable means the database could not do what was asked: the
// disk is full, the file or its file system refuses writes, or another
// program holds the database locked (SQLite); the server cannot be
// reached, went away or refuses connections (PostgreSQL). A write's
// transaction was rolled back, so nothing was changed, and the same call
// can succeed once the cause is gone, without reopening the store. The
// error is an *UnavailableError that says which cause and what to do.
var ErrUnavailable = errors.New("storage unavailable")

// UnavailableError is a write the database could not do; errors.Is(err,
// ErrUnavailable) holds for it.
type UnavailableError struct {
	// Problem says what is wrong, naming the database, e.g. "the disk
	// holding /var/lib/caddy/streams.db is full" or "PostgreSQL at
	// db.internal:5432 is unreachable".
	Problem string
	// Fix says what to do about it, e.g. "free space on that disk", or
	// what it means: "nothing was changed".
	Fix string
	// Err is the failed step and the database's own error.
	Err error
}

// Error says the problem, the database's error and the fix.
func (e *UnavailableError) Error() string {
	return e.Problem + " (" + e.Err.Error() + "); " + e.Fix
}

// Unwrap makes errors.Is see ErrUnavailable and the database's error.
func (e *UnavailableError) Unwrap() []error { return []error{ErrUnavailable, e.Err} }

// unavailable returns err as an *UnavailableError when the database failed
// for want of a writable, non-full, unlocked file, and err as it is
// otherwise (a constraint, a caller's error, a cancelled context).
func (s *SQLite) unavailable(err error) error {
	var se *sqlite.Error
	var ue *UnavailableError
	if err == nil || !errors.As(err, &se) || errors.As(err, &ue) {
		return err
	}
	e := &UnavailableError{Err: err}
	switch se.Code() & 0xff { // the primary result code
	case sqlite3.SQLITE_FULL:
		e.Problem = "the disk holding " + s.path + " is full"
		e.Fix = "free space on that disk"
	case sqlite3.SQLITE_READONLY, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM:
		// SQLite reports a refused write as a generic I/O error; asking
		// the file system tells why (read-only, immutable, gone).
		why := unwritable(s.path)
		var pe *os.PathError
		switch {
		case errors.As(why, &pe):
			e.Problem = "the database " + s.path + " cannot be written: " + filepath.Base(pe.Path) + ": " + pe.Err.Error()
		case why != nil:
			e.Problem = "the database " + s.path + " cannot be written: " + why.Error()
		case se.Code()&0xff == sqlite3.SQLITE_IOERR:
			// The files are writable: a real I/O error.
			e.Problem = "an I/O error on the database " + s.path
			e.Fix = "check the disk and the system log (dmesg)"
			return e
		default:
			e.Problem = "the database " + s.path + " cannot be written"
		}
		e.Fix = "make the database file, its -wal file and their directory writable, on a file system mounted read-write"
	case sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED:
		e.Problem = "the database " + s.path + " is locked by another program"
		e.Fix = "stop the other program that has it open"
	default:
		return err
	}
	return e
}
