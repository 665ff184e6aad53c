package streams

import (
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// Seeds live in testdata/fuzz/<FuzzName>/; `go test` runs them. To fuzz:
//
//	go test -run '^$' -fuzz '^FuzzUnmarshalCaddyfile$' -fuzztime 60s ./modules/streams
//
// or `make fuzz` for every target.

// streamJSONFields are the JSON names of Stream's settings.
var streamJSONFields = func() map[string]bool {
	out := map[string]bool{}
	t := reflect.TypeFor[Stream]()
	for i := 0; i < t.NumField(); i++ {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		out[name] = true
	}
	return out
}()

// checkValidationError fails unless every problem in err (from
// App.Validate or Stream.Validate) names what is wrong: a *FieldError for
// a known setting whose message shows the field, its value and a reason,
// or one of the app's own settings.
func checkValidationError(t *testing.T, err error) {
	t.Helper()
	for _, leaf := range flattenErrors(err) {
		var fe *FieldError
		if !errors.As(leaf, &fe) {
			msg := leaf.Error()
			if !strings.HasPrefix(msg, "grace_period ") && !strings.HasPrefix(msg, "storage log_retention ") &&
				!strings.HasPrefix(msg, "hosts[") {
				t.Fatalf("validation error %q (%T) names no setting", msg, leaf)
			}
			continue
		}
		if !streamJSONFields[fe.Field] {
			t.Fatalf("validation error %q is about %q, not a stream setting", fe, fe.Field)
		}
		if fe.Value == "" {
			// No value: a required setting left out, or a name or notes
			// too long to repeat.
			missing := strings.HasPrefix(fe.Reason, "required; ") && (fe.Field == "listen_port" || fe.Field == "upstream_host" || fe.Field == "upstream_port")
			long := strings.Contains(fe.Reason, "characters, more than the limit of") && (fe.Field == "name" || fe.Field == "notes")
			if msg := fe.Error(); !missing && !long || !strings.HasPrefix(msg, "stream ") || !strings.Contains(msg, ": "+fe.Field+": ") {
				t.Fatalf("validation error %q has no value, but is not about a missing setting or a long text: %#v", fe, fe)
			}
			continue
		}
		if fe.Reason == "" {
			t.Fatalf("validation error %q lacks the reason: %#v", fe, fe)
		}
		if msg := fe.Error(); !strings.HasPrefix(msg, "stream ") || !strings.Contains(msg, ": "+fe.Field+" "+fe.Value) {
			t.Fatalf("validation error %q does not show the stream, the field %q and the value %s", msg, fe.Field, fe.Value)
		}
	}
}

// FuzzUnmarshalCaddyfile: parsing never panics; a refusal says where (the
// file and line); a config that parses has unique host ids, and either
// fails validation with errors that name the setting or is valid; either
// way it survives a JSON round trip (what Caddy does with it) unchanged,
// with the same validation outcome.
func FuzzUnmarshalCaddyfile(f *testing.F) {
	f.Fuzz(func(t *testing.T, input string) {
		tokens, err := caddyfile.Tokenize([]byte(input), "Fuzzfile")
		if err != nil || len(tokens) == 0 {
			return // Caddy hands the option at least its name
		}
		var app App
		if err := app.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			msg := err.Error()
			i := strings.LastIndex(msg, ", at Fuzzfile:")
			if i < 0 {
				t.Fatalf("error %q does not say where in the Caddyfile", msg)
			}
			line, _, _ := strings.Cut(msg[i+len(", at Fuzzfile:"):], " ")
			if n, err := strconv.Atoi(line); err != nil || n < 1 {
				t.Fatalf("error %q names no line", msg)
			}
			return
		}
		ids := map[int64]bool{}
		for _, s := range app.Hosts {
			if s == nil {
				t.Fatal("a nil host")
			}
			if ids[s.ID] {
				t.Fatalf("host id %d parsed twice", s.ID)
			}
			ids[s.ID] = true
			if err := s.Validate(); err != nil {
				checkValidationError(t, err)
			}
			_ = s.Warnings()
		}
		verr := app.Validate()
		if verr != nil {
			checkValidationError(t, verr)
		}

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
		if berr := back.Validate(); errString(berr) != errString(verr) {
			t.Fatalf("validation changed over the JSON round trip:\nparsed  %v\ndecoded %v", verr, berr)
		}
	})
}

