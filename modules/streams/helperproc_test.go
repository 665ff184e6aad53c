package streams_test

// A helper process is this test binary run again with helperEnv set: it
// holds sockets that would not fit in this process's open-file limit next
// to the proxy's (clients, upstream servers), or stands for an upstream
// process that a test kills. It reads commands on stdin, answers on stdout
// one line each, and exits when stdin closes.

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// helperEnv names the helper's mode in its environment.
const helperEnv = "AEGIS_STREAMS_TEST_HELPER"

// helperLifetime bounds a helper's life, whatever its test does.
const helperLifetime = 3 * time.Minute

// TestHelperProcess is not a test: it is the body of helper processes.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		t.Skip("the body of helper processes that other tests start")
	}
	time.AfterFunc(helperLifetime, func() {
		fmt.Fprintf(os.Stderr, "helper %s: still running after %s; exiting\n", mode, helperLifetime)
		os.Exit(3)
	})
	var err error
	switch mode {
	case "echo":
		err = helperEcho()
	case "flood":
		err = helperFlood()
	case "rlimit":
		err = helperLowerLimitAndExec()
	case "rlimit-report":
		var lim syscall.Rlimit
		if err = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil {
			fmt.Printf("nofile %d %d\n", lim.Cur, lim.Max)
		}
	default:
		err = fmt.Errorf("unknown helper mode %q", mode)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "helper %s: %v\n", mode, err)
		os.Exit(2)
	}
	os.Exit(0)
}

// echoServer listens on a loopback port and echoes every connection, and
// prints "port <n>".
func echoServer() error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go echoConn(c)
		}
	}()
	fmt.Printf("port %d\n", ln.Addr().(*net.TCPAddr).Port)
	return nil
}

// echoConn echoes c until it ends. Not io.Copy, which splices between
// TCP connections through a pipe that it holds while it waits: four file
// descriptors per idle connection instead of one.
func echoConn(c net.Conn) {
	defer c.Close()
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// helperEcho is an upstream echo server until stdin closes (or the test
// kills it).
func helperEcho() error {
	if err := echoServer(); err != nil {
		return err
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// helperFlood is an upstream echo server and the clients of a flood.
// Commands:
//
//	open <host:port> <n>  opens n connections, each echoing 8 bytes:
//	                      "opened <ok> <failed> <ms> <fds> <first error>"
//	echo                  round trip on every open connection again:
//	                      "echoed <ok> <failed> <ms> <first error>"
//	close                 closes them: "closed <ms>"
func helperFlood() error {
	if err := echoServer(); err != nil {
		return err
	}
	var conns []net.Conn
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		start := time.Now()
		switch f[0] {
		case "open":
			n, _ := strconv.Atoi(f[2])
			conns = make([]net.Conn, n)
			ok, failed, first := forEach(n, func(i int) error {
				c, err := net.DialTimeout("tcp", f[1], 10*time.Second)
				if err != nil {
					return err
				}
				conns[i] = c
				return roundTrip8(c, i)
			})
			fds, _ := os.ReadDir("/proc/self/fd")
			fmt.Printf("opened %d %d %d %d %q\n", ok, failed, time.Since(start).Milliseconds(), len(fds), first)
		case "echo":
			ok, failed, first := forEach(len(conns), func(i int) error {
				if conns[i] == nil {
					return fmt.Errorf("connection %d was never opened", i)
				}
				return roundTrip8(conns[i], i)
			})
			fmt.Printf("echoed %d %d %d %q\n", ok, failed, time.Since(start).Milliseconds(), first)
		case "close":
			for _, c := range conns {
				if c != nil {
					c.Close()
				}
			}
			conns = nil
			fmt.Printf("closed %d\n", time.Since(start).Milliseconds())
		default:
			return fmt.Errorf("unknown command %q", sc.Text())
		}
	}
	return sc.Err()
}

// forEach runs f for 0..n-1 on 64 goroutines and counts the outcomes.
func forEach(n int, f func(i int) error) (ok, failed int64, first string) {
	var (
		next, nok, nfail atomic.Int64
		firstErr         atomic.Value
		wg               sync.WaitGroup
	)
	for range 64 {
		wg.Go(func() {
			for i := int(next.Add(1) - 1); i < n; i = int(next.Add(1) - 1) {
				if err := f(i); err != nil {
					nfail.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("#%d: %v", i, err))
				} else {
					nok.Add(1)
				}
			}
		})
	}
	wg.Wait()
	first, _ = firstErr.Load().(string)
	return nok.Load(), nfail.Load(), first
}

func roundTrip8(c net.Conn, i int) error {
	msg := fmt.Sprintf("%07d\n", i)
	got, err := testenv.TryRoundTrip(c, msg)
	if err == nil && got != msg {
		err = fmt.Errorf("echo %q, want %q", got, msg)
	}
	return err
}

// helperLowerLimitAndExec lowers its soft open-file limit to 1024 and
// replaces itself with the test binary in mode rlimit-report, which
// reports the limit that the Go runtime left it with.
func helperLowerLimitAndExec() error {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	lim.Cur = min(1024, lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return err
	}
	env := []string{helperEnv + "=rlimit-report"}
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	return syscall.Exec(os.Args[0], os.Args, env)
}

// helperProc is a running helper process, stopped when the test ends.
type helperProc struct {
	t      *testing.T
	cmd    *exec.Cmd
	stdin  io.WriteCloser
	lines  chan string
	stderr lockedBuffer
	waited bool
}

// lockedBuffer is the helper's stderr, written by exec's copying goroutine.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// startHelper runs the test binary again as a helper in mode.
func startHelper(t *testing.T, mode string) *helperProc {
	t.Helper()
	h := &helperProc{t: t, lines: make(chan string, 16)}
	h.cmd = exec.Command(os.Args[0], "-test.run=^TestHelperProcess$", "-test.count=1")
	h.cmd.Env = append(os.Environ(), helperEnv+"="+mode)
	h.cmd.Stderr = &h.stderr
	var err error
	if h.stdin, err = h.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := h.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		defer close(h.lines)
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			h.lines <- sc.Text()
		}
	}()
	t.Cleanup(h.stop)
	return h
}

