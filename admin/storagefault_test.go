//go:build linux

package admin_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// The storage fault tests break the streams' SQLite database under a
// running config, through the API's writes, and check that:
//
//   - every write answers 503 with an error that says what is wrong, that
//     nothing was changed and what to do;
//   - the engine goes on: an open connection through a stored stream keeps
//     relaying, new connections are served, and the listeners are exactly
//     as before (a failed create binds nothing, a failed update leaves the
//     running stream as it was, a failed delete leaves it running);
//   - nothing is half-written: the API's list and the database's rows are
//     as before the failed writes;
//   - the connection log drops its entries without holding up relays,
//     counts them in log_entries_dropped and logs the failure once;
//   - once the fault is gone, writes succeed again without a restart.
//
// The faults are real ones, made by the kernel, which refuses them to root
// as well: chmod would not do, since root writes to any file whatever its
// mode.

// TestStorageReadOnly makes the database file and its write-ahead log
// immutable (chattr +i: FS_IOC_SETFLAGS with FS_IMMUTABLE_FL, which needs
// CAP_LINUX_IMMUTABLE) while SQLite has them open: the kernel then refuses
// every write to them, through descriptors opened before as well, with
// EPERM, as it does on a file system remounted read-only (EROFS), which
// cannot be done here because a file system with files open for writing
// refuses to be remounted read-only. The -shm file, which SQLite maps in
// memory to coordinate readers and the writer and which holds no data,
// stays writable.
func TestStorageReadOnly(t *testing.T) {
	checkNoLeaks(t)
	up, up2 := newServer(t, echo), newServer(t, upper)
	pA, pB, pNew, pMove := freePort(t), freePort(t), freePort(t), freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	f := newFaultCheck(t, inst)

	a := inst.create(stream(0, pA, up.Port, obj{"name": "a"}))
	b := inst.create(stream(0, pB, up.Port, obj{"name": "b", "log_connections": false}))
	aID, bID := id(a), id(b)
	open := f.before(pA)

	files := []string{inst.dbFile, inst.dbFile + "-wal"}
	for _, p := range files {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("the database's files: %v", err)
		}
	}
	// If the test ends midway, the files are made writable again before
	// Caddy stops (cleanups run last first), so that it can close them.
	t.Cleanup(func() { setImmutable(t, false, files...) })
	setImmutable(t, true, files...)

	// Every kind of write is refused, with the cause and the fix.
	wants := []string{"storage unavailable", "cannot be written", "operation not permitted",
		"nothing was changed", "writable", "try again"}
	f.refused(wants, "POST", "/api/v1/streams", stream(0, pNew, up.Port, obj{"name": "new"}))
	f.refused(wants, "PUT", fmt.Sprintf("/api/v1/streams/%d", bID), stream(0, pMove, up2.Port, obj{"name": "b-moved"}))
	f.refused(wants, "PUT", fmt.Sprintf("/api/v1/streams/%d", aID), stream(0, pA, up2.Port, obj{"name": "a-upper"}))
	f.refused(wants, "DELETE", fmt.Sprintf("/api/v1/streams/%d", bID), nil)

	f.unchanged(open, pA, pB, []int{pNew, pMove})
	f.logDropsOnce(open, aID, pA, "cannot be written")

	// The fault goes away: nothing of the failed writes is in the
	// database, and writes work again without a restart.
	setImmutable(t, false, files...)
	f.rowsUnchanged()
	f.writesWork(open, aID, bID, pA, pNew, pMove, up2.Port)
}

