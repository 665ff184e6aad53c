package main

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/pgtest"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// asAegis makes this test binary run main instead of its tests, so that
// the tests can run aegis as a subprocess without building it.
const asAegis = "AEGIS_TEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(asAegis) == "1" {
		main()
		os.Exit(0)
	}
	pgtest.Main(m, &pg)
}

// runAegis runs aegis with args in dir, with Caddy's home directories
// there too, for at most a minute, and returns its output and exit error.
// The binary is $AEGIS_BIN (make test sets it to bin/aegis), or else this
// test binary acting as aegis.
func runAegis(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	bin := os.Getenv("AEGIS_BIN")
	if bin == "" {
		bin = os.Args[0]
	}
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), asAegis+"=1", "HOME="+dir,
		"XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("aegis %s: still running after a minute; output:\n%s", strings.Join(args, " "), out)
	}
	return string(out), err
}

// says reports whether aegis's output has msg, as text or in a JSON log
// line.
func says(out, msg string) bool {
	quoted, _ := json.Marshal(msg)
	return strings.Contains(out, msg) || strings.Contains(out, strings.Trim(string(quoted), `"`))
}

// writeConfig writes a JSON config with one stream host on port, plus
// extra settings, and its own database, and returns its path.
func writeConfig(t *testing.T, dir string, port int, extra map[string]any) string {
	t.Helper()
	h := map[string]any{"id": 7, "name": "dns", "listen_address": "127.0.0.1", "listen_port": port,
		"upstream_host": "127.0.0.1", "upstream_port": 9}
	for k, v := range extra {
		h[k] = v
	}
	b, err := json.Marshal(map[string]any{
		"admin": map[string]any{"disabled": true},
		"apps": map[string]any{"streams": map[string]any{
			"hosts":   []any{h},
			"storage": map[string]any{"path": filepath.Join(dir, "streams.db")},
		}},
	})
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "config.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// A misspelt host setting in a JSON config: `aegis validate` and `aegis
// run` refuse it, naming the host, the key and the setting meant, and run
// listens on nothing. Without the typo the same config is valid.
func TestUnknownHostSettingRefused(t *testing.T) {
	dir := t.TempDir()
	port := testenv.FreePort(t)
	want := `hosts[0], stream 7 ("dns"): unknown field "whitelist_cidr"; did you mean whitelist_cidrs?`

	cfg := writeConfig(t, dir, port, map[string]any{"whitelist_cidr": []string{"10.0.0.0/8"}})
	out, err := runAegis(t, dir, "validate", "--config", cfg)
	if err == nil || !says(out, want) {
		t.Fatalf("aegis validate of a config with a misspelt setting: %v, output:\n%s\nwant a failure saying %s", err, out, want)
	}
	out, err = runAegis(t, dir, "run", "--config", cfg)
	if err == nil || !says(out, want) {
		t.Fatalf("aegis run of a config with a misspelt setting: %v, output:\n%s\nwant a failure saying %s", err, out, want)
	}
	if !testenv.Refused(t, port) {
		t.Fatalf("port %d is open after a refused aegis run", port)
	}

	cfg = writeConfig(t, dir, port, map[string]any{"bogus_field": true})
	out, err = runAegis(t, dir, "validate", "--config", cfg)
	if want := `hosts[0], stream 7 ("dns"): unknown field "bogus_field"; the fields are: blacklist_cidrs,`; err == nil || !says(out, want) {
		t.Fatalf("aegis validate of a config with an unknown setting: %v, output:\n%s\nwant a failure saying %s", err, out, want)
	}

	cfg = writeConfig(t, dir, port, map[string]any{"whitelist_cidrs": []string{"10.0.0.0/8"}})
	if out, err := runAegis(t, dir, "validate", "--config", cfg); err != nil || !strings.Contains(out, "Valid configuration") {
		t.Fatalf("aegis validate of the config without the typo: %v, output:\n%s", err, out)
	}
}
