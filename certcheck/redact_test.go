package certcheck

import (
	"strings"
	"testing"
)

func TestRedact(t *testing.T) {
	key := "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5owkIDvnbhFeKoAoGCCqGSM49\nAwEHoUQDQgAEfake\n-----END EC PRIVATE KEY-----\n"
	for _, tc := range []struct{ in, want string }{
		{"db.internal", "db.internal"},
		{"xn--bcher-kva.example", "xn--bcher-kva.example"},
		{strings.Repeat("a", 63) + ".example", strings.Repeat("a", 63) + ".example"},
		{"stream 3: listen_port 70000: must be 1-65535", "stream 3: listen_port 70000: must be 1-65535"},
		{"domains: " + key + " is bad", "domains: " + Redacted + "\n is bad"},
		{"x " + key[:40], "x " + Redacted},
		{`"MHcCAQEEIBkg4LVWM9nuwNSk3yByxZpYRTBnVJk5owkIDvnbhFeKoAoGCCqGSM49": bad`, `"` + Redacted + `": bad`},
	} {
		if got := Redact(tc.in); got != tc.want {
			t.Errorf("Redact(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
