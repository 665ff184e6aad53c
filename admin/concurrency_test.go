package admin_test

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// TestConcurrentWriters runs eight API clients at once, each creating,
// updating and deleting streams of its own, and all of them racing for
// one id and for one port. Every call gets a clean answer, and the final
// state is what the answers said.
func TestConcurrentWriters(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := startCaddy(t, streamsApp(), nil)
	const writers = 8
	const updates = 4
	ports := make([]int, writers)
	racePorts := make([]int, writers)
	for i := range ports {
		ports[i], racePorts[i] = freePort(t), freePort(t)
	}
	sharedPort := freePort(t)

	type outcome struct {
		lastName    string
		deleted     bool
		wonID       bool // created stream 500
		wonPort     bool // created stream 600+i on the shared port
		unexpected  []string
		wonIDPort   int
		wonPortID   int64
		wonPortName string
	}
	results := make([]outcome, writers)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range writers {
		wg.Go(func() {
			<-start
			res := &results[i]
			// check reports whether r is a success; an answer with
			// another code than those given, or an error without a JSON
			// error body, is unexpected.
			check := func(r response, codes ...int) bool {
				for _, c := range codes {
					if r.code != c {
						continue
					}
					if c >= 400 {
						var e errBody
						if json.Unmarshal(r.body, &e) != nil || e.Error == "" {
							break
						}
					}
					return c < 400
				}
				res.unexpected = append(res.unexpected, r.String())
				return false
			}
			myID := int64(100 + i)
			path := fmt.Sprintf("/api/v1/streams/%d", myID)
			check(inst.try("POST", "/api/v1/streams", stream(myID, ports[i], up.Port, obj{"name": "w0"})), 201)
			for u := 1; u <= updates; u++ {
				name := fmt.Sprintf("w%d-%d", i, u)
				if check(inst.try("PUT", path, stream(myID, ports[i], up.Port, obj{"name": name, "max_connections": u})), 200) {
					res.lastName = name
				}
			}
			// Everyone wants id 500 (on a port of its own): one gets it.
			res.wonID = check(inst.try("POST", "/api/v1/streams", stream(500, racePorts[i], up.Port, nil)), 201, 409)
			if res.wonID {
				res.wonIDPort = racePorts[i]
			}
			// Everyone wants the shared port (with an id of its own): one
			// gets it, the others hear that it overlaps.
			pid := int64(600 + i)
			res.wonPort = check(inst.try("POST", "/api/v1/streams", stream(pid, sharedPort, up.Port, obj{"name": fmt.Sprintf("shared-%d", i)})), 201, 400)
			if res.wonPort {
				res.wonPortID, res.wonPortName = pid, fmt.Sprintf("shared-%d", i)
			}
			if i%2 == 0 {
				res.deleted = check(inst.try("DELETE", path, nil), 204)
			}
		})
	}
	close(start)
	wg.Wait()

	wantIDs := map[int64]string{}
	var idWinners, portWinners int
	for i, res := range results {
		for _, u := range res.unexpected {
			t.Errorf("writer %d: unexpected answer: %s", i, u)
		}
		if !res.deleted {
			wantIDs[int64(100+i)] = res.lastName
		}
		if res.wonID {
			idWinners++
			wantIDs[500] = fmt.Sprintf("s-%d", res.wonIDPort)
		}
		if res.wonPort {
			portWinners++
			wantIDs[res.wonPortID] = res.wonPortName
		}
	}
	if idWinners != 1 || portWinners != 1 {
		t.Fatalf("%d writers created id 500 and %d the shared port; want 1 each", idWinners, portWinners)
	}

	// The API, the database and the listeners agree with the answers.
	gotIDs := map[int64]string{}
	for _, h := range inst.call("GET", "/api/v1/streams", nil).want(t, 200).list(t) {
		gotIDs[id(h)] = h["name"].(string)
		if h["status"].(obj)["listening"] != true {
			t.Errorf("stream %d does not listen: %v", id(h), h)
		}
	}
	if norm(gotIDs) != norm(wantIDs) {
		t.Fatalf("streams listed: %v, want %v", gotIDs, wantIDs)
	}
	storedIDs := map[int64]string{}
	for _, h := range inst.storedHosts() {
		storedIDs[h.ID] = h.Name
	}
	if norm(storedIDs) != norm(wantIDs) {
		t.Fatalf("streams stored: %v, want %v", storedIDs, wantIDs)
	}
	for i := range writers {
		if results[i].deleted != refused(t, ports[i]) {
			t.Errorf("writer %d: deleted %v, but port %d refused %v", i, results[i].deleted, ports[i], !results[i].deleted)
		}
	}
	if got := roundTrip(t, dial(t, sharedPort), "shared"); got != "shared" {
		t.Errorf("the shared port: %q", got)
	}
}

