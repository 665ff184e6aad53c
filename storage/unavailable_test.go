package storage

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// limitPages caps the database file at its current size on the store's
// writer connection (PRAGMA max_page_count), so that a write needing a
// new page fails with SQLITE_FULL, as it does on a full disk; raise lifts
// the cap again. SQLite checks the cap where it checks for a full disk,
// and fails the statement the same way. The admin package's fault tests
// fill a real (tmpfs) disk; this one works without the privileges
// mounting needs.
func limitPages(t *testing.T, s *SQLite) (raise func()) {
	t.Helper()
	var pages int64
	if err := s.write.QueryRow("PRAGMA page_count").Scan(&pages); err != nil {
		t.Fatal(err)
	}
	var capped int64
	if err := s.write.QueryRow("PRAGMA max_page_count = " + strconv.FormatInt(pages, 10)).Scan(&capped); err != nil || capped != pages {
		t.Fatalf("PRAGMA max_page_count = %d: %d, %v", pages, capped, err)
	}
	return func() {
		t.Helper()
		if _, err := s.write.Exec("PRAGMA max_page_count = 1073741823"); err != nil {
			t.Fatal(err)
		}
	}
}

// wantUnavailable fails unless err is an *UnavailableError saying problem.
func wantUnavailable(t *testing.T, what string, err error, problem string) {
	t.Helper()
	var ue *UnavailableError
	if !errors.Is(err, ErrUnavailable) || !errors.As(err, &ue) {
		t.Fatalf("%s: %v (%T), want ErrUnavailable", what, err, err)
	}
	if !strings.Contains(ue.Problem, problem) || ue.Fix == "" || !strings.Contains(err.Error(), problem) {
		t.Fatalf("%s: problem %q, fix %q; want a problem saying %q and a fix", what, ue.Problem, ue.Fix, problem)
	}
}

