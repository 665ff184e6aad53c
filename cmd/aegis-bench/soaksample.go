package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"
)

// What the soak measures of the aegis process: goroutines (from Caddy's
// /debug/pprof), open fds and RSS (from /proc), the Go heap (from
// /debug/vars); and what it counts at the end: connection-log rows
// (through the API) and connection lines (in aegis's log file).

// soakSample is one look at the aegis process.
type soakSample struct {
	label      string
	at         time.Duration // since the load started
	goroutines int
	fds        int
	rssKB      int64
	heapAlloc  uint64 // bytes of live and not yet collected objects
	heapInuse  uint64
	numGC      uint32
	// profile is the goroutine profile (debug=1), kept for the idle
	// samples, whose groups are compared when the counts differ.
	profile string
}

// sample looks at the process; with keep, it keeps the goroutine profile.
func (a *soakAegis) sample(label string, at time.Duration, keep bool) (soakSample, error) {
	s := soakSample{label: label, at: at}
	prof, err := a.text("/debug/pprof/goroutine?debug=1")
	if err != nil {
		return s, err
	}
	if s.goroutines, err = goroutineTotal(prof); err != nil {
		return s, err
	}
	if keep {
		s.profile = prof
	}
	if s.fds, err = openFDs(a.pid()); err != nil {
		return s, err
	}
	if s.rssKB, err = rssKB(a.pid()); err != nil {
		return s, err
	}
	var vars struct {
		Memstats struct {
			HeapAlloc, HeapInuse uint64
			NumGC                uint32
		} `json:"memstats"`
	}
	if err := a.call("GET", "/debug/vars", nil, http.StatusOK, &vars); err != nil {
		return s, err
	}
	s.heapAlloc, s.heapInuse, s.numGC = vars.Memstats.HeapAlloc, vars.Memstats.HeapInuse, vars.Memstats.NumGC
	return s, nil
}

// idleSample is a sample of the process at rest: the API client's idle
// connections closed (each holds a goroutine and an fd in aegis), and a
// garbage collection run first, so that the heap is what is live.
func (a *soakAegis) idleSample(label string, at time.Duration) (soakSample, error) {
	a.hc.CloseIdleConnections()
	time.Sleep(time.Second)
	// /debug/pprof/heap?gc=1 runs a collection before it writes the
	// profile.
	if _, err := a.text("/debug/pprof/heap?gc=1"); err != nil {
		return soakSample{}, err
	}
	return a.sample(label, at, true)
}

// text is the body of GET path, which must answer 200.
func (a *soakAegis) text(path string) (string, error) {
	resp, err := a.hc.Get(a.base + path)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET %s: status %d", path, resp.StatusCode)
	}
	return string(b), nil
}

// goroutineTotal reads "goroutine profile: total N" from the first line
// of a debug=1 goroutine profile.
func goroutineTotal(prof string) (int, error) {
	line, _, _ := strings.Cut(prof, "\n")
	rest, ok := strings.CutPrefix(line, "goroutine profile: total ")
	if !ok {
		return 0, fmt.Errorf("goroutine profile starts with %q, want \"goroutine profile: total N\"", line)
	}
	return strconv.Atoi(strings.TrimSpace(rest))
}

// goroutineGroups counts the goroutines of a debug=1 profile by stack:
// the function names of its frames, innermost first.
func goroutineGroups(prof string) map[string]int {
	out := map[string]int{}
	for _, block := range strings.Split(prof, "\n\n") {
		lines := strings.Split(strings.TrimSpace(block), "\n")
		if strings.HasPrefix(lines[0], "goroutine profile:") {
			lines = lines[1:] // the first block starts with the header
		}
		if len(lines) == 0 {
			continue
		}
		n, _, ok := strings.Cut(lines[0], " @ ")
		if !ok {
			continue
		}
		count, err := strconv.Atoi(n)
		if err != nil {
			continue
		}
		var funcs []string
		for _, l := range lines[1:] {
			// "#\t0x4a1b2c\tpkg.Func+0x2c\t/path/file.go:12"
			f := strings.Split(l, "\t")
			if len(f) >= 3 && f[0] == "#" {
				name, _, _ := strings.Cut(f[2], "+0x")
				funcs = append(funcs, name)
			}
		}
		out[strings.Join(funcs, " < ")] += count
	}
	return out
}