// TestStorageDiskFull runs the database on a small tmpfs (mounting one
// needs CAP_SYS_ADMIN) and fills it with a file, so that SQLite's writes
// to its write-ahead log fail with ENOSPC, which it reports as
// SQLITE_FULL. A write that fits in space SQLite already holds could
// still succeed on a full disk; a fresh database's log has none to spare,
// and the writes below add more than a page: a stream with long notes,
// a certificate upload.
func TestStorageDiskFull(t *testing.T) {
	checkNoLeaks(t)
	dir := mountTmpfs(t, 2<<20) // before Caddy starts: unmounted after it stops
	up, up2 := newServer(t, echo), newServer(t, upper)
	pA, pB, pNew, pMove := freePort(t), freePort(t), freePort(t), freePort(t)
	inst := newInstance(t)
	inst.dbFile = filepath.Join(dir, "streams.db")
	app := streamsApp()
	app["storage"] = obj{"path": inst.dbFile}
	if err := inst.load(app, nil); err != nil {
		t.Fatal(err)
	}
	f := newFaultCheck(t, inst)

	a := inst.create(stream(0, pA, up.Port, obj{"name": "a"}))
	b := inst.create(stream(0, pB, up.Port, obj{"name": "b", "log_connections": false}))
	aID, bID := id(a), id(b)
	open := f.before(pA)

	filler := fillDisk(t, dir)

	notes := strings.Repeat("a long note. ", 750) // 9,750 bytes, within the limit of notes
	wants := []string{"storage unavailable", "is full", "nothing was changed", "free space", "try again"}
	f.refused(wants, "POST", "/api/v1/streams", stream(0, pNew, up.Port, obj{"name": "new", "notes": notes}))
	f.refused(wants, "PUT", fmt.Sprintf("/api/v1/streams/%d", bID), stream(0, pMove, up2.Port, obj{"name": "b-moved", "notes": notes}))
	f.refused(wants, "PUT", fmt.Sprintf("/api/v1/streams/%d", aID), stream(0, pA, up2.Port, obj{"name": "a-upper", "notes": notes}))
	f.refused(wants, "DELETE", fmt.Sprintf("/api/v1/streams/%d", bID), nil)
	leaf := newCA(t).valid(t)
	f.refused(wants, "POST", "/api/v1/certificates", leaf.upload("full"))
	if certs := inst.call("GET", "/api/v1/certificates", nil).want(t, http.StatusOK).list(t); len(certs) != 0 {
		t.Fatalf("after a failed upload, the certificates are %v", certs)
	}

	f.unchanged(open, pA, pB, []int{pNew, pMove})
	f.logDropsOnce(open, aID, pA, "is full")

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	f.rowsUnchanged()
	f.writesWork(open, aID, bID, pA, pNew, pMove, up2.Port)
	inst.call("POST", "/api/v1/certificates", leaf.upload("after")).want(t, http.StatusCreated)
}

// faultCheck is what a fault test knows from before the fault.
type faultCheck struct {
	t    *testing.T
	inst *instance
	list string         // GET /api/v1/streams, without the runtime status
	rows []storage.Host // the database's hosts
}

func newFaultCheck(t *testing.T, inst *instance) *faultCheck {
	return &faultCheck{t: t, inst: inst}
}

// before records the hosts as the API and the database have them, once
// the connection log has written everything so far, and returns a
// connection open through the stream on port.
func (f *faultCheck) before(port int) net.Conn {
	f.t.Helper()
	c := dial(f.t, port)
	if got := roundTrip(f.t, c, "before"); got != "before" {
		f.t.Fatalf("before the fault: %q", got)
	}
	f.list = f.hostList()
	f.rows = f.inst.storedHosts()
	return c
}

// hostList is GET /api/v1/streams as JSON, without each host's status.
func (f *faultCheck) hostList() string {
	f.t.Helper()
	list := f.inst.call("GET", "/api/v1/streams", nil).want(f.t, http.StatusOK).list(f.t)
	for _, h := range list {
		delete(h, "status")
	}
	return norm(list)
}

// refused sends a write and checks it is answered 503 with a JSON error
// saying all of wants.
func (f *faultCheck) refused(wants []string, method, path string, body any) {
	f.t.Helper()
	r := f.inst.call(method, path, body)
	e := r.apiErr(f.t, http.StatusServiceUnavailable)
	f.t.Logf("%s %s: %d %s", method, path, r.code, e.Error)
	for _, w := range wants {
		if !strings.Contains(e.Error, w) {
			f.t.Fatalf("%s %s: error %q does not say %q", method, path, e.Error, w)
		}
	}
}

