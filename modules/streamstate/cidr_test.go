package streamstate

import (
	"strings"
	"testing"
)

func TestParseCIDR(t *testing.T) {
	for _, tc := range []struct {
		in, want, err string
	}{
		{in: "10.0.0.0/8", want: "10.0.0.0/8"},
		{in: "10.1.2.3/8", want: "10.0.0.0/8"},
		{in: "192.0.2.7", want: "192.0.2.7/32"},
		{in: " 192.0.2.7 ", want: "192.0.2.7/32"},
		{in: "2001:db8::1", want: "2001:db8::1/128"},
		{in: "2001:db8::/32", want: "2001:db8::/32"},
		{in: "::ffff:192.0.2.7", want: "192.0.2.7/32"},
		{in: "::ffff:10.0.0.0/104", want: "10.0.0.0/8"},
		{in: "", err: "empty"},
		{in: "10.0.0.300/8", err: "not a CIDR"},
		{in: "example.com", err: "not an IP address"},
		{in: "fe80::1%eth0", err: "zone"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			p, err := ParseCIDR(tc.in)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("ParseCIDR(%q): err %v, want one saying %q", tc.in, err, tc.err)
				}
				return
			}
			if err != nil || p.String() != tc.want {
				t.Fatalf("ParseCIDR(%q) = %v, %v; want %s", tc.in, p, err, tc.want)
			}
		})
	}
}