// groupGrowth lists the stacks with more goroutines in after than in
// before, most grown first, at most n.
func groupGrowth(before, after string, n int) []string {
	b, a := goroutineGroups(before), goroutineGroups(after)
	type grown struct {
		stack string
		d     int
	}
	var gs []grown
	for stack, k := range a {
		if d := k - b[stack]; d > 0 {
			gs = append(gs, grown{stack, d})
		}
	}
	slices.SortFunc(gs, func(x, y grown) int { return y.d - x.d })
	var out []string
	for i, g := range gs {
		if i == n {
			break
		}
		stack := g.stack
		if len(stack) > 300 {
			stack = stack[:300] + "..."
		}
		out = append(out, fmt.Sprintf("+%d %s", g.d, stack))
	}
	return out
}

// logCount is what a stream's connection log holds.
type logCount struct {
	rows       int64
	sent, rcvd int64            // sums of bytes_sent and bytes_received
	reasons    map[string]int64 // rows by disconnect_reason
	blocked    int64
}

// connLog pages through stream id's connection log (newest first, 1000
// rows a page) and counts it.
func (a *soakAegis) connLog(id int64) (logCount, error) {
	lc := logCount{reasons: map[string]int64{}}
	var before int64
	for {
		q := url.Values{"limit": {"1000"}}
		if before > 0 {
			q.Set("before", strconv.FormatInt(before, 10))
		}
		var page struct {
			Entries []struct {
				ID               int64  `json:"id"`
				BytesSent        int64  `json:"bytes_sent"`
				BytesReceived    int64  `json:"bytes_received"`
				Action           string `json:"action"`
				DisconnectReason string `json:"disconnect_reason"`
			} `json:"entries"`
			NextBefore *int64 `json:"next_before"`
		}
		path := "/api/v1/streams/" + strconv.FormatInt(id, 10) + "/connections?" + q.Encode()
		if err := a.call("GET", path, nil, http.StatusOK, &page); err != nil {
			return lc, err
		}
		for _, e := range page.Entries {
			lc.rows++
			lc.sent += e.BytesSent
			lc.rcvd += e.BytesReceived
			lc.reasons[e.DisconnectReason]++
			if e.Action == "blocked" {
				lc.blocked++
			}
		}
		if page.NextBefore == nil {
			return lc, nil
		}
		if *page.NextBefore >= before && before > 0 {
			return lc, fmt.Errorf("GET %s: next_before %d does not go back", path, *page.NextBefore)
		}
		before = *page.NextBefore
	}
}

// logScan is what aegis's log file holds.
type logScan struct {
	conns   map[int64]int64 // "connection" entries by stream_id
	levels  map[string]int
	trouble []string // the first entries at level warn or above
	lines   int
}

// scanAegisLog reads aegis's JSON log file.
func scanAegisLog(file string) (logScan, error) {
	ls := logScan{conns: map[int64]int64{}, levels: map[string]int{}}
	f, err := os.Open(file)
	if err != nil {
		return ls, err
	}
	defer f.Close()
	return ls, ls.read(f)
}

func (ls *logScan) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		ls.lines++
		var e struct {
			Level    string `json:"level"`
			Msg      string `json:"msg"`
			StreamID int64  `json:"stream_id"`
		}
		if json.Unmarshal(sc.Bytes(), &e) != nil {
			ls.levels["not JSON"]++
			if len(ls.trouble) < 5 {
				ls.trouble = append(ls.trouble, "not JSON: "+strings.TrimSpace(lastLine(sc.Text())))
			}
			continue
		}
		ls.levels[e.Level]++
		if e.Msg == "connection" && e.StreamID > 0 {
			ls.conns[e.StreamID]++
		}
		if d := troubleEntry(sc.Bytes()); d != "" && len(ls.trouble) < 5 {
			ls.trouble = append(ls.trouble, d)
		}
	}
	return sc.Err()
}

// errorLevel counts the entries at level error or above.
func (ls *logScan) errorLevel() int {
	return ls.levels["error"] + ls.levels["dpanic"] + ls.levels["panic"] + ls.levels["fatal"] + ls.levels["not JSON"]
}

// crashed looks for a Go panic or fatal error in the child's output.
func crashed(outFile string) string {
	b, err := os.ReadFile(outFile)
	if err != nil {
		return ""
	}
	for _, marker := range []string{"panic: ", "fatal error: ", "SIGSEGV"} {
		if i := strings.Index(string(b), marker); i >= 0 {
			line, _, _ := strings.Cut(string(b[i:]), "\n")
			return line
		}
	}
	return ""
}

// waitFor polls cond every 500 ms until it is true or timeout passes.
func waitFor(timeout time.Duration, cond func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		ok, err := cond()
		if err == nil && ok {
			return nil
		}
		if time.Now().After(deadline) {
			if err == nil {
				err = errors.New("timed out")
			}
			return err
		}
		time.Sleep(500 * time.Millisecond)
	}
}
