package admin_test

import (
	"bytes"
	"encoding/json"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// rssBytes reads this process's resident set size.
func rssBytes(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Skip("no /proc/self/status:", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10
		}
	}
	t.Skip("no VmRSS in /proc/self/status")
	return 0
}

// An 800 KB request with 200,000 invalid CIDRs and a 1,000-character name
// once made a 450 MB answer in 12 s and grew the process by 3 GB: every bad
// entry repeated the stream's name twice. Now each list reports its first
// 10 problems and how many more, the message names the stream once, and
// the answer stays under 64 KB (issue 22, item 3).
func TestHugeBadRequestSmallAnswer(t *testing.T) {
	checkNoLeaks(t)
	inst := startCaddy(t, streamsApp(), nil)
	bad := make([]string, 200_000)
	for i := range bad {
		bad[i] = "x"
	}
	body, err := json.Marshal(stream(0, freePort(t), 9, obj{"name": strings.Repeat("n", 1000), "whitelist_cidrs": bad, "blacklist_cidrs": []string{strings.Repeat("y", 5000)}}))
	if err != nil {
		t.Fatal(err)
	}
	if len(body) < 800_000 || len(body) > 1<<20 {
		t.Fatalf("request body of %d bytes, want ~800 KB", len(body))
	}
	before := rssBytes(t)
	start := time.Now()
	r := inst.call("POST", "/api/v1/streams", body, ctJSON)
	took := time.Since(start)
	grew := rssBytes(t) - before
	e := r.apiErr(t, http.StatusBadRequest)
	if len(r.body) >= 64<<10 {
		t.Errorf("answer of %d bytes, want under 64 KB", len(r.body))
	}
	if limit := time.Second; took > limit && !(raceEnabled && took < 10*limit) {
		t.Errorf("answered in %s, want under a second", took)
	}
	if grew > 50<<20 {
		t.Errorf("RSS grew by %d MB, want under 50 MB", grew>>20)
	}
	if n := strings.Count(e.Error, "the new stream"); n != 1 {
		t.Errorf("the message names the stream %d times, want once: %.300s", n, e.Error)
	}
	if !strings.Contains(e.Error, "whitelist_cidrs: … and 199990 more invalid entries (200000 in all)") {
		t.Errorf("message does not count the entries left out: %.2000s", e.Error)
	}
	var cidrs int
	for _, p := range e.Errors {
		if p.Field == "whitelist_cidrs" {
			cidrs++
		}
		if v, ok := p.Value.(string); ok && len(v) > 200 {
			t.Errorf("a value of %d bytes is echoed whole", len(v))
		}
	}
	if cidrs != 11 {
		t.Errorf("%d problems on whitelist_cidrs, want 10 and one that counts the rest", cidrs)
	}
	if bytes.Contains(r.body, []byte(strings.Repeat("y", 200))) || bytes.Contains(r.body, []byte(strings.Repeat("n", 200))) {
		t.Error("a long value or the long name is echoed whole")
	}
	t.Logf("400 of %d bytes in %s; RSS grew by %d KB", len(r.body), took, grew>>10)
}