// send writes one command line.
func (h *helperProc) send(format string, args ...any) {
	h.t.Helper()
	if _, err := fmt.Fprintf(h.stdin, format+"\n", args...); err != nil {
		h.t.Fatalf("helper: sending a command: %v; its stderr:\n%s", err, h.stderr.String())
	}
}

// expect waits up to within for a line whose first word is word and
// returns the others.
func (h *helperProc) expect(word string, within time.Duration) []string {
	h.t.Helper()
	timeout := time.After(within)
	for {
		select {
		case line, ok := <-h.lines:
			if !ok {
				h.t.Fatalf("helper: exited before %q; its stderr:\n%s", word, h.stderr.String())
			}
			if f := strings.Fields(line); len(f) > 0 && f[0] == word {
				return f[1:]
			}
			h.t.Logf("helper: %s", line)
		case <-timeout:
			h.t.Fatalf("helper: no %q within %s; its stderr:\n%s", word, within, h.stderr.String())
		}
	}
}

// intAfter waits for a line "<word> <n>" and returns n.
func (h *helperProc) intAfter(word string, within time.Duration) int {
	h.t.Helper()
	f := h.expect(word, within)
	n, err := strconv.Atoi(f[0])
	if err != nil {
		h.t.Fatalf("helper: %s %v: %v", word, f, err)
	}
	return n
}

// kill ends the helper at once (SIGKILL) and waits for it: the kernel has
// closed its sockets when kill returns.
func (h *helperProc) kill() {
	h.t.Helper()
	_ = h.cmd.Process.Kill()
	h.wait()
}

// stop closes the helper's stdin, gives it 10 seconds to exit, kills it
// otherwise, and fails the test if it reported a data race.
func (h *helperProc) stop() {
	h.stdin.Close()
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		for range h.lines {
		}
	}()
	select {
	case <-exited:
	case <-time.After(10 * time.Second):
		h.t.Errorf("helper: still running 10s after its stdin closed; killing it")
		_ = h.cmd.Process.Kill()
		<-exited
	}
	h.wait()
	if s := h.stderr.String(); strings.Contains(s, "DATA RACE") || strings.Contains(s, "panic:") {
		h.t.Errorf("helper failed:\n%s", s)
	}
}

// wait reaps the helper once its stdout is drained.
func (h *helperProc) wait() {
	if h.waited {
		return
	}
	for range h.lines {
	}
	h.waited = true
	_ = h.cmd.Wait()
}