func errString(err error) string {
	if err == nil {
		return ""
	}
	return err.Error()
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

// FuzzStreamJSON: decoding and validating any JSON never panics; a refusal
// names the setting; and a stream that validates is stable: decode →
// validate → encode → decode gives the same stream, encoding it again gives
// the same bytes, its stored form (storage.Host) converts back to it (less
// ssl_cert_tag and ssl_domain, which only the Caddy config sets), its
// lists build an ACL, and its addresses are ones the listeners and the
// overlap check understand.
func FuzzStreamJSON(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		var s Stream
		if err := json.Unmarshal(data, &s); err != nil {
			return
		}
		err := s.Validate()
		_ = s.Warnings()
		if aerr := (&App{Hosts: []*Stream{&s, &s}}).Validate(); aerr == nil {
			t.Fatal("two hosts with one id validate together")
		} else {
			checkValidationError(t, aerr)
		}
		if err != nil {
			checkValidationError(t, err)
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
		if b2, _ := json.Marshal(&back); string(b2) != string(b) {
			t.Fatalf("encoding is not stable:\nfirst  %s\nsecond %s", b, b2)
		}
		// Storage keeps every setting but the config-only ones (the API
		// refuses those).
		apiForm := *normalizeStream(&s)
		apiForm.SSLCertTag, apiForm.SSLDomain = "", ""
		if stored := streamFromHost(hostFromStream(&s)); !reflect.DeepEqual(normalizeStream(stored), &apiForm) {
			t.Fatalf("the stored form changed the stream:\nstream %+v\nstored %+v", s, *stored)
		}
		if _, err := streamstate.NewACL(s.WhitelistCIDRs, s.BlacklistCIDRs); err != nil {
			t.Fatalf("valid stream's lists do not build an ACL: %v", err)
		}
		// A valid listen address is one the overlap check understands,
		// and one net.Listen takes apart as the stream's.
		if _, ok := listenAddr(&s); !ok {
			t.Fatalf("valid stream with unusable listen address %q port %d", s.ListenAddress, s.ListenPort)
		}
		host, port, err := net.SplitHostPort(s.ListenHostPort())
		if err != nil || host != s.ListenAddress || port != strconv.Itoa(s.ListenPort) {
			t.Fatalf("listen %q splits into %q %q (%v)", s.ListenHostPort(), host, port, err)
		}
		host, port, err = net.SplitHostPort(s.UpstreamHostPort())
		if err != nil || host != s.UpstreamHost || port != strconv.Itoa(s.UpstreamPort) {
			t.Fatalf("upstream %q splits into %q %q (%v)", s.UpstreamHostPort(), host, port, err)
		}
		if !s.HasTCP() && !s.HasUDP() {
			t.Fatalf("valid stream with protocol %q has no listener", s.Protocol)
		}
	})
}

// FuzzParseCIDR: ParseCIDR never panics; what it returns is a valid,
// masked prefix without a zone that parses back to itself (normalizing is
// idempotent); what it accepts, the standard library's older parser
// (net.ParseCIDR, net.ParseIP) accepts too; and as a whitelist or
// blacklist entry it matches exactly the addresses net.IPNet.Contains
// (or net.IP.Equal for a bare address) matches: the fuzzed probe, the
// prefix's first and last address and their neighbours, each also as an
// IPv4-mapped IPv6 address, and a few fixed ones.
func FuzzParseCIDR(f *testing.F) {
	f.Fuzz(func(t *testing.T, in string, probe []byte) {
		p, err := ParseCIDR(in)
		if err != nil {
			if p != (netip.Prefix{}) {
				t.Fatalf("ParseCIDR(%q) = %v with error %v, want the zero prefix", in, p, err)
			}
			if _, err := streamstate.NewACL([]string{in}, nil); err == nil {
				t.Fatalf("ParseCIDR(%q) refuses it (%v) but NewACL takes it", in, err)
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

		ref, ok := testenv.ParseRefEntry(in)
		if !ok {
			t.Fatalf("ParseCIDR(%q) = %v, but the standard library refuses it", in, p)
		}
		allow, err := streamstate.NewACL([]string{in}, nil)
		if err != nil {
			t.Fatalf("NewACL(whitelist %q): %v", in, err)
		}
		deny, err := streamstate.NewACL(nil, []string{in})
		if err != nil {
			t.Fatalf("NewACL(blacklist %q): %v", in, err)
		}
		probes := append(testenv.PrefixEdges(p), testenv.ProbeAddrs...)
		if a, ok := netip.AddrFromSlice(probe); ok {
			probes = append(probes, a.WithZone(""))
		}
		for _, a := range probes {
			want := ref.Contains(a)
			if got := p.Contains(a.Unmap()); got != want {
				t.Fatalf("%q (as %v) contains %v: %v; net.IPNet says %v", in, p, a, got, want)
			}
			if got := allow.Allowed(a); got != want {
				t.Fatalf("whitelist [%q] allows %v: %v, want %v", in, a, got, want)
			}
			if got := deny.Allowed(a); got == want {
				t.Fatalf("blacklist [%q] allows %v: %v, want %v", in, a, got, !want)
			}
		}
	})
}
