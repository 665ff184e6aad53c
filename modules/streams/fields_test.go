package streams_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

func TestConfigRefusesUnknownFields(t *testing.T) {
	good := `{"grace_period": "1s", "storage": {"path": "x.db", "log_retention": 5},
		"hosts": [{"id": 3, "name": "dns", "listen_port": 53, "upstream_host": "h", "upstream_port": 53, "whitelist_cidrs": ["10.0.0.0/8"]}]}`
	var app streams.App
	if err := json.Unmarshal([]byte(good), &app); err != nil {
		t.Fatalf("a config without unknown keys: %v", err)
	}
	if len(app.Hosts) != 1 || app.Hosts[0].WhitelistCIDRs[0] != "10.0.0.0/8" || !app.Hosts[0].Enabled || app.Storage.LogRetention != 5 {
		t.Fatalf("decoded: %+v %+v", app.Hosts[0], app.Storage)
	}

	bad := `{"grace_periods": "1s", "storage": {"pth": "x.db"},
		"hosts": [{"id": 3, "name": "dns", "listen_port": 53, "upstream_host": "h", "upstream_port": 53, "whitelist_cidr": ["10.0.0.0/8"]},
			{"id": 4, "listen_port": 54, "upstream_host": "h", "upstream_port": 53, "bogus_field": true}]}`
	err := json.Unmarshal([]byte(bad), new(streams.App))
	if err == nil {
		t.Fatal("a config with unknown keys decoded without an error")
	}
	for _, want := range []string{
		`unknown field "grace_periods"; did you mean grace_period?`,
		`storage: unknown field "pth"; did you mean path?`,
		`hosts[0], stream 3 ("dns"): unknown field "whitelist_cidr"; did you mean whitelist_cidrs?`,
		`hosts[1], stream 4: unknown field "bogus_field"; the fields are: accept_proxy_protocol, blacklist_cidrs,`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error lacks %q:\n%v", want, err)
		}
	}
}

// POST /load of a config whose host has a misspelt setting is refused
// with the message, and the running config and its streams go on as they
// were.
func TestLoadRefusesUnknownFields(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	port := freePort(t)
	inst := startCaddy(t, hosts(host(1, port, up.Port, map[string]any{"name": "redis"})))
	c := dial(t, port)
	if got := roundTrip(t, c, "before"); got != "before" {
		t.Fatalf("echo before: %q", got)
	}

	getConfig := func() []byte {
		t.Helper()
		resp, err := http.Get("http://" + inst.admin + "/config/")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /config/: %s %v", resp.Status, err)
		}
		return b
	}
	before := getConfig()
	var cfg map[string]any
	if err := json.Unmarshal(before, &cfg); err != nil {
		t.Fatal(err)
	}
	h := cfg["apps"].(map[string]any)["streams"].(map[string]any)["hosts"].([]any)[0].(map[string]any)
	h["whitelist_cidr"] = []string{"10.9.9.9"} // would shut 127.0.0.1 out, were it read
	body, _ := json.Marshal(cfg)
	resp, err := http.Post("http://"+inst.admin+"/load", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := `hosts[0], stream 1 (\"redis\"): unknown field \"whitelist_cidr\"; did you mean whitelist_cidrs?`; resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(msg), want) {
		t.Fatalf("POST /load with a misspelt setting: %s %s, want 400 with %s", resp.Status, msg, want)
	}
	if after := getConfig(); !bytes.Equal(after, before) {
		t.Fatalf("the refused load changed the config:\n%s\nwas\n%s", after, before)
	}
	if got := roundTrip(t, c, "after"); got != "after" {
		t.Fatalf("the open connection after the refused load: %q", got)
	}
	c2 := dial(t, port)
	if got := roundTrip(t, c2, "new"); got != "new" {
		t.Fatalf("a new connection after the refused load: %q", got)
	}
}