func TestWritesOnAFullDatabase(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	h, err := s.CreateHost(ctx, genHost(0, 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	before, err := s.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	raise := limitPages(t, s)

	big := genHost(0, 2)
	big.Notes = strings.Repeat("n", 256<<10)
	applied := 0
	_, err = s.CreateHost(ctx, big, func(Stored) error { applied++; return nil })
	wantUnavailable(t, "CreateHost", err, "is full")
	upd := h.Stream
	upd.Notes = big.Notes
	_, err = s.UpdateHost(ctx, upd, func(_, _ Stored) error { applied++; return nil })
	wantUnavailable(t, "UpdateHost", err, "is full")
	if applied != 0 {
		t.Errorf("apply ran %d times for writes that could not be stored", applied)
	}
	after, err := s.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(after) != len(before) || !after[0].UpdatedAt.Equal(before[0].UpdatedAt) || after[0].Notes != before[0].Notes {
		t.Fatalf("hosts after failed writes: %+v, want %+v", after, before)
	}

	// Errors that are not the database's stay what they are.
	if _, err := s.CreateHost(ctx, h.Stream, nil); !errors.Is(err, ErrConflict) || errors.Is(err, ErrUnavailable) {
		t.Fatalf("CreateHost of a taken id: %v, want ErrConflict only", err)
	}

	raise()
	if _, err := s.CreateHost(ctx, big, nil); err != nil {
		t.Fatalf("CreateHost once there is room again: %v", err)
	}
	if _, err := s.UpdateHost(ctx, upd, nil); err != nil {
		t.Fatalf("UpdateHost once there is room again: %v", err)
	}
}

// TestWritesOnAReadOnlyConnection checks that SQLITE_READONLY is reported
// as a database that cannot be written. PRAGMA query_only is the
// artificial way to get it; admin's TestStorageReadOnly makes the files
// immutable instead.
func TestWritesOnAReadOnlyConnection(t *testing.T) {
	s := newStore(t)
	ctx := context.Background()
	if _, err := s.write.Exec("PRAGMA query_only = 1"); err != nil {
		t.Fatal(err)
	}
	_, err := s.CreateHost(ctx, genHost(0, 1), nil)
	wantUnavailable(t, "CreateHost", err, "cannot be written")
	if _, err := s.write.Exec("PRAGMA query_only = 0"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateHost(ctx, genHost(0, 1), nil); err != nil {
		t.Fatal(err)
	}
}

// TestLogWriterOnAFullDatabase checks that the connection-log writer, on a
// database that cannot take its batches, drops and counts them, hands
// each to OnDrop, reports the failure once per outage, and writes again
// once it can.
func TestLogWriterOnAFullDatabase(t *testing.T) {
	s := newStore(t)
	var mu sync.Mutex
	var reports []error
	var dropped []ConnLog
	var recovered []uint64
	w := NewLogWriter(s, LogWriterOptions{
		FlushInterval: 10 * time.Millisecond,
		Retention:     -1,
		OnError: func(err error) {
			mu.Lock()
			reports = append(reports, err)
			mu.Unlock()
		},
		OnDrop: func(batch []ConnLog) {
			mu.Lock()
			dropped = append(dropped, batch...)
			mu.Unlock()
		},
		OnRecover: func(lost uint64) {
			mu.Lock()
			recovered = append(recovered, lost)
			mu.Unlock()
		},
	})
	t.Cleanup(func() { w.Close() })

	// waitFor enqueues one entry per stream id, in a batch of their own,
	// and waits until the writer has dealt with it.
	waitFor := func(ids ...int64) {
		t.Helper()
		done := w.Dropped() + w.Written() + uint64(len(ids))
		for i, id := range ids {
			if !w.Enqueue(entry(id, i)) {
				t.Fatal("Enqueue refused an entry")
			}
		}
		deadline := time.Now().Add(10 * time.Second)
		for w.Dropped()+w.Written() < done {
			if time.Now().After(deadline) {
				t.Fatalf("the writer did not deal with %v", ids)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	reported := func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(reports)
	}

	waitFor(1) // a page for the log's first entries
	raise := limitPages(t, s)
	for range 5 {
		// Enough entries to need a new page.
		ids := make([]int64, 60)
		for i := range ids {
			ids[i] = int64(1 + i%3)
		}
		waitFor(ids...)
	}
	if w.Dropped() == 0 {
		t.Fatal("no entry was dropped on a full database")
	}
	mu.Lock()
	if len(reports) != 1 || len(dropped) != int(w.Dropped()) {
		t.Fatalf("%d reports and %d entries handed to OnDrop for %d dropped; want 1 report and every entry", len(reports), len(dropped), w.Dropped())
	}
	wantUnavailable(t, "the reported failure", reports[0], "is full")
	if !strings.Contains(reports[0].Error(), "not reported") {
		t.Errorf("the report %q does not say that further failures are not reported", reports[0])
	}
	mu.Unlock()

	raise()
	written := w.Written()
	waitFor(1, 2)
	if w.Written() != written+2 {
		t.Fatalf("written %d, want %d once the database has room", w.Written(), written+2)
	}
	if n, err := s.ConnLogs(context.Background(), ConnLogQuery{StreamID: 2, Limit: 1}); err != nil || len(n) != 1 {
		t.Fatalf("stream 2's log: %v, %v", n, err)
	}
	mu.Lock()
	if len(recovered) != 1 || recovered[0] != w.Dropped() {
		t.Errorf("OnRecover calls %v; want one, with the %d entries lost", recovered, w.Dropped())
	}
	mu.Unlock()
	// A new outage is reported again.
	limitPages(t, s)
	for reported() < 2 {
		ids := make([]int64, 60)
		for i := range ids {
			ids[i] = 1
		}
		waitFor(ids...)
		if w.Dropped() > 10000 {
			t.Fatal("the second outage was not reported")
		}
	}
}
