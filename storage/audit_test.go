package storage

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

func TestAuditLog(t *testing.T) { eachBackend(t, testAuditLog) }

// testAuditLog makes each kind of change with an AuditSource on the
// context and reads back one entry each, newest first, with the diff; a
// write without a source, and one its apply refuses, store none.
func testAuditLog(t *testing.T, b testBackend) {
	s, _ := b.keyed(t)
	ctx := WithAudit(context.Background(), AuditSource{Actor: "alice", Remote: "127.0.0.1:5000"})
	st := spec.Stream{Name: "db", Protocol: "tcp", ListenPort: 7000, UpstreamHost: "10.0.0.1", UpstreamPort: 5432, Enabled: true}
	h, err := s.CreateHost(ctx, st, nil)
	if err != nil {
		t.Fatal(err)
	}
	st = h.Stream
	st.UpstreamPort = 5433
	st.Notes = "moved"
	if _, err := s.UpdateHost(ctx, st, nil); err != nil {
		t.Fatal(err)
	}
	st.Enabled = false
	if _, err := s.UpdateHost(ctx, st, nil); err != nil {
		t.Fatal(err)
	}
	st.Enabled = true
	if _, err := s.UpdateHost(ctx, st, nil); err != nil {
		t.Fatal(err)
	}
	// Refused by apply: rolled back with its audit entry.
	refused := errors.New("refused")
	st.UpstreamPort = 1
	if _, err := s.UpdateHost(ctx, st, func(_, _ Stored) error { return refused }); !errors.Is(err, refused) {
		t.Fatalf("refused update: %v", err)
	}
	// No source: no entry.
	st.UpstreamPort = 2
	if _, err := s.UpdateHost(context.Background(), st, nil); err != nil {
		t.Fatal(err)
	}
	tc := ecCert(t, "a.example.com")
	c, err := s.CreateCertificate(ctx, customCert(tc, "web"), []byte(tc.keyPEM), nil)
	if err != nil {
		t.Fatal(err)
	}
	c2 := c
	c2.Name = "web2"
	if _, err := s.UpdateCertificate(ctx, c2, []byte(tc.keyPEM), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteCertificate(ctx, c.ID, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.DeleteHost(ctx, h.ID, nil); err != nil {
		t.Fatal(err)
	}

	all, err := s.AuditLog(context.Background(), AuditQuery{})
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range all {
		got = append(got, fmt.Sprintf("%s s%d c%d %s", e.Action, e.StreamID, e.CertificateID, e.Name))
		if e.Actor != "alice" || e.Remote != "127.0.0.1:5000" || e.Node != testNode || e.Time.IsZero() {
			t.Errorf("entry %d: actor %q remote %q node %q time %v", e.ID, e.Actor, e.Remote, e.Node, e.Time)
		}
		for _, ch := range e.Changes {
			if s := fmt.Sprint(ch.From, ch.To); strings.Contains(s, "PRIVATE") || strings.Contains(s, "CERTIFICATE") {
				t.Errorf("entry %d shows %s: %v", e.ID, ch.Field, s)
			}
		}
	}
	want := []string{
		fmt.Sprintf("delete s%d c0 db", h.ID),
		fmt.Sprintf("cert_delete s0 c%d web2", c.ID),
		fmt.Sprintf("cert_update s0 c%d web2", c.ID),
		fmt.Sprintf("cert_create s0 c%d web", c.ID),
		fmt.Sprintf("enable s%d c0 db", h.ID),
		fmt.Sprintf("disable s%d c0 db", h.ID),
		fmt.Sprintf("update s%d c0 db", h.ID),
		fmt.Sprintf("create s%d c0 db", h.ID),
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	diff := func(e AuditEntry) string {
		var out []string
		for _, ch := range e.Changes {
			out = append(out, fmt.Sprintf("%s:%v->%v", ch.Field, ch.From, ch.To))
		}
		return strings.Join(out, " ")
	}
	if d := diff(all[6]); d != "notes:<nil>->moved upstream_port:5432->5433" {
		t.Errorf("update's changes: %s", d)
	}
	if d := diff(all[5]); d != "enabled:true->false" {
		t.Errorf("disable's changes: %s", d)
	}
	if d := diff(all[2]); d != "name:web->web2" {
		t.Errorf("cert_update's changes: %s", d)
	}
	if d := diff(all[7]); !strings.Contains(d, "upstream_host:<nil>->10.0.0.1") || !strings.Contains(d, "name:<nil>->db") {
		t.Errorf("create's changes: %s", d)
	}
	if d := diff(all[3]); !strings.Contains(d, "not_after:<nil>->") || strings.Contains(d, "certificate:") {
		t.Errorf("cert_create's changes: %s", d)
	}
	if len(all[0].Changes) != 0 || all[0].Changes == nil {
		t.Errorf("delete's changes: %#v", all[0].Changes)
	}

	// Paging and the stream filter.
	page, err := s.AuditLog(context.Background(), AuditQuery{Limit: 2, Before: all[1].ID})
	if err != nil || len(page) != 2 || page[0].ID != all[2].ID || page[1].ID != all[3].ID {
		t.Fatalf("page before %d: %+v %v", all[1].ID, page, err)
	}
	mine, err := s.AuditLog(context.Background(), AuditQuery{StreamID: h.ID})
	if err != nil || len(mine) != 5 {
		t.Fatalf("stream %d: %d entries, %v", h.ID, len(mine), err)
	}
	for _, e := range mine {
		if e.StreamID != h.ID {
			t.Errorf("stream filter returned %+v", e)
		}
	}
}

func TestAuditRetention(t *testing.T) { eachBackend(t, testAuditRetention) }

// testAuditRetention checks that a write keeps the newest AuditRetention
// entries.
func testAuditRetention(t *testing.T, b testBackend) {
	s := b.store(t)
	ctx := context.Background()
	err := s.base().be.inTx(ctx, false, func(tx writeTx) error {
		_, err := tx.exec(ctx, `INSERT INTO audit_log (at, actor, action) SELECT 1, 'x', 'update' FROM (
		WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?) SELECT i FROM n) AS n`, AuditRetention+5)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	actx := WithAudit(ctx, AuditSource{Actor: "admin endpoint"})
	if _, err := s.CreateHost(actx, spec.Stream{Name: "x", Protocol: "tcp", ListenPort: 7001, UpstreamHost: "h", UpstreamPort: 1}, nil); err != nil {
		t.Fatal(err)
	}
	var n int
	if err := s.base().reads.queryRow(ctx, `SELECT COUNT(*) FROM audit_log`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	if n != AuditRetention {
		t.Fatalf("%d entries kept, want %d", n, AuditRetention)
	}
}
