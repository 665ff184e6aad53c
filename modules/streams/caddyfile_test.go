package streams

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/caddytest"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

var updateGolden = flag.Bool("update-caddytest", false, "rewrite the expected JSON of testdata/caddyfile_adapt/*.caddytest")

// goldenSeparator splits a .caddytest file into Caddyfile and expected JSON.
const goldenSeparator = "----------"

// readGolden returns the Caddyfile and expected JSON of a .caddytest file.
func readGolden(t testing.TB, path string) (caddyfileText, wantJSON string) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	text := regexp.MustCompile(`\r?\n`).ReplaceAllString(string(data), "\n")
	in, want, found := strings.Cut(text, goldenSeparator)
	if !found && !*updateGolden {
		t.Fatalf("%s: no %q line between the Caddyfile and the JSON", path, goldenSeparator)
	}
	return strings.TrimSpace(in) + "\n", strings.TrimSpace(want)
}

// adapt adapts a Caddyfile to indented JSON, failing on errors and warnings.
func adapt(t testing.TB, name, input string) []byte {
	t.Helper()
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), nil)
	if err != nil {
		t.Fatalf("%s: adapting: %v", name, err)
	}
	for _, w := range warnings {
		t.Errorf("%s:%d: adapt warning: %s: %s", name, w.Line, w.Directive, w.Message)
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// streamsApp decodes the streams app out of an adapted config.
func streamsApp(t testing.TB, config []byte) *App {
	t.Helper()
	var cfg struct {
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(config, &cfg); err != nil {
		t.Fatal(err)
	}
	raw, ok := cfg.Apps["streams"]
	if !ok {
		t.Fatalf("no streams app in %s", config)
	}
	app := new(App)
	if err := json.Unmarshal(raw, app); err != nil {
		t.Fatalf("decoding streams app: %v", err)
	}
	return app
}

func TestCaddyfileAdaptGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/caddyfile_adapt/*.caddytest")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no testdata/caddyfile_adapt/*.caddytest files")
	}
	for _, path := range files {
		name := filepath.Base(path)
		t.Run(strings.TrimSuffix(name, ".caddytest"), func(t *testing.T) {
			in, want := readGolden(t, path)
			got := adapt(t, name, in)
			if *updateGolden {
				out := in + goldenSeparator + "\n" + string(got) + "\n"
				if err := os.WriteFile(path, []byte(out), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if !caddytest.CompareAdapt(t, name, in, "caddyfile", want) {
				t.Errorf("%s: adapted JSON differs from the expected JSON (diff on stdout)", name)
			}
			// Every golden config is meant to be valid.
			if err := streamsApp(t, got).Validate(); err != nil {
				t.Errorf("%s: adapted config does not validate:\n%v", name, err)
			}
		})
	}
}

// standInStreamsAdmin registers a stand-in for the streams_admin directive
// of package admin, which these tests do not import, so that
// Caddyfile.example adapts here. The root package's
// TestCaddyfileExampleAdapts adapts it with the real directive.
var standInStreamsAdmin = sync.OnceFunc(func() {
	httpcaddyfile.RegisterHandlerDirective("streams_admin", func(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
		h.Next()
		for h.NextBlock(0) {
		}
		return caddyhttp.StaticResponse{}, nil
	})
})

func TestCaddyfileExample(t *testing.T) {
	standInStreamsAdmin()
	data, err := os.ReadFile(filepath.Join("..", "..", "Caddyfile.example"))
	if err != nil {
		t.Fatal(err)
	}
	got := adapt(t, "Caddyfile.example", string(data))
	app := streamsApp(t, got)
	if len(app.Hosts) == 0 {
		t.Fatal("Caddyfile.example has no stream host")
	}
	// The ports Provision would reserve for this config.
	app.reserved = []reservedPort{{80, "Caddy's HTTP port"}, {443, "Caddy's HTTPS port"}, {2019, "Caddy's admin endpoint"}}
	if err := app.Validate(); err != nil {
		t.Errorf("Caddyfile.example does not validate:\n%v", err)
	}
	var cfg struct {
		Admin struct {
			Listen string `json:"listen"`
		} `json:"admin"`
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(got, &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Admin.Listen != "localhost:2019" {
		t.Errorf("admin listen = %q, want localhost:2019", cfg.Admin.Listen)
	}
	if _, ok := cfg.Apps["http"]; !ok {
		t.Error("Caddyfile.example serves no HTTP site for the stream's upstream")
	}
}

// TestCaddyfileHostOptionsCoverStream guards against a Stream field that
// the Caddyfile cannot set.
func TestCaddyfileHostOptionsCoverStream(t *testing.T) {
	fields := hostFields(new(spec.Stream))
	typ := reflect.TypeFor[spec.Stream]()
	for i := range typ.NumField() {
		name, _, _ := strings.Cut(typ.Field(i).Tag.Get("json"), ",")
		switch name {
		case "id", "whitelist_cidrs", "blacklist_cidrs", "upstreams", "sni": // host argument; appending options
			continue
		}
		switch p := fields[name].(type) {
		case *string, *int, *int64, *bool, *[]string:
		default:
			t.Errorf("Stream field %s (json %q) has no Caddyfile host option (%T)", typ.Field(i).Name, name, p)
		}
	}
}

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`streams {
		grace_period 2s
		host 4 "my db" {
			listen [2001:db8::1]:5432
			upstream db.internal:5432
			whitelist_cidrs 10.0.0.0/8
			whitelist_cidrs ::1 192.0.2.7
			ssl_enabled false
			health_check_enabled
			max_connections_per_ip 5
			connection_rate_per_ip 10
			connection_rate_window_seconds 30
		}
	}`)
	var app App
	if err := app.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	want := &spec.Stream{
		ID:                          4,
		Name:                        "my db",
		ListenAddress:               "2001:db8::1",
		ListenPort:                  5432,
		UpstreamHost:                "db.internal",
		UpstreamPort:                5432,
		Enabled:                     true,
		WhitelistCIDRs:              []string{"10.0.0.0/8", "::1", "192.0.2.7"},
		HealthCheckEnabled:          true,
		MaxConnectionsPerIP:         5,
		ConnectionRatePerIP:         10,
		ConnectionRateWindowSeconds: 30,
	}
	if len(app.Hosts) != 1 || !reflect.DeepEqual(app.Hosts[0], want) {
		t.Errorf("hosts = %+v, want [%+v]", app.Hosts, want)
	}
	if time.Duration(app.GracePeriod) != 2*time.Second {
		t.Errorf("grace_period = %v, want 2s", app.GracePeriod)
	}
}

// storage postgres and node_name: the DSN is kept as written (a
// placeholder is replaced when the store opens).
func TestUnmarshalCaddyfileCluster(t *testing.T) {
	d := caddyfile.NewTestDispenser(`streams {
		storage postgres {env.AEGIS_PG_DSN}
		storage_key {env.AEGIS_STREAMS_KEY}
		node_name edge-1
	}`)
	var app App
	if err := app.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if app.Storage == nil || app.Storage.Postgres == nil || app.Storage.Postgres.DSN != "{env.AEGIS_PG_DSN}" ||
		app.Storage.Key != "{env.AEGIS_STREAMS_KEY}" || app.NodeName != "edge-1" {
		t.Fatalf("node_name %q, storage %+v", app.NodeName, app.Storage)
	}
	for src, want := range map[string]string{
		"streams {\n node_name a\n node_name b\n}":                     "duplicate option 'node_name'",
		"streams {\n storage postgres\n}":                              "want 'storage sqlite <path>', 'storage postgres <dsn>' or 'storage off'",
		"streams {\n storage postgres x\n storage sqlite /tmp/a.db\n}": "duplicate option 'storage'",
	} {
		var app App
		if err := app.UnmarshalCaddyfile(caddyfile.NewTestDispenser(src)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v; want an error saying %q", src, err, want)
		}
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  []string // substrings of the error
	}{
		{"streams argument", `streams foo`, []string{"streams takes no arguments"}},
		{"unknown streams option", `streams {
			hosts 1
		}`, []string{"unknown option 'hosts'", "want grace_period, storage, storage_key, log_retention, node_name or host"}},
		{"storage driver", `streams {
			storage mysql db:3306
		}`, []string{"storage \"mysql db:3306\"", "want 'storage sqlite <path>', 'storage postgres <dsn>' or 'storage off'"}},
		{"storage twice", `streams {
			storage off
			storage sqlite /tmp/x.db
		}`, []string{"duplicate option 'storage'"}},
		{"log_retention not a number", `streams {
			log_retention many
		}`, []string{"log_retention"}},
		{"unknown host option", `streams {
			host 1 {
				listen_prot 5432
			}
		}`, []string{"host 1", "unknown option 'listen_prot'", "Testfile:3"}},
		{"host without id", `streams {
			host {
				listen 5432
			}
		}`, []string{"host: want <id> [<name>], got 0 arguments"}},
		{"host with three args", `streams {
			host 1 a b
		}`, []string{"got 3 arguments"}},
		{"host id not int", `streams {
			host db {
			}
		}`, []string{`host "db": id is not an integer`}},
		{"duplicate host id", `streams {
			host 2 a {
				listen 1
			}
			host 2 b {
				listen 2
			}
		}`, []string{"host 2: duplicate id", "Testfile:5"}},
		{"bad int", `streams {
			host 1 {
				listen_port 54x
			}
		}`, []string{`host 1: listen_port "54x": not an integer`}},
		{"bad int64", `streams {
			host 1 {
				upload_rate_bytes 1.5
			}
		}`, []string{`upload_rate_bytes "1.5": not an integer`}},
		{"int overflow", `streams {
			host 1 {
				ssl_cert_id 99999999999999999999
			}
		}`, []string{`ssl_cert_id "99999999999999999999": not an integer`}},
		{"missing arg", `streams {
			host 1 {
				upstream_host
			}
		}`, []string{"upstream_host: want one value, got 0"}},
		{"extra arg", `streams {
			host 1 {
				name a b
			}
		}`, []string{"name: want one value, got 2"}},
		{"empty cidrs", `streams {
			host 1 {
				whitelist_cidrs
			}
		}`, []string{"whitelist_cidrs: want one or more CIDRs"}},
		{"bad bool", `streams {
			host 1 {
				enabled yes
			}
		}`, []string{`enabled "yes": want true or false`}},
		{"bool extra args", `streams {
			host 1 {
				log_connections true false
			}
		}`, []string{"log_connections: want true, false or nothing, got 2 values"}},
		{"duplicate option", `streams {
			host 1 {
				max_connections 1
				max_connections 2
			}
		}`, []string{"host 1: duplicate option 'max_connections'"}},
		{"name twice", `streams {
			host 1 a {
				name b
			}
		}`, []string{"option 'name' sets name, already set by 'host'"}},
		{"listen and listen_port", `streams {
			host 1 {
				listen 127.0.0.1:5432
				listen_port 5433
			}
		}`, []string{"option 'listen_port' sets listen_port, already set by 'listen'"}},
		{"upstream without port", `streams {
			host 1 {
				upstream db.internal
			}
		}`, []string{`upstream "db.internal": want <host:port>`}},
		{"upstream bad port", `streams {
			host 1 {
				upstream db.internal:pg
			}
		}`, []string{`port "pg" is not an integer`}},
		{"listen bracket without port", `streams {
			host 1 {
				listen [::1]
			}
		}`, []string{`listen "[::1]": want <address:port> or <port>`}},
		{"listen with network", `streams {
			host 1 {
				listen udp/0.0.0.0:53
			}
		}`, []string{"set tcp or udp with the protocol option"}},
		{"grace period", `streams {
			grace_period soon
		}`, []string{`grace_period "soon": not a duration`}},
		{"grace period twice", `streams {
			grace_period 1s
			grace_period 2s
		}`, []string{"duplicate option 'grace_period'"}},
		{"nested block", `streams {
			host 1 {
				notes {
					x
				}
			}
		}`, []string{"notes: want one value, got 0"}},
		{"block after value", `streams {
			host 1 {
				notes x {
					y
				}
			}
		}`, []string{"option 'notes' takes no block"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var app App
			err := app.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input))
			if err == nil {
				t.Fatalf("no error; hosts: %s", mustJSON(t, app.Hosts))
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestStreamsOptionErrors checks errors through the whole adapter, where
// several `streams` blocks are merged.
func TestStreamsOptionErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		input string
		want  string
	}{
		{"duplicate id across blocks", `{
	streams {
		host 1 {
			listen 1
		}
	}
	streams {
		host 1 {
			listen 2
		}
	}
}
`, "host 1: duplicate id"},
		{"grace_period in two blocks", `{
	streams {
		grace_period 1s
	}
	streams {
		grace_period 2s
	}
}
`, "duplicate option 'grace_period'"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(tc.input), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error = %v, want it to contain %q", err, tc.want)
			}
		})
	}
}

func mustJSON(t testing.TB, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestUnmarshalCaddyfileUpstreams(t *testing.T) {
	d := caddyfile.NewTestDispenser(`streams {
		host 4 {
			listen 5432
			upstream 10.0.0.1:5432 weight 3
			upstream [2001:db8::2]:5432
			upstream db3:6432 backup weight 2
			load_balancing least_connections
			fail_timeout_seconds 30
		}
		host 5 {
			listen 5433
			upstream 10.0.0.9:5432
		}
	}`)
	var app App
	if err := app.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	got := app.Hosts[0]
	want := []spec.Upstream{{Host: "10.0.0.1", Port: 5432, Weight: 3}, {Host: "2001:db8::2", Port: 5432}, {Host: "db3", Port: 6432, Weight: 2, Backup: true}}
	if !reflect.DeepEqual(got.Upstreams, want) || got.UpstreamHost != "10.0.0.1" || got.UpstreamPort != 5432 ||
		got.LoadBalancing != "least_connections" || got.FailTimeoutSeconds != 30 {
		t.Errorf("host 4 = %+v", got)
	}
	if err := got.Validate(); err != nil {
		t.Errorf("Validate() = %v", err)
	}
	// One plain upstream stays upstream_host and upstream_port.
	if one := app.Hosts[1]; one.Upstreams != nil || one.UpstreamHost != "10.0.0.9" {
		t.Errorf("host 5 = %+v, want upstream_host only", one)
	}

	for _, tc := range []struct{ in, want string }{
		{"upstream", "upstream (none): want <host:port> [weight <n>] [backup]"},
		{"upstream 10.0.0.1", `upstream "10.0.0.1": want <host:port>`},
		{"upstream a:1 weight", "a:1: weight: want a number"},
		{"upstream a:1 weight x", `a:1: weight "x": want a whole number from 1 to 100`},
		{"upstream a:1 weight 0", `a:1: weight "0"`},
		{"upstream a:1 backup backup", `a:1: "backup" given twice`},
		{"upstream a:1 heavy", `a:1: unknown "heavy"`},
		{"upstream_host b\n upstream a:1", "option 'upstream' sets upstream_host, already set by 'upstream_host'"},
	} {
		d := caddyfile.NewTestDispenser("streams {\n host 1 {\n listen 1\n " + tc.in + "\n }\n}")
		var app App
		err := app.UnmarshalCaddyfile(d)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %q", tc.in, err, tc.want)
		}
	}
}

func TestUnmarshalCaddyfileListenRange(t *testing.T) {
	for _, tc := range []struct {
		in         string
		addr       string
		port, end  int
		wantErrMsg string
	}{
		{in: "0.0.0.0:30000-30099", addr: "0.0.0.0", port: 30000, end: 30099},
		{in: "30000-30099", port: 30000, end: 30099},
		{in: "[::1]:30000-30001", addr: "::1", port: 30000, end: 30001},
		{in: ":5432", port: 5432},
		{in: "0.0.0.0:30000-", wantErrMsg: `port range "30000-" is not <first>-<last>`},
		{in: "0.0.0.0:a-b", wantErrMsg: `port range "a-b"`},
		{in: "30000--5", wantErrMsg: "port range"},
	} {
		d := caddyfile.NewTestDispenser("streams {\n host 1 {\n listen " + tc.in + "\n upstream a:1\n }\n}")
		var app App
		err := app.UnmarshalCaddyfile(d)
		if tc.wantErrMsg != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErrMsg) {
				t.Errorf("listen %s: error %v, want %q", tc.in, err, tc.wantErrMsg)
			}
			continue
		}
		if err != nil {
			t.Errorf("listen %s: %v", tc.in, err)
			continue
		}
		if h := app.Hosts[0]; h.ListenAddress != tc.addr || h.ListenPort != tc.port || h.ListenPortEnd != tc.end {
			t.Errorf("listen %s: %q %d-%d", tc.in, h.ListenAddress, h.ListenPort, h.ListenPortEnd)
		}
	}
	// listen with a range and listen_port_end: set twice.
	d := caddyfile.NewTestDispenser("streams {\n host 1 {\n listen 1-2\n listen_port_end 3\n }\n}")
	var app App
	if err := app.UnmarshalCaddyfile(d); err == nil || !strings.Contains(err.Error(), "listen_port_end, already set by 'listen'") {
		t.Errorf("listen range and listen_port_end: %v", err)
	}
}

func TestUnmarshalCaddyfileSNI(t *testing.T) {
	d := caddyfile.NewTestDispenser("streams {\n host 1 {\n listen 443\n upstream a:443\n sni db.example.com\n sni *.example.org x.test\n }\n}")
	var app App
	if err := app.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	if got := app.Hosts[0].SNI; !reflect.DeepEqual(got, []string{"db.example.com", "*.example.org", "x.test"}) {
		t.Errorf("sni = %q", got)
	}
	d = caddyfile.NewTestDispenser("streams {\n host 1 {\n sni\n }\n}")
	if err := (&App{}).UnmarshalCaddyfile(d); err == nil || !strings.Contains(err.Error(), "sni: want one or more server names") {
		t.Errorf("sni alone: %v", err)
	}
}
