package l4aegisguard

import (
	"reflect"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// Every admission setting the streams app gives the guard comes back in
// the policy its Provision builds: a setting added to streamstate.Limits
// and not mapped both ways fails here.
func TestFromLimitsRoundTrips(t *testing.T) {
	l := streamstate.Limits{
		Name: "db", Whitelist: []string{"10.0.0.0/8"}, Blacklist: []string{"10.0.0.66"},
		MaxConnections: 3, UploadRate: 1000, DownloadRate: 2000,
		MaxConnectionsPerIP: 2, ConnectionRatePerIP: 5, ConnectionRateWindow: 9 * time.Second,
		IdleTimeout: 7 * time.Second, LogConnections: true,
		ProxyAccept: streamstate.ProxyRequired, TrustedProxies: []string{"192.0.2.0/24"},
		ProxyHeaderTimeout: 3 * time.Second,
	}
	v := reflect.ValueOf(l)
	for i := range v.NumField() {
		if v.Field(i).IsZero() {
			t.Fatalf("test Limits leaves %s unset: set every field", v.Type().Field(i).Name)
		}
	}
	if got, err := FromLimits(9, l).limits(); err != nil || !reflect.DeepEqual(got, l) {
		t.Fatalf("FromLimits then limits = %+v, want %+v", got, l)
	}
}
