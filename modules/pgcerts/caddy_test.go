package pgcerts

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"

	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// servedSerial connects to the HTTPS port as name and returns the serial
// of the certificate served, trying for a while (Caddy obtains
// certificates in the background at start).
func servedSerial(t *testing.T, port int, name string) *big.Int {
	t.Helper()
	var err error
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		var c *tls.Conn
		c, err = tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port), &tls.Config{ServerName: name, InsecureSkipVerify: true})
		if err == nil {
			defer c.Close()
			return c.ConnectionState().PeerCertificates[0].SerialNumber
		}
	}
	t.Fatalf("TLS to %s: %v", name, err)
	return nil
}

// storedSerial loads the certificate Caddy's internal issuer stored for
// name through s and returns its serial.
func storedSerial(t *testing.T, s *Store, name string) *big.Int {
	t.Helper()
	b, err := s.Load(context.Background(), certmagic.StorageKeys.SiteCert("local", name))
	if err != nil {
		t.Fatalf("loading the certificate of %s: %v", name, err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("certificate of %s: no PEM", name)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.SerialNumber
}

// Two storage instances on one database, as two nodes have them: an
// in-process Caddy with `storage aegis_postgres` (its DSN from a
// placeholder) serves, with its internal issuer, the certificate the other
// instance stored before it started, instead of issuing one; and the other
// instance reads the certificate Caddy issued and serves.
func TestCaddySharesCertificates(t *testing.T) {
	dsn := pg.NewDatabase(t)
	t.Setenv("AEGIS_TEST_PG_DSN", dsn)
	ctx := context.Background()
	other := newStore(t, dsn)

	// The other node's certificate for b.test.
	b := testenv.Cert(t, testenv.CertOptions{Names: []string{"b.test"}, Serial: big.NewInt(4242)})
	for key, v := range map[string]string{
		certmagic.StorageKeys.SiteCert("local", "b.test"):       b.CertPEM,
		certmagic.StorageKeys.SitePrivateKey("local", "b.test"): b.KeyPEM,
		certmagic.StorageKeys.SiteMeta("local", "b.test"):       `{"sans": ["b.test"]}`,
	} {
		if err := other.Store(ctx, key, []byte(v)); err != nil {
			t.Fatal(err)
		}
	}

	c := testenv.New(t)
	https := testenv.FreePort(t)
	err := c.LoadCaddyfile(fmt.Sprintf(`{
	admin %s
	http_port %d
	https_port %d
	default_bind 127.0.0.1
	skip_install_trust
	storage aegis_postgres {
		dsn {env.AEGIS_TEST_PG_DSN}
	}
	log {
		output file %s
	}
}

a.test, b.test {
	tls internal
	respond "ok"
}
`, c.AdminAddr, testenv.FreePort(t), https, c.LogFile))
	if err != nil {
		t.Fatal(err)
	}

	if got := servedSerial(t, https, "b.test"); got.Int64() != 4242 {
		t.Errorf("Caddy serves b.test with serial %v, want the other node's 4242", got)
	}
	served := servedSerial(t, https, "a.test")
	if got := storedSerial(t, other, "a.test"); got.Cmp(served) != 0 {
		t.Errorf("the other node reads serial %v for a.test, Caddy serves %v", got, served)
	}
	// Caddy's local CA is in the database too, for every node.
	if !other.Exists(ctx, "pki/authorities/local") {
		t.Error("the internal CA is not in the shared storage")
	}
}

func TestUnmarshalCaddyfile(t *testing.T) {
	for _, tc := range []struct {
		in, dsn, err string
	}{
		{in: "aegis_postgres {\n dsn postgres://h/db\n}", dsn: "postgres://h/db"},
		{in: "aegis_postgres {env.AEGIS_PG_DSN}", dsn: "{env.AEGIS_PG_DSN}"},
		{in: "aegis_postgres", err: "missing dsn"},
		{in: "aegis_postgres {\n dsn\n}", err: "wrong argument count"},
		{in: "aegis_postgres {\n dsn a b\n}", err: "wrong argument count"},
		{in: "aegis_postgres x {\n dsn y\n}", err: "dsn given twice"},
		{in: "aegis_postgres {\n host h\n}", err: "unknown option 'host'"},
	} {
		var s Storage
		err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: %v, want an error saying %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || s.DSN != tc.dsn {
			t.Errorf("%q: dsn %q, %v; want %q", tc.in, s.DSN, err, tc.dsn)
		}
	}
}

// The Caddyfile's storage option adapts to the module's JSON.
func TestCaddyfileAdapts(t *testing.T) {
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte("{\n\tstorage aegis_postgres {\n\t\tdsn {env.AEGIS_PG_DSN}\n\t}\n}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if want := `"storage":{"dsn":"{env.AEGIS_PG_DSN}","module":"aegis_postgres"}`; !strings.Contains(string(out), want) {
		t.Errorf("adapted to %s, want %s in it", out, want)
	}
}

// Provision replaces placeholders and refuses an empty DSN; the store's
// name, which logs and errors show, never holds the password.
func TestProvisionDSN(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	for _, tc := range []struct{ dsn, err string }{
		{"", "dsn: missing"},
		{"{env.AEGIS_TEST_UNSET_DSN}", "AEGIS_TEST_UNSET_DSN"},
		{"postgres://h:5432/db?connect_timeout=x", "dsn: "},
	} {
		s := Storage{DSN: tc.dsn}
		if err := s.Provision(ctx); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("dsn %q: %v, want an error saying %q", tc.dsn, err, tc.err)
		}
	}
	t.Setenv("AEGIS_TEST_SET_DSN", "postgres://aegis:s3cret@db.internal:6543/certs")
	s := Storage{DSN: "{env.AEGIS_TEST_SET_DSN}"}
	if err := s.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	defer s.Cleanup()
	st, err := s.CertMagicStorage()
	if err != nil {
		t.Fatal(err)
	}
	if name := fmt.Sprint(st); name != "aegis_postgres storage, PostgreSQL at db.internal:6543/certs" {
		t.Errorf("store named %q", name)
	}
}
