package testenv

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// Caddy runs Caddy configs in the test process, one at a time, with the
// admin endpoint on a free loopback port, DEBUG logs in a file and the
// streams' storage in the test's temporary directory. The test imports the
// modules its configs use.
type Caddy struct {
	AdminAddr string // the admin endpoint, 127.0.0.1:AdminPort
	AdminPort int
	LogFile   string // where Caddy's logs go, as JSON lines
	DBFile    string // the streams' storage, unless a config sets one
	DataDir   string // Caddy's own storage (certificates, locks)
	// Logs, when set, are the config's logs (logging.logs) instead of
	// one that writes everything at DEBUG to LogFile.
	Logs map[string]any
}

// New prepares a Caddy that runs nothing yet; Caddy is stopped when the
// test ends.
func New(t testing.TB) *Caddy {
	t.Helper()
	dir := t.TempDir()
	c := &Caddy{
		AdminPort: FreePort(t),
		LogFile:   filepath.Join(dir, "caddy.log"),
		DBFile:    filepath.Join(dir, "streams.db"),
		DataDir:   filepath.Join(dir, "caddy"),
	}
	c.AdminAddr = fmt.Sprintf("127.0.0.1:%d", c.AdminPort)
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	return c
}

// Load replaces the running config with one made of apps, as `caddy
// reload` does. A streams app given as a map without "storage" gets
// DBFile as its storage.
func (c *Caddy) Load(apps map[string]any) error {
	apps = maps.Clone(apps)
	if apps == nil {
		apps = map[string]any{}
	}
	if app, ok := apps["streams"].(map[string]any); ok {
		if _, set := app["storage"]; !set {
			app = maps.Clone(app)
			if app == nil {
				app = map[string]any{}
			}
			app["storage"] = map[string]any{"path": c.DBFile}
			apps["streams"] = app
		}
	}
	logs := c.Logs
	if logs == nil {
		logs = map[string]any{"default": map[string]any{
			"level":  "DEBUG",
			"writer": map[string]any{"output": "file", "filename": c.LogFile},
		}}
	}
	b, err := json.Marshal(map[string]any{
		"admin":   map[string]any{"listen": c.AdminAddr},
		"logging": map[string]any{"logs": logs},
		// Caddy's certificates and locks stay in the test's directory.
		"storage": map[string]any{"module": "file_system", "root": c.DataDir},
		"apps":    apps,
	})
	if err != nil {
		return err
	}
	return caddy.Load(b, true)
}

// LoadCaddyfile adapts a whole Caddyfile and loads it in place of the
// running config. The Caddyfile's global options give the admin endpoint,
// the log and the storage: use AdminPort, LogFile and DBFile there.
func (c *Caddy) LoadCaddyfile(src string) error {
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(src), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		return fmt.Errorf("adapting: %w", err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		return fmt.Errorf("loading: %w", err)
	}
	return nil
}

// LogLines decodes the JSON lines of the log file into values of T and
// returns those that keep accepts; lines that do not decode are passed
// over, and a file that does not exist yet has none.
func LogLines[T any](t testing.TB, file string, keep func(T) bool) []T {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		t.Fatal(err)
	}
	defer f.Close()
	var out []T
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var v T
		if json.Unmarshal(sc.Bytes(), &v) == nil && keep(v) {
			out = append(out, v)
		}
	}
	return out
}

// CheckKeysOnce fails the test for each JSON line of the log file that has
// a key more than once in one object (see RepeatedKeys), and returns the
// number of JSON lines it read.
func CheckKeysOnce(t testing.TB, file string) int {
	t.Helper()
	n := 0
	LogLines(t, file, func(line json.RawMessage) bool {
		t.Helper()
		n++
		if keys, err := RepeatedKeys(line); err != nil || len(keys) > 0 {
			t.Errorf("log line with keys %q more than once (%v): %s", keys, err, line)
		}
		return false
	})
	return n
}

// RepeatedKeys returns the keys that appear more than once in one object
// of the JSON value line, at any depth, in the order met; an error if line
// is not JSON. encoding/json would keep the last of such keys silently,
// and log pipelines (Loki, Elasticsearch, jq) break on them or keep either.
func RepeatedKeys(line []byte) ([]string, error) {
	type level struct {
		keys    map[string]bool // nil for an array
		wantKey bool            // in an object, the next token is a key
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.UseNumber()
	var repeated []string
	var stack []*level
	// valueDone marks the end of a value in the enclosing object, whose
	// next token is then a key.
	valueDone := func() {
		if n := len(stack); n > 0 && stack[n-1].keys != nil {
			stack[n-1].wantKey = true
		}
	}
	for {
		tok, err := dec.Token()
		if err == io.EOF {
			if len(stack) != 0 {
				return nil, io.ErrUnexpectedEOF
			}
			return repeated, nil
		}
		if err != nil {
			return nil, err
		}
		top := (*level)(nil)
		if n := len(stack); n > 0 {
			top = stack[n-1]
		}
		if top != nil && top.keys != nil && top.wantKey {
			if d, ok := tok.(json.Delim); ok && d == '}' {
				stack = stack[:len(stack)-1]
				valueDone()
				continue
			}
			k := tok.(string) // the decoder allows nothing else here
			if top.keys[k] {
				repeated = append(repeated, k)
			}
			top.keys[k] = true
			top.wantKey = false
			continue
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &level{keys: map[string]bool{}, wantKey: true})
		case json.Delim('['):
			stack = append(stack, &level{})
		case json.Delim(']'):
			stack = stack[:len(stack)-1]
			valueDone()
		default:
			valueDone()
		}
	}
}
