// Package testenv holds what the tests of several packages of this project
// share: test ports, a goroutine leak check, a Caddy run in the test
// process, and small socket and polling helpers. Only _test files import
// it.
package testenv

import (
	"net"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// Test ports come from below the kernel's ephemeral range (32768-60999 by
// default), so that an outgoing connection never takes one between the
// moment a test picks it and the moment it is bound, and none is handed
// out twice in a run. Each test process starts at its own place in the
// range, set by its process id, so that the test processes of packages
// running side by side rarely meet.
const (
	firstPort      = 20000
	ephemeralStart = 32768
	portSpan       = ephemeralStart - firstPort
)

var (
	portStart = os.Getpid() * 7919 % portSpan // consecutive ids land far apart
	portsUsed atomic.Int32                    // ports handed out or passed over
)

// FreePort returns a port that is free for TCP and UDP on 127.0.0.1 and
// ::1 and that no other test of this process was given.
func FreePort(t testing.TB) int {
	t.Helper()
	for {
		n := int(portsUsed.Add(1))
		if n > portSpan {
			t.Fatal("ran out of test ports below the ephemeral range")
		}
		if p := firstPort + (portStart+n)%portSpan; portFree(p) {
			return p
		}
	}
}

func portFree(p int) bool {
	for _, host := range []string{"127.0.0.1", "::1"} {
		addr := net.JoinHostPort(host, strconv.Itoa(p))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return false
		}
		ln.Close()
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return false
		}
		pc.Close()
	}
	return true
}

// ownCode matches a stack frame of this project's non-test code.
var ownCode = regexp.MustCompile(`caddy-aegis/(modules/(streamstate|l4aegis[a-z]+|streams|udpnat)\.|admin\.|storage\.)`)

// CheckNoLeaks fails the test if a goroutine running this project's code
// is still alive, 5 seconds at the most after the test is over. Call it
// first, so that its check runs after the cleanups registered later
// (Caddy's stop, test servers).
func CheckNoLeaks(t testing.TB) {
	t.Helper()
	t.Cleanup(func() {
		var leaked string
		if !Within(5*time.Second, func() bool { leaked = ownGoroutines(); return leaked == "" }) {
			t.Errorf("goroutines still running after the test:\n%s", leaked)
		}
	})
}

// ownGoroutines returns the stacks of goroutines that run this project's
// code, other than the caller's.
func ownGoroutines() string {
	buf := make([]byte, 4<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out []string
	for i, g := range strings.Split(string(buf), "\n\n") {
		if i > 0 && ownCode.MatchString(g) {
			out = append(out, g)
		}
	}
	return strings.Join(out, "\n\n")
}

// Repeat runs fn over and over on n goroutines, a client loop each, until
// the stop it returns is called; stop returns once every loop has ended.
func Repeat(n int, fn func()) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for {
				select {
				case <-done:
					return
				default:
				}
				fn()
			}
		})
	}
	return func() {
		close(done)
		wg.Wait()
	}
}

// Within polls cond every 20ms until it holds or d has passed, and reports
// whether it held.
func Within(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// Eventually fails the test unless cond holds within 10 seconds.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	if !Within(10*time.Second, cond) {
		t.Fatalf("waited 10s for %s", what)
	}
}

// OneErrorContains reports whether one of the errors joined in err contains
// every substring of want.
func OneErrorContains(err error, want []string) bool {
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = j.Unwrap()
	}
	for _, e := range errs {
		all := true
		for _, w := range want {
			all = all && strings.Contains(e.Error(), w)
		}
		if all {
			return true
		}
	}
	return false
}
