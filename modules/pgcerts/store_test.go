package pgcerts

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/aegis-proxy/caddy-aegis/internal/pgtest"
)

var pg *pgtest.Server

func TestMain(m *testing.M) { pgtest.Main(m, &pg) }

// newStore opens a Store on dsn, closed when the test ends.
func newStore(t *testing.T, dsn string) *Store {
	t.Helper()
	s, err := Open(dsn, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// outcome is what a call returned, in a form both storages can be
// compared by.
func outcome(v any, err error) string {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return "not exist"
	case err != nil:
		return "error: " + err.Error()
	}
	return fmt.Sprintf("%#v", v)
}

// The certmagic storage semantics, case by case, against
// certmagic.FileStorage on a temporary directory: every call answers as
// FileStorage's does.
func TestLikeFileStorage(t *testing.T) {
	ctx := context.Background()
	pgs := newStore(t, pg.NewDatabase(t))
	fss := &certmagic.FileStorage{Path: t.TempDir()}

	type step struct {
		op   string
		key  string
		arg  string // Store's value; "r" makes List recursive
		skip string // why FileStorage is not compared (then want is)
		want string
	}
	steps := []step{
		{op: "list", key: "", arg: "r"},
		{op: "load", key: "a/b/c"},
		{op: "stat", key: "a"},
		{op: "exists", key: "a"},
		{op: "store", key: "a/b/c", arg: "1"},
		{op: "store", key: "a/b/d", arg: "22"},
		{op: "store", key: "a/e", arg: "333"},
		{op: "store", key: "ab", arg: "4444"},
		{op: "store", key: "a-x/y", arg: "5"},
		{op: "store", key: "certificates/acme-v02.api.letsencrypt.org-directory/example.com/example.com.crt", arg: "crt"},
		{op: "store", key: "certificates/acme-v02.api.letsencrypt.org-directory/example.com/example.com.key", arg: "key"},
		{op: "store", key: "empty", arg: ""},
		{op: "load", key: "a/b/c"},
		{op: "load", key: "a/b/d"},
		{op: "load", key: "empty"},
		{op: "load", key: "a//b/./d"},
		{op: "load", key: "/a/b/d"},
		{op: "load", key: "a/b", skip: "FileStorage reads a directory as a file and fails otherwise", want: "not exist"},
		{op: "load", key: "missing"},
		{op: "load", key: "a", skip: "as a/b", want: "not exist"},
		{op: "list", key: "", arg: "r"},
		{op: "list", key: ""},
		{op: "list", key: "a", arg: "r"},
		{op: "list", key: "a"},
		{op: "list", key: "a/b"},
		{op: "list", key: "a/b/c"},
		{op: "list", key: "ab"},
		{op: "list", key: "a-"},
		{op: "list", key: "missing"},
		{op: "list", key: "certificates", arg: "r"},
		{op: "list", key: "certificates"},
		{op: "stat", key: "a/b/c"},
		{op: "stat", key: "a/b"},
		{op: "stat", key: "ab"},
		{op: "stat", key: "a/b/c/d", skip: "FileStorage fails with ENOTDIR below a file", want: "not exist"},
		{op: "stat", key: "missing"},
		{op: "exists", key: "a"},
		{op: "exists", key: "a/b"},
		{op: "exists", key: "a/b/c"},
		{op: "exists", key: "a/bb"},
		{op: "exists", key: "a/b/c/d", skip: "FileStorage takes ENOTDIR for existing", want: "false"},
		{op: "exists", key: "missing"},
		{op: "exists", key: "empty"},
		{op: "store", key: "a/e", arg: "replaced"},
		{op: "load", key: "a/e"},
		{op: "delete", key: "missing"},
		{op: "delete", key: "a/b"},
		{op: "exists", key: "a/b"},
		{op: "exists", key: "a/b/c"},
		{op: "load", key: "a/b/d"},
		{op: "list", key: "a", arg: "r"},
		{op: "delete", key: "a/b"},
		{op: "delete", key: "ab"},
		{op: "load", key: "ab"},
		{op: "exists", key: "a"},
		{op: "list", key: "", arg: "r"},
		{op: "delete", key: "certificates/acme-v02.api.letsencrypt.org-directory/example.com/example.com.key"},
		{op: "list", key: "certificates", arg: "r"},
	}
	run := func(s certmagic.Storage, st step) string {
		switch st.op {
		case "store":
			return outcome(nil, s.Store(ctx, st.key, []byte(st.arg)))
		case "load":
			v, err := s.Load(ctx, st.key)
			return outcome(string(v), err)
		case "delete":
			return outcome(nil, s.Delete(ctx, st.key))
		case "exists":
			return outcome(s.Exists(ctx, st.key), nil)
		case "list":
			l, err := s.List(ctx, st.key, st.arg == "r")
			if len(l) == 0 {
				l = nil
			}
			return outcome(l, err)
		case "stat":
			i, err := s.Stat(ctx, st.key)
			if !i.IsTerminal {
				i.Size = 0 // a directory's size is the file system's
			}
			i.Modified = time.Time{}
			return outcome(i, err)
		}
		panic(st.op)
	}
	for i, st := range steps {
		got := run(pgs, st)
		want := st.want
		if st.skip == "" {
			want = run(fss, st)
		}
		if got != want {
			t.Errorf("step %d: %s %q %q: %s, want %s", i, st.op, st.key, st.arg, got, want)
		}
	}

	// Stat's times: a key's is when it was stored, a directory's its
	// newest key's.
	before := time.Now().Add(-time.Minute)
	if err := pgs.Store(ctx, "t/x", []byte("1")); err != nil {
		t.Fatal(err)
	}
	fi, err := pgs.Stat(ctx, "t/x")
	di, derr := pgs.Stat(ctx, "t")
	if err != nil || derr != nil || fi.Modified.Before(before) || !di.Modified.Equal(fi.Modified) || fi.Size != 1 {
		t.Errorf("Stat times: %+v, %v; %+v, %v", fi, err, di, derr)
	}
}

// Stores that start together on a new database create the tables once,
// without failing each other.
func TestSchemaCreatedOnce(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	errs := make([]error, 6)
	for i := range errs {
		s := newStore(t, dsn)
		wg.Go(func() { errs[i] = s.Store(ctx, fmt.Sprintf("k/%d", i), []byte("v")) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("store %d: %v", i, err)
		}
	}
	l, err := newStore(t, dsn).List(ctx, "k", false)
	if err != nil || len(l) != len(errs) {
		t.Errorf("List: %q, %v", l, err)
	}
}

// Two nodes contend for a lock: the second waits while the first holds it
// (longer than the lock's TTL, since the holder refreshes it) and takes it
// as soon as it is released. TryLock never takes a held lock.
func TestLockContention(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	a, b := newStore(t, dsn), newStore(t, dsn)
	a.LockTTL, b.LockTTL = 1500*time.Millisecond, 1500*time.Millisecond

	if err := a.Lock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}
	if ok, err := b.TryLock(ctx, "issue_cert_example.com"); ok || err != nil {
		t.Fatalf("TryLock of a held lock: %v, %v", ok, err)
	}
	if ok, err := a.TryLock(ctx, "issue_cert_example.com"); ok || err != nil {
		t.Fatalf("TryLock of a lock its own store holds: %v, %v", ok, err)
	}
	got := make(chan time.Time, 1)
	go func() {
		if err := b.Lock(ctx, "issue_cert_example.com"); err != nil {
			t.Error(err)
		}
		got <- time.Now()
	}()
	select {
	case <-got:
		t.Fatal("the second node took a lock the first holds")
	case <-time.After(2 * a.LockTTL):
	}
	released := time.Now()
	if err := a.Unlock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}
	select {
	case at := <-got:
		if d := at.Sub(released); d > 2*lockPoll {
			t.Errorf("the waiting node took the released lock after %v", d)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the waiting node did not take the released lock")
	}
	if err := a.Unlock(ctx, "issue_cert_example.com"); err == nil {
		t.Error("Unlock of a lock this store does not hold succeeded")
	}
	if err := b.Unlock(ctx, "issue_cert_example.com"); err != nil {
		t.Fatal(err)
	}

	// A Lock whose context ends while it waits returns the context's
	// error.
	if err := a.Lock(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if err := b.Lock(short, "x"); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Lock with an ended context: %v", err)
	}
}

// A holder that dies (its process gone: no refresh, no unlock) loses its
// lock once the TTL passes, and a waiting node takes it over. The dead
// holder's late Unlock does not release the new holder's lock.
func TestExpiredLockTakenOver(t *testing.T) {
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	a, b := newStore(t, dsn), newStore(t, dsn)
	a.LockTTL = 1500 * time.Millisecond

	if err := a.Lock(ctx, "renew"); err != nil {
		t.Fatal(err)
	}
	// a "dies": its refresher stops, the lock stays in the database.
	a.mu.Lock()
	h := a.held["renew"]
	a.mu.Unlock()
	close(h.stop)
	<-h.done
	died := time.Now()

	if ok, _ := b.TryLock(ctx, "renew"); ok {
		t.Fatal("took the lock before it expired")
	}
	if err := b.Lock(ctx, "renew"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(died); d < a.LockTTL-200*time.Millisecond || d > a.LockTTL+3*lockPoll {
		t.Errorf("taken over %v after the holder died, want about %v", d, a.LockTTL)
	}

	// The old holder comes back and unlocks: b's lock stays.
	a.mu.Lock()
	h.stop, h.done = make(chan struct{}), make(chan struct{})
	close(h.done)
	a.mu.Unlock()
	_ = a.Unlock(ctx, "renew")
	if ok, _ := newStore(t, dsn).TryLock(ctx, "renew"); ok {
		t.Fatal("the dead holder's Unlock released the new holder's lock")
	}
	if err := b.RenewLockLease(ctx, "renew", time.Minute); err != nil {
		t.Errorf("RenewLockLease: %v", err)
	}
	if err := b.Unlock(ctx, "renew"); err != nil {
		t.Fatal(err)
	}
	c := newStore(t, dsn)
	if ok, err := c.TryLock(ctx, "renew"); !ok || err != nil {
		t.Fatalf("TryLock after the unlock: %v, %v", ok, err)
	}
	if err := c.Unlock(ctx, "renew"); err != nil {
		t.Fatal(err)
	}
}

// A database that is down is an error naming it, never a hang or a
// panic; the store works again when it is back.
func TestDatabaseDown(t *testing.T) {
	if testing.Short() {
		t.Skip("stops the package's PostgreSQL server")
	}
	dsn := pg.NewDatabase(t)
	ctx := context.Background()
	s := newStore(t, dsn)
	if err := s.Store(ctx, "k", []byte("v")); err != nil {
		t.Fatal(err)
	}
	pg.Stop()
	short, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err := s.Load(short, "k")
	cancel()
	if err == nil || errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load with the database down: %v", err)
	} else if want := "PostgreSQL at 127.0.0.1:"; !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not name the database (%s…)", err, want)
	}
	if err := pg.Start(); err != nil {
		t.Fatal(err)
	}
	if v, err := s.Load(ctx, "k"); err != nil || string(v) != "v" {
		t.Errorf("Load after the database came back: %q, %v", v, err)
	}
}
