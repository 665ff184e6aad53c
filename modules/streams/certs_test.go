package streams_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"sync"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// Reading the certificates of an app while a reload cleans it up is no
// data race (run with -race).
func TestCertificatesDuringCleanup(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	inst := startCaddy(t, hosts(host(1, freePort(t), up.Port, nil)))
	old := streams.Running()
	ctx := context.Background()
	// Each reader goes on until it sees the storage gone: it reads the
	// app's storage after Cleanup let go of it. Certificate asks for an
	// id that does not exist, so that nothing else orders its reads after
	// Cleanup's write.
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			if _, err := old.Certificate(ctx, 999); errors.Is(err, spec.ErrNoStorage) {
				return
			}
		}
	})
	wg.Go(func() {
		for {
			if _, err := old.Certificates(ctx); errors.Is(err, spec.ErrNoStorage) {
				return
			}
		}
	})
	// The reload cleans the old app up: its storage goes.
	if err := inst.load(hosts(host(1, freePort(t), up.Port, nil))); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
}

// A reload that reads another database and then fails to start leaves
// every handshake of the running config as it was: the certificates the
// new config loaded never reach the running streams.
func TestFailedReloadKeepsCertificates(t *testing.T) {
	checkNoLeaks(t)
	up := newUpstream(t, echo)
	ctx := context.Background()
	ca := newTestCA(t)
	c := testenv.New(t)
	inst := &testCaddy{t: t, caddy: c, admin: c.AdminAddr, logFile: c.LogFile, dbFile: c.DBFile}
	otherDB := filepath.Join(t.TempDir(), "other.db")
	cfgPort, portA, portB := freePort(t), freePort(t), freePort(t)
	withDB := func(path string, extra ...map[string]any) map[string]any {
		app := hosts(append([]map[string]any{host(1, cfgPort, up.Port, nil)}, extra...)...)
		app["storage"] = map[string]any{"path": path}
		return app
	}
	tlsStream := func(port int, chain, key string) {
		t.Helper()
		cert, err := streams.CreateCertificate(ctx, spec.CertInput{Name: "db", Certificate: chain, PrivateKey: key})
		if err != nil {
			t.Fatal(err)
		}
		s := apiStream(2, port, up.Port)
		s.SSLEnabled, s.SSLCertID = true, cert.ID
		if _, err := streams.CreateHost(ctx, s); err != nil {
			t.Fatal(err)
		}
	}

	// The other database: certificate 1 (serial 200) on stream 2.
	if err := inst.load(withDB(otherDB)); err != nil {
		t.Fatal(err)
	}
	chain, key := ca.leaf(t, "db.test", 200)
	tlsStream(portB, chain, key)
	if _, serial := tlsDial(t, ca, portB, "db.test"); serial != 200 {
		t.Fatalf("other database: serial %d, want 200", serial)
	}
	// The running one: certificate 1 (serial 100) on stream 2.
	if err := inst.load(withDB(c.DBFile)); err != nil {
		t.Fatal(err)
	}
	chain, key = ca.leaf(t, "db.test", 100)
	tlsStream(portA, chain, key)
	if _, serial := tlsDial(t, ca, portA, "db.test"); serial != 100 {
		t.Fatalf("serial %d, want 100", serial)
	}

	held, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	heldPort := held.Addr().(*net.TCPAddr).Port
	failing := map[string]map[string]any{
		// The streams app fails to start: a stream's port is taken.
		"a stream's port taken": {"streams": withDB(otherDB, host(3, heldPort, up.Port, nil))},
		// Another app fails to start, before or after the streams app
		// (Caddy starts them in any order).
		"the http app's port taken": {
			"streams": withDB(otherDB),
			"http": map[string]any{"servers": map[string]any{"s": map[string]any{
				"listen": []string{fmt.Sprintf("127.0.0.1:%d", heldPort)},
			}}},
		},
	}
	for what, apps := range failing {
		for range 3 {
			if err := inst.caddy.Load(apps); err == nil {
				t.Fatalf("%s: the reload started", what)
			}
			if _, serial := tlsDial(t, ca, portA, "db.test"); serial != 100 {
				t.Fatalf("after a failed reload (%s): serial %d, want 100", what, serial)
			}
		}
	}
}
