package certcheck

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestNormalizeDomains(t *testing.T) {
	long := strings.Repeat("a", 63)
	for _, tc := range []struct {
		in   []string
		want []string
	}{
		{[]string{"example.com"}, []string{"example.com"}},
		{[]string{"Example.COM", "*.Example.com", "localhost"}, []string{"example.com", "*.example.com", "localhost"}},
		{[]string{"xn--bcher-kva.de", "a-b.c0.io", "1.example"}, []string{"xn--bcher-kva.de", "a-b.c0.io", "1.example"}},
		{[]string{"10.0.0.1", "2001:DB8::1", "::ffff:10.0.0.1"}, []string{"10.0.0.1", "2001:db8::1", "::ffff:10.0.0.1"}},
		{[]string{long + "." + long + "." + long + "." + strings.Repeat("b", 61)}, nil}, // 253 characters
		{[]string{"*.localhost"}, nil},
	} {
		got, err := NormalizeDomains(tc.in)
		if err != nil {
			t.Errorf("%q: %v", tc.in, err)
			continue
		}
		want := tc.want
		if want == nil {
			want = tc.in
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%q: got %q, want %q", tc.in, got, want)
		}
		if err := ValidateDomains(tc.in); err != nil {
			t.Errorf("ValidateDomains(%q): %v", tc.in, err)
		}
	}
}

func TestNormalizeDomainsErrors(t *testing.T) {
	long := strings.Repeat("a", 63)
	tooMany := make([]string, MaxDomains+1)
	for i := range tooMany {
		tooMany[i] = fmt.Sprintf("h%d.example.com", i)
	}
	for _, tc := range []struct {
		in   []string
		want string
	}{
		{nil, "domains: at least one domain name is required"},
		{[]string{}, "domains: at least one domain name is required"},
		{tooMany, "domains: 101 names: at most 100 are allowed"},
		{[]string{""}, `domains: "": empty name`},
		{[]string{" example.com"}, `domains: " example.com": has leading or trailing white space`},
		{[]string{"example.com", "EXAMPLE.com"}, `domains: "example.com" is given twice (entries 1 and 2)`},
		{[]string{"10.0.0.1", "a.b", "10.0.0.1"}, `domains: "10.0.0.1" is given twice (entries 1 and 3)`},
		{[]string{"ex ample.com"}, `domains: "ex ample.com": character ' ' is not allowed in a domain name`},
		{[]string{"under_score.com"}, `character '_' is not allowed`},
		{[]string{"a..b"}, "empty label"},
		{[]string{".example.com"}, "empty label"},
		{[]string{"example.com."}, "remove the trailing dot"},
		{[]string{"-a.com"}, `label "-a" begins or ends with a hyphen`},
		{[]string{"a-.com"}, `label "a-" begins or ends with a hyphen`},
		{[]string{long + "a.com"}, "label of 64 characters"},
		{[]string{long + "." + long + "." + long + "." + strings.Repeat("b", 62)}, "254 characters: a domain name has at most 253"},
		{[]string{"*"}, "a wildcard needs a domain after it"},
		{[]string{"a.*.com"}, "a wildcard may only be the leftmost label"},
		{[]string{"*.*.com"}, "a wildcard may only be the leftmost label"},
		{[]string{"*a.com"}, "a wildcard must be a whole label"},
		{[]string{"**.com"}, "a wildcard must be a whole label"},
		{[]string{"example.com:443"}, "without a port"},
		{[]string{"[::1]:443"}, "without a port"},
		{[]string{"https://example.com"}, "without scheme, path or user"},
		{[]string{"example.com/x"}, "without scheme, path or user"},
		{[]string{"bücher.de"}, "xn-- (punycode) form"},
		{[]string{"1.2.3.400"}, "not a valid IP address"},
		{[]string{"1.2.3"}, "not a valid IP address"},
		{[]string{"fe80::1%eth0"}, "an IPv6 zone is not allowed"},
	} {
		_, err := NormalizeDomains(tc.in)
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != FieldDomains {
			t.Errorf("%q: error %v, want a FieldError for domains", tc.in, err)
			continue
		}
		if !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %q lacks %q", tc.in, err, tc.want)
		}
		if ValidateDomains(tc.in) == nil {
			t.Errorf("ValidateDomains(%q) accepted it", tc.in)
		}
	}
}
