package l4aegistls_test

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"testing"

	// The storage and log writer testenv's configs use.
	_ "github.com/caddyserver/caddy/v2/modules/filestorage"
	_ "github.com/caddyserver/caddy/v2/modules/logging"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// In a plain layer4 config, where no streams app registers certificates,
// aegis_tls serves the certificates Caddy's tls app loads with its
// cert_tag.
func TestPlainLayer4WithCertTag(t *testing.T) {
	checkNoLeaks(t)
	up := echoUpstream(t)
	cert := newCert(t, "plain.test")
	other := newCert(t, "plain.test") // loaded too, with another tag
	certPEM := func(der []byte) string {
		return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	}
	keyPEM := func(key any) string {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	}
	port := testenv.FreePort(t)
	c := testenv.New(t)
	err := c.Load(map[string]any{
		"tls": map[string]any{"certificates": map[string]any{"load_pem": []any{
			map[string]any{"certificate": certPEM(other.Certificate[0]), "key": keyPEM(other.PrivateKey), "tags": []string{"other"}},
			map[string]any{"certificate": certPEM(cert.Certificate[0]), "key": keyPEM(cert.PrivateKey), "tags": []string{"db"}},
		}}},
		"layer4": map[string]any{"servers": map[string]any{"db": map[string]any{
			"listen": []string{fmt.Sprintf("127.0.0.1:%d", port)},
			"routes": []any{map[string]any{"handle": []any{
				map[string]any{"handler": "aegis_tls", "cert_tag": "db"},
				map[string]any{"handler": "aegis_proxy", "upstream": up.addr},
			}}},
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	tc, _, err := dialTLS(t, fmt.Sprintf("127.0.0.1:%d", port), "plain.test", roots(cert), nil)
	if err != nil {
		t.Fatalf("TLS handshake: %v", err)
	}
	if got := tc.ConnectionState().PeerCertificates[0]; !got.Equal(cert.Leaf) {
		t.Fatalf("served serial %v, want %v (the certificate tagged db)", got.SerialNumber, cert.Leaf.SerialNumber)
	}
	echoes(t, tc, "through plain layer4")
}
