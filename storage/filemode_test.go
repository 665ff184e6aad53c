package storage

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// An existing streams.db, -wal and -shm open to others (as an older
// version, a copy or a restore left them) are made 0600 when the store
// opens (issue 22).
func TestDatabaseFilesOwnerOnly(t *testing.T) {
	old := syscall.Umask(0o022)
	defer syscall.Umask(old)
	dir := t.TempDir()
	path := filepath.Join(dir, "streams.db")
	db, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{path, path + "-wal", path + "-shm"} {
		if err := os.WriteFile(f, nil, 0o644); err != nil && !os.IsExist(err) {
			t.Fatal(err)
		}
		if err := os.Chmod(f, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	db, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.HighestHostID(context.Background()); err != nil {
		t.Fatal(err)
	}
	check := func() {
		t.Helper()
		for _, f := range []string{path, path + "-wal", path + "-shm"} {
			fi, err := os.Stat(f)
			if err != nil {
				t.Fatal(err)
			}
			if perm := fi.Mode().Perm(); perm != 0o600 {
				t.Errorf("%s: mode %04o, want 0600", filepath.Base(f), perm)
			}
		}
	}
	check()
	// The -shm that SQLite makes again has the database file's mode.
	db.Close()
	os.Remove(path + "-shm")
	if db, err = Open(path); err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	check()
}

// A directory that lets others in gets a warning naming it and the fix.
func TestDirWarning(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "streams.db")
	for _, tc := range []struct {
		mode os.FileMode
		want string
	}{
		{0o700, ""},
		{0o750, "other users may enter it"},
		{0o755, "other users may enter it"},
		{0o777, "other users may write in it"},
	} {
		if err := os.Chmod(dir, tc.mode); err != nil {
			t.Fatal(err)
		}
		got := DirWarning(path)
		if tc.want == "" && got != "" || tc.want != "" && (!strings.Contains(got, tc.want) || !strings.Contains(got, dir) || !strings.Contains(got, "chmod 700")) {
			t.Errorf("mode %04o: %q, want %q", tc.mode, got, tc.want)
		}
	}
	os.Chmod(dir, 0o700)
}
