package spec

import (
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestSuggest(t *testing.T) {
	known := slices.Sorted(func(yield func(string) bool) {
		for k := range JSONFields(reflect.TypeFor[Stream]()) {
			if !yield(k) {
				return
			}
		}
	})
	for _, c := range []struct {
		name string
		want []string
	}{
		{"whitelist_cidr", []string{"whitelist_cidrs"}},
		{"Whitelist_CIDRs", []string{"whitelist_cidrs"}},
		{"blacklistCidrs", []string{"blacklist_cidrs"}},
		{"upload-rate-bytes", []string{"upload_rate_bytes"}},
		{"enable", []string{"enabled"}},
		{"nmae", []string{"name"}},
		{"upload_rate", []string{"upload_rate_bytes"}},
		{"listen", []string{"listen_address", "listen_port", "listen_port_end"}},
		{"max_connection", []string{"max_connections"}},
		{"max_connections_per_source", []string{"max_connections_per_ip"}},
		{"bogus_field", nil},
		{"x", nil},
		{"ssl", nil},
	} {
		if got := Suggest(c.name, known); !slices.Equal(got, c.want) {
			t.Errorf("Suggest(%q) = %q, want %q", c.name, got, c.want)
		}
	}
	if got, want := UnknownFields([]string{"whitelist_cidr"}, known), `unknown field "whitelist_cidr"; did you mean whitelist_cidrs?`; got != want {
		t.Errorf("one near miss:\n got %s\nwant %s", got, want)
	}
	if got := UnknownFields([]string{"bogus_field"}, known); !strings.HasPrefix(got, `unknown field "bogus_field"; the fields are: accept_proxy_protocol, blacklist_cidrs, connection_rate_per_ip, connection_rate_window_seconds, connection_timeout_seconds,`) {
		t.Errorf("a field like none: %s", got)
	}
	if got := UnknownFields([]string{"nmae", "bogus"}, known); !strings.HasPrefix(got, `unknown fields "nmae" (did you mean name?), "bogus"; the fields are: accept_proxy_protocol, blacklist_cidrs,`) {
		t.Errorf("two: %s", got)
	}
}

// The app's JSON config refuses a key that is not a setting, in a host
// (naming it), in storage and at the top, every one in one error; a
// config without one decodes as before.
