package storage

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// genHost is a host whose every setting is derived from gen, so that a row
// read back shows whether all of it came from one write: strings are
// "<json name>-<gen>" (the name "name-<gen>"), numbers differ per setting
// and generation, booleans are true in one generation and false in the
// next, lists have two entries. It is made by reflection, so it covers a
// setting added to spec.Stream without a change here.
func genHost(id int64, gen int) spec.Stream {
	var s spec.Stream
	v := reflect.ValueOf(&s).Elem()
	for i := 0; i < v.NumField(); i++ {
		f, name := v.Field(i), strings.Split(v.Type().Field(i).Tag.Get("json"), ",")[0]
		switch f.Kind() {
		case reflect.String:
			f.SetString(fmt.Sprintf("%s-%d", name, gen))
		case reflect.Int, reflect.Int64:
			f.SetInt(int64(100*gen + i + 1))
		case reflect.Bool:
			f.SetBool((gen+i)%2 == 0)
		case reflect.Slice:
			if f.Type() == reflect.TypeFor[[]spec.Upstream]() {
				f.Set(reflect.ValueOf([]spec.Upstream{{Host: fmt.Sprintf("%s-%d", name, gen), Port: gen + 1, Weight: gen%100 + 1, Backup: gen%2 == 0},
					{Host: "10.0.0.1", Port: 1}}))
				break
			}
			f.Set(reflect.ValueOf([]string{fmt.Sprintf("%s-%d", name, gen), "10.0.0.0/8"}))
		default:
			panic("genHost: no value for " + name)
		}
	}
	s.ID = id
	return s
}

// hostGen returns the generation every field of h was written with, or an
// error naming the first field that disagrees.
func hostGen(h Stored) (int, error) {
	var gen int
	if _, err := fmt.Sscanf(h.Name, "name-%d", &gen); err != nil {
		return 0, fmt.Errorf("name %q: %v", h.Name, err)
	}
	want := Stored{Stream: genHost(h.ID, gen), CreatedAt: h.CreatedAt, UpdatedAt: h.UpdatedAt, Version: h.Version}
	if !reflect.DeepEqual(h, want) {
		return 0, fmt.Errorf("host %d is not all generation %d:\n got %+v\nwant %+v", h.ID, gen, h, want)
	}
	return gen, nil
}

func TestHostRoundTrip(t *testing.T) { eachBackend(t, testHostRoundTrip) }

