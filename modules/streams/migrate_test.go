package streams_test

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// openStore opens the SQLite file at path as the app would, with the key
// file beside it, closed when the test ends.
func openStore(t *testing.T, path string) (*storage.SQLite, []byte) {
	t.Helper()
	db, key, err := streams.OpenStore(&streams.StorageConfig{Path: path})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db.(*storage.SQLite), key
}

// exportJSON exports db as `aegis streams export` does and returns the
// file's bytes.
func exportJSON(t *testing.T, db storage.Store, key []byte) []byte {
	t.Helper()
	f, err := streams.ExportStore(context.Background(), db, key, "test")
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// sameStores compares the streams and certificates (with their keys) of
// two stores, but for the times the store sets on each write.
func sameStores(t *testing.T, a, b storage.Store) {
	t.Helper()
	ctx := context.Background()
	ha, err1 := a.ListHosts(ctx)
	hb, err2 := b.ListHosts(ctx)
	if err1 != nil || err2 != nil || len(ha) != len(hb) {
		t.Fatalf("hosts: %d, %v and %d, %v", len(ha), err1, len(hb), err2)
	}
	for i := range ha {
		if !reflect.DeepEqual(ha[i].Stream, hb[i].Stream) {
			t.Errorf("stream %d: %+v, imported %+v", ha[i].ID, ha[i].Stream, hb[i].Stream)
		}
	}
	ca, err1 := a.ListCertificates(ctx)
	cb, err2 := b.ListCertificates(ctx)
	if err1 != nil || err2 != nil || len(ca) != len(cb) {
		t.Fatalf("certificates: %d, %v and %d, %v", len(ca), err1, len(cb), err2)
	}
	for i := range ca {
		x, y := ca[i], cb[i]
		x.CreatedAt, x.UpdatedAt, y.CreatedAt, y.UpdatedAt = jsontime.Time{}, jsontime.Time{}, jsontime.Time{}, jsontime.Time{}
		if !reflect.DeepEqual(x, y) {
			t.Errorf("certificate %d: %+v, imported %+v", x.ID, x, y)
		}
		if x.Source != spec.SourceCustom {
			continue
		}
		ka, err1 := a.CertificateKey(ctx, x.ID)
		kb, err2 := b.CertificateKey(ctx, x.ID)
		if err1 != nil || err2 != nil || !bytes.Equal(ka, kb) {
			t.Errorf("certificate %d: private keys differ: %v, %v", x.ID, err1, err2)
		}
	}
}

// Export from one SQLite store and import into a fresh one with the same
// key: the same streams and certificates, and the imported TLS stream
// terminates with the imported certificate. The file holds no private key
// in clear. Importing it again, into a store with another key, or beside
// streams on its ports, lists every conflict and changes nothing.
func TestExportImport(t *testing.T) {
	checkNoLeaks(t)
	ctx := context.Background()
	up := newUpstream(t, echo)
	port := freePort(t)
	ca := newTestCA(t)
	chain, keyPEM := ca.leaf(t, "db.test", 100)

	dirA, dirB := t.TempDir(), t.TempDir()
	pathA, pathB := filepath.Join(dirA, "streams.db"), filepath.Join(dirB, "streams.db")
	a, keyA := openStore(t, pathA)
	cert, err := a.CreateCertificate(ctx, spec.Certificate{Name: "db", Source: spec.SourceCustom, Domains: []string{"db.test"},
		CertificatePEM: chain}, []byte(keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	tlsStream := apiStream(4, port, up.Port)
	tlsStream.SSLEnabled, tlsStream.SSLCertID = true, cert.ID
	tlsStream.WhitelistCIDRs = []string{"127.0.0.0/8"}
	off := apiStream(9, freePort(t), up.Port)
	off.Protocol, off.Enabled, off.Notes = spec.ProtocolUDP, false, "kept while off"
	for _, s := range []spec.Stream{tlsStream, off} {
		if _, err := a.CreateHost(ctx, s, nil); err != nil {
			t.Fatal(err)
		}
	}

	file := exportJSON(t, a, keyA)
	if bytes.Contains(file, []byte("PRIVATE KEY")) || bytes.Contains(file, []byte(strings.Split(keyPEM, "\n")[1])) {
		t.Fatalf("the export file holds the private key in clear:\n%s", file)
	}
	if !bytes.Contains(file, []byte(`"private_key_sealed"`)) {
		t.Fatalf("the export file has no sealed key:\n%s", file)
	}

	// The same key in the new place, as a copy of streams.key.
	keyFile, err := os.ReadFile(filepath.Join(dirA, "streams.key"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dirB, "streams.key"), keyFile, 0o600); err != nil {
		t.Fatal(err)
	}
	b, keyB := openStore(t, pathB)
	f, err := streams.DecodeExport(file)
	if err != nil {
		t.Fatal(err)
	}
	if c, err := streams.ImportConflicts(ctx, b, keyB, "key file", nil, f); err != nil || len(c) != 0 {
		t.Fatalf("conflicts importing into a fresh store: %q, %v", c, err)
	}
	if err := streams.ImportStore(ctx, b, keyB, f); err != nil {
		t.Fatal(err)
	}
	sameStores(t, a, b)

	// Again: every id is taken.
	c, err := streams.ImportConflicts(ctx, b, keyB, "key file", nil, f)
	want := []string{
		`certificate 1 "db": id 1 is taken by certificate 1 "db" in the storage`,
		`stream 4 ("api-4"): id 4 is taken by stream 4 ("api-4") in the storage`,
		`stream 9 ("api-9"): id 9 is taken by stream 9 ("api-9") in the storage`,
	}
	if err != nil || !reflect.DeepEqual(c, want) {
		t.Errorf("conflicts importing twice:\n%q\nwant\n%q", c, want)
	}
	// The config's own streams count too, and their ports.
	cfgStream := apiStream(20, port, up.Port)
	fresh, _ := openStore(t, filepath.Join(dirB, "other.db"))
	c, err = streams.ImportConflicts(ctx, fresh, keyB, "key file", []*spec.Stream{&cfgStream, {ID: 9, Name: "cfg"}}, f)
	if err != nil || len(c) != 2 || !strings.Contains(c[0], `stream 4 ("api-4"): listen_port `) || !strings.Contains(c[0], "overlaps stream 20") ||
		c[1] != `stream 9 ("api-9"): id 9 is taken by stream 9 ("cfg") in the config` {
		t.Errorf("conflicts with the config's streams: %q, %v", c, err)
	}
	// Another key.
	other, err := storage.OpenWith(filepath.Join(dirB, "third.db"), storage.OpenOptions{Key: bytes.Repeat([]byte{7}, storage.KeySize)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	c, err = streams.ImportConflicts(ctx, other, bytes.Repeat([]byte{7}, storage.KeySize), "the configured storage_key", nil, f)
	if err != nil || len(c) != 1 || !strings.Contains(c[0], "sealed with another key than the configured storage_key") {
		t.Errorf("conflicts with another key: %q, %v", c, err)
	}
	b.Close()

	// Aegis on the imported store serves the TLS stream with the imported
	// certificate.
	startCaddy(t, map[string]any{"storage": map[string]any{"path": pathB}})
	conn, serial := tlsDial(t, ca, port, "db.test")
	if serial != 100 {
		t.Fatalf("served serial %d, want 100", serial)
	}
	if _, err := conn.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(conn, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo through the imported stream: %q, %v", got, err)
	}
}

// A file that is not an export file is refused before anything is read.
func TestDecodeExportRefuses(t *testing.T) {
	for name, in := range map[string]string{
		"not JSON":       `{"format": `,
		"other format":   `{"format": "x", "version": 1, "certificates": [], "streams": []}`,
		"newer version":  `{"format": "aegis-streams-export", "version": 2, "certificates": [], "streams": []}`,
		"unknown key":    `{"format": "aegis-streams-export", "version": 1, "certificates": [], "streams": [], "hosts": []}`,
		"trailing data":  `{"format": "aegis-streams-export", "version": 1, "certificates": [], "streams": []} {}`,
		"private key in": `{"format": "aegis-streams-export", "version": 1, "certificates": [{"id": 1, "private_key": "x"}], "streams": []}`,
	} {
		if _, err := streams.DecodeExport([]byte(in)); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// failingHosts is a store whose CreateHost fails for one stream id.
type failingHosts struct {
	storage.Store
	failID int64
}

func (f failingHosts) CreateHost(ctx context.Context, s spec.Stream, apply func(storage.Stored) error) (storage.Stored, error) {
	if s.ID == f.failID {
		return storage.Stored{}, errors.New("disk on fire")
	}
	return f.Store.CreateHost(ctx, s, apply)
}

// A write that fails in the middle of an import (after the checks) takes
// back the writes before it: the store is as it was.
func TestImportUndoesOnFailure(t *testing.T) {
	ctx := context.Background()
	a, keyA := openStore(t, filepath.Join(t.TempDir(), "streams.db"))
	tc := newTestCA(t)
	chain, keyPEM := tc.leaf(t, "db.test", 7)
	cert, err := a.CreateCertificate(ctx, spec.Certificate{Name: "db", Source: spec.SourceCustom, Domains: []string{"db.test"}, CertificatePEM: chain}, []byte(keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []spec.Stream{apiStream(1, freePort(t), 9), apiStream(2, freePort(t), 9)} {
		s.SSLEnabled, s.SSLCertID = true, cert.ID
		if _, err := a.CreateHost(ctx, s, nil); err != nil {
			t.Fatal(err)
		}
	}
	f, err := streams.DecodeExport(exportJSON(t, a, keyA))
	if err != nil {
		t.Fatal(err)
	}
	dirB := t.TempDir()
	if err := os.WriteFile(filepath.Join(dirB, "streams.key"), []byte(hex.EncodeToString(keyA)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, keyB := openStore(t, filepath.Join(dirB, "streams.db"))
	err = streams.ImportStore(ctx, failingHosts{b, 2}, keyB, f)
	if err == nil || !strings.Contains(err.Error(), "disk on fire") || !strings.Contains(err.Error(), "nothing was changed") {
		t.Fatalf("import with a failing write: %v", err)
	}
	hosts, err1 := b.ListHosts(ctx)
	certs, err2 := b.ListCertificates(ctx)
	if len(hosts) != 0 || len(certs) != 0 || err1 != nil || err2 != nil {
		t.Fatalf("left after a failed import: %d hosts (%v), %d certificates (%v)", len(hosts), err1, len(certs), err2)
	}
}
