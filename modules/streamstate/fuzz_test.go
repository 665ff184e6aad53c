package streamstate

import (
	"net/netip"
	"strconv"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// FuzzACL checks NewACL and Allowed against a brute-force reference built
// on the standard library's net package (net.ParseCIDR and
// net.IPNet.Contains, net.ParseIP and net.IP.Equal), which parses and
// matches independently of net/netip.
//
// The inputs are a whitelist and a blacklist, each split at commas and
// white space into at most maxFuzzEntries entries, and a probe address.
// NewACL must refuse the lists exactly when an entry is not a CIDR or an
// address (as both parsers see it, but for a prefix length with a leading
// zero, which only net.ParseCIDR reads), naming the field and the first
// bad entry; otherwise Allowed
// must agree with the reference (a non-empty whitelist allows only its
// matches, then a blacklist match refuses) on the probe, on the first and
// last address of every entry and the addresses just outside it, on the
// IPv4-mapped form of each of those, and on a few fixed addresses.
//
// Seeds are in testdata/fuzz/FuzzACL. To fuzz:
//
//	go test -run '^$' -fuzz '^FuzzACL$' -fuzztime 60s ./modules/streamstate
func FuzzACL(f *testing.F) {
	f.Fuzz(func(t *testing.T, white, black string, probe []byte) {
		wl, bl := splitEntries(white), splitEntries(black)
		acl, err := NewACL(wl, bl)
		if err != nil {
			field, entry := firstRefused(wl, bl)
			if field == "" {
				t.Fatalf("NewACL(%q, %q) = %v, but ParseCIDR takes every entry", wl, bl, err)
			}
			if want := field + " " + strconv.Quote(entry) + ": "; !strings.HasPrefix(err.Error(), want) {
				t.Fatalf("NewACL(%q, %q) = %q, want an error starting %q", wl, bl, err, want)
			}
			if _, ok := testenv.ParseRefEntry(entry); ok && !leadingZeroBits(entry) {
				t.Fatalf("NewACL refuses %s entry %q (%v), which the standard library reads", field, entry, err)
			}
			return
		}
		for _, e := range append(append([]string(nil), wl...), bl...) {
			if _, ok := testenv.ParseRefEntry(e); !ok {
				t.Fatalf("NewACL(%q, %q) takes entry %q, which the standard library refuses", wl, bl, e)
			}
		}

		allow := make([]testenv.RefEntry, len(wl))
		deny := make([]testenv.RefEntry, len(bl))
		var probes []netip.Addr
		for i, e := range wl {
			allow[i], _ = testenv.ParseRefEntry(e)
			probes = append(probes, edges(e)...)
		}
		for i, e := range bl {
			deny[i], _ = testenv.ParseRefEntry(e)
			probes = append(probes, edges(e)...)
		}
		probes = append(probes, testenv.ProbeAddrs...)
		if a, ok := netip.AddrFromSlice(probe); ok {
			probes = append(probes, a)
		}
		for _, a := range probes {
			want := len(allow) == 0 || anyContains(allow, a)
			want = want && !anyContains(deny, a)
			if got := acl.Allowed(a); got != want {
				t.Fatalf("whitelist %q, blacklist %q: Allowed(%v) = %v, want %v", wl, bl, a, got, want)
			}
		}
	})
}

// maxFuzzEntries bounds each list of FuzzACL.
const maxFuzzEntries = 16

// splitEntries splits s at commas and white space.
func splitEntries(s string) []string {
	f := strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
	if len(f) > maxFuzzEntries {
		f = f[:maxFuzzEntries]
	}
	return f
}

// firstRefused is the field and the first entry that ParseCIDR refuses,
// in the order NewACL reads them; "" when it takes them all.
func firstRefused(wl, bl []string) (field, entry string) {
	for _, e := range wl {
		if _, err := ParseCIDR(e); err != nil {
			return "whitelist_cidrs", e
		}
	}
	for _, e := range bl {
		if _, err := ParseCIDR(e); err != nil {
			return "blacklist_cidrs", e
		}
	}
	return "", ""
}

// leadingZeroBits reports whether e is a CIDR whose prefix length has a
// leading zero ("10.0.0.0/08"), which net.ParseCIDR reads and ParseCIDR,
// like net/netip, refuses as ambiguous.
func leadingZeroBits(e string) bool {
	_, bits, ok := strings.Cut(strings.TrimSpace(e), "/")
	return ok && len(bits) > 1 && bits[0] == '0'
}

func anyContains(list []testenv.RefEntry, a netip.Addr) bool {
	for _, e := range list {
		if e.Contains(a) {
			return true
		}
	}
	return false
}

// edges are the first and last address of entry e (as ParseCIDR reads it),
// the addresses just outside, and the IPv4-mapped form of each IPv4 one;
// none when e does not parse.
func edges(e string) []netip.Addr {
	p, err := ParseCIDR(e)
	if err != nil {
		return nil
	}
	return testenv.PrefixEdges(p)
}