func testHostRoundTrip(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	before := time.Now().Add(-time.Millisecond)

	in := genHost(0, 1)
	// Every field must be set by the create (generation 1) or the update
	// (generation 2), or this test does not cover it; booleans are true in
	// one and false in the other.
	v1, v2 := reflect.ValueOf(in), reflect.ValueOf(genHost(0, 2))
	for i := 0; i < v1.NumField(); i++ {
		switch name := v1.Type().Field(i).Name; name {
		case "ID":
		default:
			if v1.Field(i).IsZero() && v2.Field(i).IsZero() {
				t.Fatalf("genHost leaves %s zero", name)
			}
		}
	}

	created, err := s.CreateHost(ctx, in, nil)
	if err != nil {
		t.Fatal(err)
	}
	if created.ID <= 0 {
		t.Fatalf("assigned ID %d", created.ID)
	}
	if created.CreatedAt.Before(before) || created.CreatedAt.After(time.Now()) || !created.UpdatedAt.Equal(created.CreatedAt) {
		t.Errorf("created_at %v, updated_at %v: want both now", created.CreatedAt, created.UpdatedAt)
	}
	if created.CreatedAt.Location() != time.UTC {
		t.Errorf("created_at in %v, want UTC", created.CreatedAt.Location())
	}
	want := Stored{Stream: in, CreatedAt: created.CreatedAt, UpdatedAt: created.UpdatedAt, Version: created.Version}
	want.ID = created.ID
	if !reflect.DeepEqual(created, want) {
		t.Errorf("CreateHost returned\n%+v\nwant\n%+v", created, want)
	}

	got, err := s.GetHost(ctx, created.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, created) {
		t.Errorf("GetHost =\n%+v\nwant\n%+v", got, created)
	}

	// Update changes every field but CreatedAt.
	time.Sleep(2 * time.Millisecond)
	upd := genHost(created.ID, 2)
	updated, err := s.UpdateHost(ctx, upd, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !updated.CreatedAt.Equal(created.CreatedAt) || !updated.UpdatedAt.After(created.UpdatedAt) {
		t.Errorf("after update created_at %v updated_at %v; before %v %v", updated.CreatedAt, updated.UpdatedAt, created.CreatedAt, created.UpdatedAt)
	}
	if g, err := hostGen(updated); err != nil || g != 2 {
		t.Errorf("updated host: generation %d, %v", g, err)
	}
	got, err = s.GetHost(ctx, created.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, updated) {
		t.Errorf("GetHost after update =\n%+v\nwant\n%+v", got, updated)
	}

	// Zero values and empty lists.
	zeroStream := spec.Stream{ID: created.ID, WhitelistCIDRs: []string{}}
	updated, err = s.UpdateHost(ctx, zeroStream, nil)
	if err != nil {
		t.Fatal(err)
	}
	got, err = s.GetHost(ctx, created.ID)
	if err != nil {
		t.Fatal(err)
	}
	zero := Stored{Stream: spec.Stream{ID: created.ID}, CreatedAt: got.CreatedAt, UpdatedAt: got.UpdatedAt, Version: got.Version}
	if !reflect.DeepEqual(got, zero) || !reflect.DeepEqual(updated, zero) {
		t.Errorf("zero host read back as\n%+v\nreturned\n%+v", got, updated)
	}

	// Explicit IDs, and listing in ID order.
	if _, err := s.CreateHost(ctx, genHost(100, 3), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := s.CreateHost(ctx, genHost(50, 4), nil); err != nil {
		t.Fatal(err)
	}
	hosts, err := s.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []int64
	for _, h := range hosts {
		ids = append(ids, h.ID)
	}
	if want := []int64{created.ID, 50, 100}; !reflect.DeepEqual(ids, want) {
		t.Errorf("ListHosts IDs = %v, want %v", ids, want)
	}
	if g, err := hostGen(hosts[2]); err != nil || g != 3 {
		t.Errorf("listed host 100: generation %d, %v", g, err)
	}
}

func TestHostErrors(t *testing.T) { eachBackend(t, testHostErrors) }

func testHostErrors(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	h, err := s.CreateHost(ctx, genHost(5, 1), nil)
	if err != nil {
		t.Fatal(err)
	}

	called := false
	apply := func(Stored) error { called = true; return nil }
	for i, tc := range []struct {
		name string
		err  error
		want error
	}{
		{"get missing", func() error { _, err := s.GetHost(ctx, 6); return err }(), ErrNotFound},
		{"update missing", func() error { _, err := s.UpdateHost(ctx, genHost(6, 1), nil); return err }(), ErrNotFound},
		{"update id 0", func() error { _, err := s.UpdateHost(ctx, genHost(0, 1), nil); return err }(), ErrNotFound},
		{"delete missing", s.DeleteHost(ctx, 6, apply), ErrNotFound},
		{"create taken", func() error { _, err := s.CreateHost(ctx, genHost(5, 2), apply); return err }(), ErrConflict},
		{"create negative", func() error { _, err := s.CreateHost(ctx, genHost(-1, 2), apply); return err }(), ErrInvalid},
		{"create above 2^53-1", func() error { _, err := s.CreateHost(ctx, genHost(1<<53, 2), apply); return err }(), ErrInvalid},
	} {
		if !errors.Is(tc.err, tc.want) {
			t.Errorf("%d: %s: error %v, want %v", i, tc.name, tc.err, tc.want)
		}
		if tc.err != nil && !strings.HasPrefix(tc.err.Error(), "storage: ") {
			t.Errorf("%d: %s: error %q lacks the storage: prefix", i, tc.name, tc.err)
		}
	}
	if called {
		t.Error("apply was called for a write that failed before it")
	}
	got, err := s.GetHost(ctx, 5)
	if err != nil || !reflect.DeepEqual(got, h) {
		t.Errorf("host 5 changed: %+v, %v", got, err)
	}
}

func TestHostIDsNotReused(t *testing.T) { eachBackend(t, testHostIDsNotReused) }

func testHostIDsNotReused(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	var last int64
	for i := range 3 {
		h, err := s.CreateHost(ctx, genHost(0, i), nil)
		if err != nil {
			t.Fatal(err)
		}
		if h.ID <= last {
			t.Fatalf("ID %d after %d", h.ID, last)
		}
		last = h.ID
	}
	if err := s.DeleteHost(ctx, last, nil); err != nil {
		t.Fatal(err)
	}
	h, err := s.CreateHost(ctx, genHost(0, 9), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h.ID <= last {
		t.Errorf("ID %d of a deleted host assigned again", h.ID)
	}
	// An explicit ID moves the sequence past it.
	if _, err := s.CreateHost(ctx, genHost(1000, 9), nil); err != nil {
		t.Fatal(err)
	}
	h, err = s.CreateHost(ctx, genHost(0, 9), nil)
	if err != nil {
		t.Fatal(err)
	}
	if h.ID != 1001 {
		t.Errorf("ID after explicit 1000 = %d, want 1001", h.ID)
	}
}

func TestApplyReceivesHosts(t *testing.T) { eachBackend(t, testApplyReceivesHosts) }

func testApplyReceivesHosts(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()

	var applied Stored
	created, err := s.CreateHost(ctx, genHost(0, 1), func(h Stored) error {
		applied = h
		// apply may read the store; it sees the state before the change.
		if _, err := s.GetHost(ctx, h.ID); !errors.Is(err, ErrNotFound) {
			t.Errorf("GetHost inside apply: %v, want ErrNotFound", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(applied, created) {
		t.Errorf("create apply got\n%+v\nreturned\n%+v", applied, created)
	}

	var oldSeen, newSeen Stored
	updated, err := s.UpdateHost(ctx, genHost(created.ID, 2), func(old, new Stored) error {
		oldSeen, newSeen = old, new
		// Changing what apply was given changes nothing stored.
		new.WhitelistCIDRs[0] = "changed"
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(oldSeen, created) {
		t.Errorf("update apply old =\n%+v\nwant\n%+v", oldSeen, created)
	}
	if newSeen.ID != updated.ID || !newSeen.UpdatedAt.Equal(updated.UpdatedAt) || newSeen.Name != updated.Name {
		t.Errorf("update apply new =\n%+v\nwant\n%+v", newSeen, updated)
	}
	if g, err := hostGen(updated); err != nil || g != 2 {
		t.Errorf("returned host: generation %d, %v", g, err)
	}
	if got, _ := s.GetHost(ctx, created.ID); !reflect.DeepEqual(got, updated) {
		t.Errorf("stored host =\n%+v\nwant\n%+v", got, updated)
	}

	var deleted Stored
	if err := s.DeleteHost(ctx, created.ID, func(old Stored) error { deleted = old; return nil }); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(deleted, updated) {
		t.Errorf("delete apply old =\n%+v\nwant\n%+v", deleted, updated)
	}
	if _, err := s.GetHost(ctx, created.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("GetHost after delete: %v", err)
	}
}

type applyError struct{ op string }

func (e *applyError) Error() string { return "listening failed during " + e.op }

func TestApplyFailureLeavesDatabaseUnchanged(t *testing.T) {
	eachBackend(t, testApplyFailureLeavesDatabaseUnchanged)
}

func testApplyFailureLeavesDatabaseUnchanged(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	h, err := s.CreateHost(ctx, genHost(1, 1), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: 1, Action: ActionAllowed}}); err != nil {
		t.Fatal(err)
	}
	snapshot := func() ([]Stored, []ConnLog) {
		hosts, err := s.ListHosts(ctx)
		if err != nil {
			t.Fatal(err)
		}
		logs, err := s.ConnLogs(ctx, ConnLogQuery{})
		if err != nil {
			t.Fatal(err)
		}
		return hosts, logs
	}
	hosts0, logs0 := snapshot()

	for i, tc := range []struct {
		name string
		run  func(fail error) error
	}{
		{"create assigned", func(fail error) error {
			_, err := s.CreateHost(ctx, genHost(0, 2), func(Stored) error { return fail })
			return err
		}},
		{"create explicit", func(fail error) error {
			_, err := s.CreateHost(ctx, genHost(2, 2), func(Stored) error { return fail })
			return err
		}},
		{"update", func(fail error) error {
			_, err := s.UpdateHost(ctx, genHost(1, 2), func(_, _ Stored) error { return fail })
			return err
		}},
		{"delete", func(fail error) error {
			return s.DeleteHost(ctx, 1, func(Stored) error { return fail })
		}},
	} {
		fail := &applyError{tc.name}
		err := tc.run(fail)
		if !errors.Is(err, fail) {
			t.Errorf("%d: %s: error %v, want the apply error", i, tc.name, err)
		}
		var ae *applyError
		if !errors.As(err, &ae) || ae.op != tc.name {
			t.Errorf("%d: %s: errors.As does not find the apply error in %v", i, tc.name, err)
		}
		hosts, logs := snapshot()
		if !reflect.DeepEqual(hosts, hosts0) || !reflect.DeepEqual(logs, logs0) {
			t.Errorf("%d: %s: database changed:\nhosts %+v\nlogs %+v", i, tc.name, hosts, logs)
		}
	}

	// A panicking apply rolls back too, and the store stays usable.
	func() {
		defer func() {
			if recover() == nil {
				t.Error("apply's panic did not propagate")
			}
		}()
		s.UpdateHost(ctx, genHost(1, 3), func(_, _ Stored) error { panic("boom") })
	}()
	if got, err := s.GetHost(ctx, 1); err != nil || !reflect.DeepEqual(got, h) {
		t.Errorf("after a panicking apply: %+v, %v", got, err)
	}
	if _, err := s.UpdateHost(ctx, genHost(1, 4), nil); err != nil {
		t.Errorf("write after a panicking apply: %v", err)
	}
}

func TestDeleteHostDeletesItsLog(t *testing.T) { eachBackend(t, testDeleteHostDeletesItsLog) }

func testDeleteHostDeletesItsLog(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	for _, id := range []int64{1, 2} {
		if _, err := s.CreateHost(ctx, genHost(id, 1), nil); err != nil {
			t.Fatal(err)
		}
		if err := s.AppendConnLogs(ctx, []ConnLog{
			{StreamID: id, Action: ActionAllowed}, {StreamID: id, Action: ActionBlocked},
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.DeleteHost(ctx, 1, nil); err != nil {
		t.Fatal(err)
	}
	if logs, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 1}); err != nil || len(logs) != 0 {
		t.Errorf("stream 1 log after delete: %d entries, %v", len(logs), err)
	}
	if logs, err := s.ConnLogs(ctx, ConnLogQuery{StreamID: 2}); err != nil || len(logs) != 2 {
		t.Errorf("stream 2 log: %d entries, %v; want 2", len(logs), err)
	}
}

func TestContextCanceled(t *testing.T) { eachBackend(t, testContextCanceled) }

func testContextCanceled(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.CreateHost(ctx, genHost(0, 1), nil); !errors.Is(err, context.Canceled) {
		t.Errorf("CreateHost with a canceled context: %v", err)
	}
	if _, err := s.ListHosts(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("ListHosts with a canceled context: %v", err)
	}
	if hosts, err := s.ListHosts(context.Background()); err != nil || len(hosts) != 0 {
		t.Errorf("hosts: %v, %v", hosts, err)
	}
}

// TestConcurrentWriters has several goroutines, on two stores open on the
// same file (as two processes would be), create and update hosts at once:
// every write succeeds, none reports "database is locked".
func TestConcurrentWriters(t *testing.T) {
	path := filepath.Join(t.TempDir(), "aegis.db")
	var stores [2]*SQLite
	for i := range stores {
		s, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		stores[i] = s
	}
	ctx := context.Background()

	// Host 1,000,000 makes the store assign IDs above it, clear of the
	// explicit IDs below.
	if _, err := stores[0].CreateHost(ctx, genHost(1_000_000, 1), nil); err != nil {
		t.Fatal(err)
	}

	const workers, perWorker = 6, 10
	var wg sync.WaitGroup
	errs := make(chan error, workers*perWorker*3)
	for w := range workers {
		s := stores[w%2]
		wg.Go(func() {
			for i := range perWorker {
				h, err := s.CreateHost(ctx, genHost(0, i), nil)
				if err != nil {
					errs <- fmt.Errorf("worker %d create %d: %w", w, i, err)
					continue
				}
				if _, err := s.UpdateHost(ctx, genHost(h.ID, i+1), func(_, _ Stored) error { return nil }); err != nil {
					errs <- fmt.Errorf("worker %d update %d: %w", w, h.ID, err)
				}
				if err := s.AppendConnLogs(ctx, []ConnLog{{StreamID: h.ID, Action: ActionAllowed}}); err != nil {
					errs <- fmt.Errorf("worker %d log %d: %w", w, h.ID, err)
				}
				if _, err := s.ListHosts(ctx); err != nil {
					errs <- fmt.Errorf("worker %d list: %w", w, err)
				}
			}
		})
	}
	// Explicit IDs that collide: exactly one create of each ID succeeds,
	// the others fail with ErrConflict.
	var successes sync.Map
	for w := range 4 {
		s := stores[w%2]
		wg.Go(func() {
			for id := int64(10000); id < 10010; id++ {
				_, err := s.CreateHost(ctx, genHost(id, 1), nil)
				switch {
				case err == nil:
					if _, dup := successes.LoadOrStore(id, w); dup {
						errs <- fmt.Errorf("host %d created twice", id)
					}
				case errors.Is(err, ErrConflict):
				default:
					errs <- fmt.Errorf("worker %d create %d: %w", w, id, err)
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for id := int64(10000); id < 10010; id++ {
		if _, ok := successes.Load(id); !ok {
			t.Errorf("no create of host %d succeeded", id)
		}
	}
	hosts, err := stores[0].ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if want := workers*perWorker + 10 + 1; len(hosts) != want {
		t.Errorf("%d hosts, want %d", len(hosts), want)
	}
	for _, h := range hosts {
		if _, err := hostGen(h); err != nil {
			t.Error(err)
		}
	}
}

// IDs given out, explicitly or not, are never given out again, and
// HighestHostID says how far they went.
func TestHighestHostID(t *testing.T) { eachBackend(t, testHighestHostID) }

func testHighestHostID(t *testing.T, b testBackend) {
	db := b.store(t)
	ctx := context.Background()
	if top, err := db.HighestHostID(ctx); err != nil || top != 0 {
		t.Fatalf("empty store: %d, %v", top, err)
	}
	h := spec.Stream{ID: 7, Name: "x", Protocol: "tcp", ListenPort: 1, UpstreamHost: "h", UpstreamPort: 1, Enabled: true}
	if _, err := db.CreateHost(ctx, h, nil); err != nil {
		t.Fatal(err)
	}
	if err := db.DeleteHost(ctx, 7, nil); err != nil {
		t.Fatal(err)
	}
	if top, err := db.HighestHostID(ctx); err != nil || top != 7 {
		t.Fatalf("after creating and deleting id 7: %d, %v", top, err)
	}
}

// TestHostVersions checks that every create and update gives a host a
// version above every version handed out before: also to a host created
// again under a deleted one's ID, and after the database is opened again.
func TestHostVersions(t *testing.T) { eachBackend(t, testHostVersions) }

func testHostVersions(t *testing.T, bk testBackend) {
	path := bk.newDB(t)
	s := bk.open(t, path, nil)
	ctx := context.Background()
	seen := map[int64]bool{}
	var top int64
	took := func(what string, h Stored, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		if h.Version <= top || seen[h.Version] {
			t.Fatalf("%s: version %d, want one above %d", what, h.Version, top)
		}
		seen[h.Version], top = true, h.Version
		if got, err := s.GetHost(ctx, h.ID); err != nil || got.Version != h.Version {
			t.Fatalf("%s: stored version %d (%v), returned %d", what, got.Version, err, h.Version)
		}
	}
	a, err := s.CreateHost(ctx, genHost(0, 1), nil)
	took("create a", a, err)
	b, err := s.CreateHost(ctx, genHost(9, 1), nil)
	took("create b", b, err)
	a, err = s.UpdateHost(ctx, genHost(a.ID, 2), nil)
	took("update a", a, err)
	// The same settings again: a write all the same.
	a, err = s.UpdateHost(ctx, genHost(a.ID, 2), nil)
	took("update a to the same settings", a, err)
	if err := s.DeleteHost(ctx, b.ID, nil); err != nil {
		t.Fatal(err)
	}
	b, err = s.CreateHost(ctx, genHost(9, 1), nil)
	took("create b again under its old id", b, err)
	// A write that apply refuses takes no version for good.
	if _, err := s.UpdateHost(ctx, genHost(a.ID, 3), func(_, _ Stored) error { return errors.New("no") }); err == nil {
		t.Fatal("a refused update succeeded")
	}
	if got, _ := s.GetHost(ctx, a.ID); got.Version != a.Version {
		t.Fatalf("a refused update changed the version from %d to %d", a.Version, got.Version)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	s = bk.open(t, path, nil)
	a, err = s.UpdateHost(ctx, genHost(a.ID, 4), nil)
	took("update a after reopening", a, err)
	c, err := s.CreateHost(ctx, genHost(0, 5), nil)
	took("create c after reopening", c, err)
}
