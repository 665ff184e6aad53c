package streams

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Seeds live in testdata/fuzz/<FuzzName>/; `go test` runs them. To fuzz:
//
//	go test -fuzz=FuzzUnmarshalCaddyfile -fuzztime=30s ./modules/streams

// FuzzUnmarshalCaddyfile: parsing never panics, and a config that parses
// survives a JSON round trip unchanged.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	f.Fuzz(func(t *testing.T, input string) {
		tokens, err := caddyfile.Tokenize([]byte(input), "Fuzzfile")
		if err != nil {
			return
		}
		var app App
		if err := app.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			return
		}
		for _, s := range app.Hosts {
			_ = s.Validate() // must not panic
			_ = s.Warnings()
		}
		_ = app.Validate()

		b, err := json.Marshal(&app)
		if err != nil {
			t.Fatalf("encoding parsed app: %v", err)
		}
		var back App
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("decoding %s: %v", b, err)
		}
		if !reflect.DeepEqual(normalizeApp(&app), normalizeApp(&back)) {
			t.Fatalf("JSON round trip changed the app:\nparsed  %+v\ndecoded %+v\njson    %s", app.Hosts, back.Hosts, b)
		}
	})
}

// normalizeApp returns the app's exported config with empty lists as nil,
// since JSON omits empty lists.
func normalizeApp(a *App) *App {
	out := &App{GracePeriod: a.GracePeriod, Storage: a.Storage}
	for _, s := range a.Hosts {
		out.Hosts = append(out.Hosts, normalizeStream(s))
	}
	return out
}

func normalizeStream(s *Stream) *Stream {
	if s == nil {
		return nil
	}
	c := *s
	if len(c.WhitelistCIDRs) == 0 {
		c.WhitelistCIDRs = nil
	}
	if len(c.BlacklistCIDRs) == 0 {
		c.BlacklistCIDRs = nil
	}
	return &c
}

// FuzzStreamJSON: decoding and validating any JSON never panics, and a
// stream that validates survives re-encoding unchanged.
func FuzzStreamJSON(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		var s Stream
		if err := json.Unmarshal(data, &s); err != nil {
			return
		}
		err := s.Validate()
		_ = s.Warnings()
		_ = (&App{Hosts: []*Stream{&s, &s}}).Validate()
		if err != nil {
			return
		}
		b, err := json.Marshal(&s)
		if err != nil {
			t.Fatalf("encoding a valid stream: %v", err)
		}
		var back Stream
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("decoding %s: %v", b, err)
		}
		if !reflect.DeepEqual(normalizeStream(&s), normalizeStream(&back)) {
			t.Fatalf("JSON round trip changed the stream:\nfirst  %+v\nsecond %+v", s, back)
		}
		if err := back.Validate(); err != nil {
			t.Fatalf("re-decoded stream no longer validates: %v", err)
		}
		// A valid listen address is one the overlap check understands.
		if _, ok := listenAddr(&s); !ok {
			t.Fatalf("valid stream with unusable listen address %q port %d", s.ListenAddress, s.ListenPort)
		}
	})
}

// FuzzParseCIDR: ParseCIDR never panics, and what it returns is a valid,
// masked prefix that parses back to itself.
func FuzzParseCIDR(f *testing.F) {
	f.Fuzz(func(t *testing.T, in string) {
		p, err := ParseCIDR(in)
		if err != nil {
			if p != (netip.Prefix{}) {
				t.Fatalf("ParseCIDR(%q) = %v with error %v, want the zero prefix", in, p, err)
			}
			return
		}
		if !p.IsValid() {
			t.Fatalf("ParseCIDR(%q) = invalid prefix %v", in, p)
		}
		if p != p.Masked() {
			t.Fatalf("ParseCIDR(%q) = %v, not masked", in, p)
		}
		if p.Addr().Zone() != "" {
			t.Fatalf("ParseCIDR(%q) = %v, has a zone", in, p)
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			t.Fatalf("ParseCIDR(%q) = %v, an IPv4-mapped prefix not folded to IPv4", in, p)
		}
		again, err := ParseCIDR(p.String())
		if err != nil || again != p {
			t.Fatalf("ParseCIDR(%q) = %v, but ParseCIDR(%q) = %v, %v", in, p, p.String(), again, err)
		}
	})
}
