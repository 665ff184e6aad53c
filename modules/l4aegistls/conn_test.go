package l4aegistls

import (
	"crypto/tls"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
)

// A write of the relay's bulk buffer (128 KiB) goes to the client as one
// batch of records, and the batch is reused: once warm, such a write
// allocates nothing.
func TestBulkWriteReusesItsBatch(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates; `make test` runs this without it")
	}
	cert := testenv.Cert(t, testenv.CertOptions{Names: []string{"bulk.test"}, NotAfter: time.Now().Add(time.Hour)})
	cc, raw := testenv.TCPPair(t)
	w := &wire{Conn: raw}
	sc := &Conn{Conn: tls.Server(w, &tls.Config{Certificates: []tls.Certificate{cert.TLS}}), wire: w}
	defer sc.Close()
	client := tls.Client(cc, &tls.Config{RootCAs: cert.Pool(), ServerName: "bulk.test"})
	done := make(chan struct{})
	go func() {
		defer close(done)
		if client.Handshake() != nil {
			return
		}
		// Then the records are drained below TLS: decrypting them would
		// allocate in the count.
		buf := make([]byte, 64<<10)
		for {
			if _, err := cc.Read(buf); err != nil {
				return
			}
		}
	}()
	defer func() { cc.Close(); <-done }()
	// As aegis_tls does before it hands the connection on.
	_ = sc.SetDeadline(time.Now().Add(10 * time.Second))
	if err := sc.Handshake(); err != nil {
		t.Fatal(err)
	}

	p := make([]byte, 128<<10)
	write := func() {
		if _, err := sc.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	for range 20 {
		write() // past the small records TLS starts with; warms the pool
	}
	if allocs := testing.AllocsPerRun(100, write); allocs > 0.05 {
		t.Fatalf("%.2f allocations per 128 KiB write through TLS, want 0", allocs)
	}
}
