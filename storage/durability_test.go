package storage

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// crashChildEnv names the database that TestKillDurabilityChild writes to;
// without it that test skips.
const crashChildEnv = "AEGIS_STORAGE_CRASH_CHILD_DB"

const (
	crashHosts    = 3  // hosts the child updates in turn
	crashLogEvery = 5  // the child appends a log batch every this many generations
	crashLogBatch = 10 // entries per log batch
)

// TestKillDurability runs TestKillDurabilityChild in a child process that
// writes as fast as it can, kills it with SIGKILL mid-write, and checks the
// database it leaves: intact, every row from one transaction, and nothing
// the child saw committed lost.
func TestKillDurability(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a child process")
	}
	path := filepath.Join(t.TempDir(), "aegis.db")
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for id := int64(1); id <= crashHosts; id++ {
		if _, err := s.CreateHost(ctx, genHost(id, 0), nil); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(os.Args[0], "-test.run=^TestKillDurabilityChild$", "-test.v")
	cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}

	// What the child reported committed: per host, the last generation;
	// for the log, the last batch.
	var (
		mu                  sync.Mutex
		hostGens            = map[int64]int{}
		lastGen, lastLogGen int
		firstCommit         = make(chan struct{})
		readDone            = make(chan struct{})
		sawFirst            bool
	)
	go func() {
		defer close(readDone)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var id int64
			var gen int
			mu.Lock()
			if n, _ := fmt.Sscanf(sc.Text(), "committed host %d gen %d", &id, &gen); n == 2 {
				hostGens[id] = gen
				lastGen = gen
				if !sawFirst {
					sawFirst = true
					close(firstCommit)
				}
			} else if n, _ := fmt.Sscanf(sc.Text(), "committed log gen %d", &gen); n == 1 {
				lastLogGen = gen
			}
			mu.Unlock()
		}
	}()

	select {
	case <-firstCommit:
	case <-time.After(20 * time.Second):
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the child committed nothing; its stderr:\n%s", stderr.String())
	}
	time.Sleep(300 * time.Millisecond)
	if err := cmd.Process.Kill(); err != nil { // SIGKILL on Unix
		t.Fatal(err)
	}
	<-readDone
	cmd.Wait()

	mu.Lock()
	defer mu.Unlock()
	t.Logf("killed after generation %d (log batch %d)", lastGen, lastLogGen)
	if lastGen < crashHosts {
		t.Logf("the child got only %d generations done; stderr:\n%s", lastGen, stderr.String())
	}

	s, err = Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var integrity string
	if err := s.read.QueryRow(`PRAGMA integrity_check`).Scan(&integrity); err != nil {
		t.Fatal(err)
	}
	if integrity != "ok" {
		t.Fatalf("integrity_check: %s", integrity)
	}

	hosts, err := s.ListHosts(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts) != crashHosts {
		t.Fatalf("%d hosts, want %d", len(hosts), crashHosts)
	}
	for _, h := range hosts {
		gen, err := hostGen(h)
		if err != nil {
			t.Error(err)
			continue
		}
		if gen < hostGens[h.ID] {
			t.Errorf("host %d at generation %d, but the child committed %d", h.ID, gen, hostGens[h.ID])
		}
		// At most the one write in flight at the kill may be newer than
		// what the child reported.
		if gen > lastGen+1 {
			t.Errorf("host %d at generation %d, beyond the last written %d", h.ID, gen, lastGen)
		}
	}

	// Log batches are whole: each generation has all its entries or none.
	rows, err := s.read.Query(`SELECT json_extract(value, '$[3]'), COUNT(*) FROM conn_log_pages, json_each(entries) GROUP BY 1`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	maxLog := 0
	for rows.Next() {
		var gen, n int
		if err := rows.Scan(&gen, &n); err != nil {
			t.Fatal(err)
		}
		if n != crashLogBatch {
			t.Errorf("log batch %d has %d entries, want %d", gen, n, crashLogBatch)
		}
		maxLog = max(maxLog, gen)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if maxLog < lastLogGen {
		t.Errorf("last log batch stored is %d, but the child committed %d", maxLog, lastLogGen)
	}
}

// TestKillDurabilityChild is the child of TestKillDurability: it updates
// hosts in a tight loop, one transaction per generation, writing the
// generation into every column, and prints what it committed. It stops by
// itself after a while, should nobody kill it.
func TestKillDurabilityChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		t.Skip("run by TestKillDurability")
	}
	s, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ctx := context.Background()
	deadline := time.Now().Add(30 * time.Second)
	for gen := 1; time.Now().Before(deadline); gen++ {
		id := int64(gen%crashHosts + 1)
		if _, err := s.UpdateHost(ctx, genHost(id, gen), nil); err != nil {
			t.Fatal(err)
		}
		fmt.Printf("committed host %d gen %d\n", id, gen)
		if gen%crashLogEvery == 0 {
			batch := make([]ConnLog, crashLogBatch)
			for i := range batch {
				batch[i] = ConnLog{StreamID: id, Action: ActionAllowed, BytesSent: int64(gen)}
			}
			if err := s.AppendConnLogs(ctx, batch); err != nil {
				t.Fatal(err)
			}
			fmt.Printf("committed log gen %d\n", gen)
		}
	}
}
