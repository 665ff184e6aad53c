package streams

import (
	"reflect"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// Every setting survives the trip to storage and back: the two types share
// their JSON form, so a field missing on one side would be lost here.
func TestStoredHostKeepsEverySetting(t *testing.T) {
	s := &spec.Stream{
		ID: 9, Name: "all", Protocol: "tcp+udp", ListenAddress: "::", ListenPort: 53,
		UpstreamHost: "dns.internal", UpstreamPort: 5353, Enabled: false,
		MaxConnections: 7, ConnectionTimeoutSeconds: 3, IdleTimeoutSeconds: 30, HalfClose: true, ProxyProtocolVersion: 2,
		WhitelistCIDRs: []string{"10.0.0.0/8"}, BlacklistCIDRs: []string{"10.0.0.9"},
		SSLEnabled: true, SSLCertID: 4, UploadRateBytes: 1000, DownloadRateBytes: 2000,
		HealthCheckEnabled: true, HealthCheckIntervalSeconds: 15, LogConnections: true, Notes: "n",
	}
	// ssl_cert_tag and ssl_domain exist only in the Caddy config, which the
	// API refuses for stored streams.
	v := reflect.ValueOf(*s)
	for i := range v.NumField() {
		name := v.Type().Field(i).Name
		if v.Field(i).IsZero() && name != "Enabled" && name != "SSLCertTag" && name != "SSLDomain" {
			t.Fatalf("test stream leaves %s at its zero value; set it so the round trip checks it", v.Type().Field(i).Name)
		}
	}
	if back := streamFromHost(hostFromStream(s)); !reflect.DeepEqual(back, s) {
		t.Fatalf("through storage.Host:\n got %+v\nwant %+v", back, s)
	}
}