// unchanged checks that the engine serves as before the fault: the open
// connection relays, new connections reach the streams' old upstreams
// (the echo server, not the upper-case one an update tried to set), the
// ports of failed creates and moves are not bound, and the API lists the
// hosts as before.
func (f *faultCheck) unchanged(open net.Conn, pA, pB int, unbound []int) {
	f.t.Helper()
	if got := roundTrip(f.t, open, "during"); got != "during" {
		f.t.Fatalf("the connection open since before the fault: %q", got)
	}
	if got := roundTrip(f.t, dial(f.t, pA), "new a"); got != "new a" {
		f.t.Fatalf("a new connection to stream a during the fault: %q", got)
	}
	if got := roundTrip(f.t, dial(f.t, pB), "new b"); got != "new b" {
		f.t.Fatalf("a new connection to stream b during the fault: %q", got)
	}
	for _, p := range unbound {
		if !refused(f.t, p) {
			f.t.Fatalf("port %d listens after a failed write", p)
		}
	}
	if got := f.hostList(); got != f.list {
		f.t.Fatalf("the hosts changed during the fault:\nbefore %s\nnow    %s", f.list, got)
	}
}

// logDropsOnce closes connections through stream id (on port), in
// separate connection-log batches that storage cannot write, while a
// connection stays open. It checks that the open connection keeps
// relaying throughout, that the entries are counted in
// log_entries_dropped, and that the failure is logged once, saying cause.
func (f *faultCheck) logDropsOnce(open net.Conn, id int64, port int, cause string) {
	f.t.Helper()
	t := f.t
	path := fmt.Sprintf("/api/v1/streams/%d", id)
	dropped := func() float64 {
		st := f.inst.call("GET", path, nil).want(t, http.StatusOK).obj(t)["status"].(obj)
		n, _ := st["log_entries_dropped"].(float64)
		return n
	}
	start := dropped()
	const conns = 4
	for i := range conns {
		c := dial(t, port)
		msg := fmt.Sprintf("entry %d", i)
		if got := roundTrip(t, c, msg); got != msg {
			t.Fatalf("during the fault: %q", got)
		}
		c.Close()
		if got := roundTrip(t, open, msg); got != msg {
			t.Fatalf("the open connection while entries are dropped: %q", got)
		}
		// Longer than the writer's flush interval, so that each entry
		// goes in a batch of its own.
		time.Sleep(storage.DefaultLogFlushInterval + 100*time.Millisecond)
	}
	eventually(t, fmt.Sprintf("log_entries_dropped to count the %d entries storage could not take (from %v)", conns, start),
		func() bool { return dropped() >= start+conns })

	type errLine struct {
		Level string `json:"level"`
		Msg   string `json:"msg"`
		Error string `json:"error"`
	}
	lines := testenv.LogLines(t, f.inst.logFile, func(l errLine) bool {
		return l.Msg == "writing the connection log to storage"
	})
	if len(lines) != 1 {
		t.Fatalf("the connection log's failure was logged %d times, want once: %+v", len(lines), lines)
	}
	if l := lines[0]; l.Level != "error" || !strings.Contains(l.Error, cause) || !strings.Contains(l.Error, "dropped") {
		t.Fatalf("the connection log's failure was logged as %+v; want an error saying %q and that entries are dropped", l, cause)
	}
}

// rowsUnchanged checks that the database holds the hosts it held before
// the fault, to the millisecond of their updated_at.
func (f *faultCheck) rowsUnchanged() {
	f.t.Helper()
	if got := f.inst.storedHosts(); norm(got) != norm(f.rows) {
		f.t.Fatalf("the database's hosts changed:\nbefore %s\nnow    %s", norm(f.rows), norm(got))
	}
	if got := f.hostList(); got != f.list {
		f.t.Fatalf("the hosts changed:\nbefore %s\nnow    %s", f.list, got)
	}
}

