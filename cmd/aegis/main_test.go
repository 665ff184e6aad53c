package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/pgtest"
	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
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
	if want := `hosts[0], stream 7 ("dns"): unknown field "bogus_field"; the fields are: accept_proxy_protocol, blacklist_cidrs,`; err == nil || !says(out, want) {
		t.Fatalf("aegis validate of a config with an unknown setting: %v, output:\n%s\nwant a failure saying %s", err, out, want)
	}

	cfg = writeConfig(t, dir, port, map[string]any{"whitelist_cidrs": []string{"10.0.0.0/8"}})
	if out, err := runAegis(t, dir, "validate", "--config", cfg); err != nil || !strings.Contains(out, "Valid configuration") {
		t.Fatalf("aegis validate of the config without the typo: %v, output:\n%s", err, out)
	}
}

// seedTLSStream stores, in the database of a config written by
// writeConfig, a certificate sealed with the key file beside it and an
// enabled TLS stream on port that uses it, as uploads through the API
// would.
func seedTLSStream(t *testing.T, dir string, port int) (spec.Certificate, storage.Stored) {
	t.Helper()
	ctx := context.Background()
	db, err := storage.OpenWith(filepath.Join(dir, "streams.db"), storage.OpenOptions{KeyFile: filepath.Join(dir, "streams.key")})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	pair := testenv.Cert(t, testenv.CertOptions{Names: []string{"db.example.com"}})
	c, err := db.CreateCertificate(ctx, spec.Certificate{Name: "db", Source: spec.SourceCustom, Domains: []string{"db.example.com"},
		CertificatePEM: pair.CertPEM}, []byte(pair.KeyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := db.CreateHost(ctx, spec.Stream{Name: "postgres", Protocol: "tcp", ListenAddress: "127.0.0.1", ListenPort: port,
		UpstreamHost: "127.0.0.1", UpstreamPort: 9, Enabled: true, SSLEnabled: true, SSLCertID: c.ID}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return c, h
}

// A lost streams.key: aegis refuses to start, naming the key file, the
// database and the fix, and makes no new key; `aegis streams forget-keys`
// then deletes the key it cannot open, lists the certificate and the
// stream that uses it (now disabled), and aegis starts again.
func TestLostKeyFileAndForgetKeys(t *testing.T) {
	dir := t.TempDir()
	cfg := writeConfig(t, dir, testenv.FreePort(t), nil)
	c, h := seedTLSStream(t, dir, testenv.FreePort(t))
	keyFile, dbFile := filepath.Join(dir, "streams.key"), filepath.Join(dir, "streams.db")
	if out, err := runAegis(t, dir, "validate", "--config", cfg); err != nil {
		t.Fatalf("aegis validate with the key file: %v\n%s", err, out)
	}
	if err := os.Remove(keyFile); err != nil {
		t.Fatal(err)
	}

	out, err := runAegis(t, dir, "run", "--config", cfg)
	if err == nil {
		t.Fatalf("aegis run without its key file started:\n%s", out)
	}
	t.Logf("aegis run without its key file:\n%s", out)
	for _, want := range []string{"key file " + keyFile + " is missing", "the database " + dbFile, "restore", "aegis streams forget-keys --config"} {
		if !says(out, want) {
			t.Errorf("aegis run without its key file does not say %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(keyFile); !os.IsNotExist(err) {
		t.Fatalf("aegis run made a new key file while the database holds sealed keys: %v", err)
	}

	out, err = runAegis(t, dir, "streams", "forget-keys", "--config", cfg)
	if err != nil {
		t.Fatalf("aegis streams forget-keys: %v\n%s", err, out)
	}
	t.Logf("aegis streams forget-keys:\n%s", out)
	for _, want := range []string{
		"Deleted the private keys of 1 certificate(s)",
		fmt.Sprintf(`certificate %d "db" (db.example.com): used by stream %d "postgres" (disabled now`, c.ID, h.ID),
	} {
		if !strings.Contains(out, want) {
			t.Errorf("aegis streams forget-keys does not say %q:\n%s", want, out)
		}
	}
	if _, err := os.Stat(keyFile); err != nil {
		t.Fatalf("no new key file after forget-keys: %v", err)
	}
	if out, err := runAegis(t, dir, "validate", "--config", cfg); err != nil || !strings.Contains(out, "Valid configuration") {
		t.Fatalf("aegis validate after forget-keys: %v\n%s", err, out)
	}
	// Again: nothing more to delete, the certificate still to upload.
	out, err = runAegis(t, dir, "streams", "forget-keys", "--config", cfg)
	if err != nil || !strings.Contains(out, "Deleted the private keys of 0 certificate(s)") ||
		!strings.Contains(out, fmt.Sprintf("certificate %d", c.ID)) || strings.Contains(out, "disabled now") {
		t.Fatalf("aegis streams forget-keys again: %v\n%s", err, out)
	}
}

// `aegis streams export` and `aegis streams import`, run for real: the
// file (mode 0600, no private key in clear) loads into another config's
// fresh storage with a copy of the key; loading it again lists the
// conflicts, fails and changes nothing.
func TestStreamsExportImportCommands(t *testing.T) {
	ctx := context.Background()
	dirA, dirB := t.TempDir(), t.TempDir()
	cfgA := writeConfig(t, dirA, testenv.FreePort(t), nil)
	cfgB := writeConfig(t, dirB, testenv.FreePort(t), nil)
	c, h := seedTLSStream(t, dirA, testenv.FreePort(t))
	file := filepath.Join(dirA, "export.json")

	// No database yet where cfgB points: export says so and makes none.
	out, err := runAegis(t, dirB, "streams", "export", "--config", cfgB)
	if err == nil || !says(out, "there is no streams database at "+filepath.Join(dirB, "streams.db")) {
		t.Fatalf("aegis streams export without a database: %v\n%s", err, out)
	}
	if _, err := os.Stat(filepath.Join(dirB, "streams.db")); !os.IsNotExist(err) {
		t.Fatalf("export made a database: %v", err)
	}

	out, err = runAegis(t, dirA, "streams", "export", "--config", cfgA, "--output", file)
	if err != nil || !strings.Contains(out, "Exported 1 streams and 1 certificates") {
		t.Fatalf("aegis streams export: %v\n%s", err, out)
	}
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(file); fi.Mode().Perm() != 0o600 {
		t.Errorf("export file mode %04o, want 0600", fi.Mode().Perm())
	}
	if strings.Contains(string(b), "PRIVATE KEY") || !strings.Contains(string(b), `"private_key_sealed"`) {
		t.Fatalf("export file:\n%s", b)
	}

	key, err := os.ReadFile(filepath.Join(dirA, "streams.key"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dirB, "streams.key"), key, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err = runAegis(t, dirB, "streams", "import", "--config", cfgB, file)
	if err != nil || !strings.Contains(out, "Imported 1 streams and 1 certificates") {
		t.Fatalf("aegis streams import: %v\n%s", err, out)
	}
	check := func() storage.Stored {
		t.Helper()
		db, err := storage.OpenWith(filepath.Join(dirB, "streams.db"), storage.OpenOptions{KeyFile: filepath.Join(dirB, "streams.key")})
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		hosts, err := db.ListHosts(ctx)
		if err != nil || len(hosts) != 1 || hosts[0].ID != h.ID || hosts[0].SSLCertID != c.ID {
			t.Fatalf("imported hosts: %+v, %v", hosts, err)
		}
		if k, err := db.CertificateKey(ctx, c.ID); err != nil || !strings.Contains(string(k), "PRIVATE KEY") {
			t.Fatalf("imported private key: %v", err)
		}
		return hosts[0]
	}
	before := check()

	out, err = runAegis(t, dirB, "streams", "import", "--config", cfgB, file)
	if err == nil {
		t.Fatalf("aegis streams import of the same file again succeeded:\n%s", out)
	}
	for _, want := range []string{
		fmt.Sprintf(`certificate %d "db": id %d is taken by certificate %d "db" in the storage`, c.ID, c.ID, c.ID),
		fmt.Sprintf(`stream %d ("postgres"): id %d is taken by stream %d ("postgres") in the storage`, h.ID, h.ID, h.ID),
		"2 conflict(s)", "nothing was changed",
	} {
		if !says(out, want) {
			t.Errorf("aegis streams import again does not say %q:\n%s", want, out)
		}
	}
	if after := check(); after.Version != before.Version || !after.UpdatedAt.Equal(before.UpdatedAt) {
		t.Errorf("a refused import changed the stream: %+v, was %+v", after, before)
	}

	// Bad JSON.
	if err := os.WriteFile(file, []byte(`{"format": "aegis-streams-export", `), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := runAegis(t, dirB, "streams", "import", "--config", cfgB, file); err == nil || !says(out, "not an export file") {
		t.Errorf("aegis streams import of bad JSON: %v\n%s", err, out)
	}
}