// TestUpdatesRefuseNothing: while a client connects in a tight loop, 50
// updates change a stream's name, limits and timeouts. No connection
// attempt fails, a connection opened before them keeps working, and new
// connections get the new settings.
func TestUpdatesRefuseNothing(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, obj{"log_connections": false})))
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	before := dial(t, port)
	if got := roundTrip(t, before, "before"); got != "before" {
		t.Fatalf("first connection: %q", got)
	}

	var attempts, failures atomic.Int64
	var failMu sync.Mutex
	var firstFailures []string
	stop := testenv.Repeat(1, func() {
		attempts.Add(1)
		err := func() error {
			c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 5*time.Second)
			if err != nil {
				return err
			}
			defer c.Close()
			got, err := tryRoundTrip(c, "x")
			if err == nil && got != "x" {
				err = fmt.Errorf("echo %q", got)
			}
			return err
		}()
		if err != nil {
			failures.Add(1)
			failMu.Lock()
			if len(firstFailures) < 5 {
				firstFailures = append(firstFailures, err.Error())
			}
			failMu.Unlock()
		}
	})

	const updates = 50
	for i := 1; i <= updates; i++ {
		s := stream(0, port, up.Port, obj{
			"name":                       fmt.Sprintf("upd-%d", i),
			"max_connections":            100 + i,
			"idle_timeout_seconds":       300 + i,
			"connection_timeout_seconds": 1 + i%5,
			"notes":                      fmt.Sprintf("update %d", i),
			"log_connections":            i%2 == 0,
		})
		inst.call("PUT", path, s).want(t, http.StatusOK)
	}
	// Let the loop run a moment on the last settings too.
	for n := attempts.Load(); attempts.Load() < n+10; {
		time.Sleep(5 * time.Millisecond)
	}
	stop()
	if n := failures.Load(); n != 0 {
		t.Fatalf("%d of %d connection attempts failed during the updates, e.g. %v", n, attempts.Load(), firstFailures)
	}
	if attempts.Load() < updates {
		t.Fatalf("only %d connection attempts during %d updates", attempts.Load(), updates)
	}
	t.Logf("%d connection attempts during %d updates, none failed", attempts.Load(), updates)

	got := inst.call("GET", path, nil).want(t, 200).obj(t)
	if got["name"] != fmt.Sprintf("upd-%d", updates) || norm(got["max_connections"]) != norm(100+updates) {
		t.Fatalf("after the updates: %v", got)
	}

	// One more update, a blacklist: a new connection is refused, the one
	// opened before every update goes on.
	inst.call("PUT", path, stream(0, port, up.Port, obj{"name": "closed", "blacklist_cidrs": []string{"127.0.0.1"}})).want(t, http.StatusOK)
	expectClosed(t, dial(t, port), 5*time.Second)
	if got := roundTrip(t, before, "after"); got != "after" {
		t.Fatalf("the connection opened before the updates: %q", got)
	}
	st := inst.call("GET", path, nil).want(t, 200).obj(t)["status"].(obj)
	if st["blocked_connections"] != 1.0 || st["listening"] != true {
		t.Fatalf("status: %v", st)
	}
}

// Listing a stream's open connections while it is edited in place reads
// its config as the edit swaps it: go test -race finds a race if the list
// reads it without the app's lock.
func TestActiveConnectionsDuringEdits(t *testing.T) {
	up := newServer(t, echo)
	port := freePort(t)
	inst := startCaddy(t, streamsApp(), nil)
	sid := id(inst.create(stream(0, port, up.Port, nil)))
	p := fmt.Sprintf("/api/v1/streams/%d", sid)
	c := dial(t, port)
	_ = roundTrip(t, c, "x")
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 30 {
			inst.try("PATCH", p, fmt.Sprintf(`{"notes": "n%d"}`, i), ctMergePatch)
		}
	}()
	for range 60 {
		inst.call("GET", p+"/active", nil).want(t, 200)
	}
	<-done
}