// writesWork checks, after the fault, that the open connection still
// relays and that a create, an update that moves a stream, an update in
// place and a delete all succeed and take effect, and that the connection
// log is written again.
func (f *faultCheck) writesWork(open net.Conn, aID, bID int64, pA, pNew, pMove, upperPort int) {
	f.t.Helper()
	t, inst := f.t, f.inst
	newHost := inst.create(stream(0, pNew, upperPort, obj{"name": "new"}))
	if got := roundTrip(t, dial(t, pNew), "created"); got != "CREATED" {
		t.Fatalf("through the stream created after the fault: %q", got)
	}
	inst.call("PUT", fmt.Sprintf("/api/v1/streams/%d", bID), stream(0, pMove, upperPort, obj{"name": "b-moved"})).want(t, http.StatusOK)
	if got := roundTrip(t, dial(t, pMove), "moved"); got != "MOVED" {
		t.Fatalf("through the stream moved after the fault: %q", got)
	}
	inst.call("PUT", fmt.Sprintf("/api/v1/streams/%d", aID), stream(0, pA, upperPort, obj{"name": "a-upper"})).want(t, http.StatusOK)
	c := dial(t, pA)
	if got := roundTrip(t, c, "updated"); got != "UPDATED" {
		t.Fatalf("through the stream updated after the fault: %q", got)
	}
	c.Close()
	// The connection open since before the fault keeps its upstream.
	if got := roundTrip(t, open, "after"); got != "after" {
		t.Fatalf("the connection open since before the fault, after it: %q", got)
	}
	inst.call("DELETE", fmt.Sprintf("/api/v1/streams/%d", id(newHost)), nil).want(t, http.StatusNoContent)
	if !refused(t, pNew) {
		t.Fatalf("the deleted stream's port %d listens", pNew)
	}
	// That last connection's entry is written: the log works again.
	eventually(t, "the connection log to take entries again", func() bool {
		var page struct {
			Entries []storage.ConnLog `json:"entries"`
		}
		inst.call("GET", fmt.Sprintf("/api/v1/streams/%d/connections", aID), nil).want(t, http.StatusOK).decode(t, &page)
		return slices.ContainsFunc(page.Entries, func(e storage.ConnLog) bool { return e.BytesSent == int64(len("updated")) })
	})
	// Caddy's log says so, and its lines about the outage, as every
	// other, have each key once.
	eventually(t, "the log line saying the connection log is written again", func() bool {
		return len(testenv.LogLines(t, inst.logFile, func(l struct{ Msg string }) bool {
			return l.Msg == "the connection log is written to storage again"
		})) == 1
	})
	testenv.CheckKeysOnce(t, inst.logFile)
}

// ---- faults ------------------------------------------------------------------

// fsImmutableFL is FS_IMMUTABLE_FL of linux/fs.h: no write to the file,
// whoever asks.
const fsImmutableFL = 0x10

// setImmutable sets or clears the immutable flag of files.
func setImmutable(t *testing.T, on bool, files ...string) {
	t.Helper()
	for _, p := range files {
		fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
		if err != nil {
			t.Fatalf("opening %s: %v", p, err)
		}
		flags, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
		if err == nil {
			if on {
				flags |= fsImmutableFL
			} else {
				flags &^= fsImmutableFL
			}
			err = unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, int(flags))
		}
		unix.Close(fd)
		switch {
		case on && (errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENOTTY) || errors.Is(err, unix.EOPNOTSUPP)):
			t.Skipf("cannot make %s immutable (needs CAP_LINUX_IMMUTABLE and a file system with the flag): %v", p, err)
		case err != nil:
			t.Fatalf("setting the immutable flag of %s to %v: %v", p, on, err)
		}
	}
}

// mountTmpfs mounts a tmpfs of size bytes in a temporary directory and
// unmounts it when the test ends, after the cleanups registered later
// (Caddy's stop, which closes the database).
func mountTmpfs(t *testing.T, size int) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "small-disk")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		if errors.Is(err, unix.EPERM) {
			t.Skipf("mounting a tmpfs needs CAP_SYS_ADMIN: %v", err)
		}
		t.Fatalf("mounting a tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, 0); err != nil {
			t.Errorf("unmounting %s: %v (detaching it)", dir, err)
			_ = unix.Unmount(dir, unix.MNT_DETACH)
		}
	})
	return dir
}

// fillDisk writes a file in dir until the file system is full, and
// returns its path.
func fillDisk(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "filler")
	fh, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	for _, chunk := range []int{64 << 10, 4 << 10, 1} {
		buf := bytes.Repeat([]byte{'x'}, chunk)
		for {
			if _, err := fh.Write(buf); err != nil {
				if !errors.Is(err, unix.ENOSPC) {
					t.Fatalf("filling %s: %v", dir, err)
				}
				break
			}
		}
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	if st.Bavail != 0 {
		t.Fatalf("%s still has %d free blocks", dir, st.Bavail)
	}
	return p
}
