package admin_test

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
)

// auditEntry is an entry of GET /api/v1/audit.
type auditEntry struct {
	ID            int64  `json:"id"`
	Time          string `json:"time"`
	Node          string `json:"node"`
	Actor         string `json:"actor"`
	Remote        string `json:"remote"`
	Action        string `json:"action"`
	StreamID      int64  `json:"stream_id"`
	CertificateID int64  `json:"certificate_id"`
	Name          string `json:"name"`
	Changes       []struct {
		Field string `json:"field"`
		From  any    `json:"from"`
		To    any    `json:"to"`
	} `json:"changes"`
}

type auditPage struct {
	Entries    []auditEntry `json:"entries"`
	NextBefore *int64       `json:"next_before"`
}

func (inst *instance) audit(query string) auditPage {
	inst.t.Helper()
	var p auditPage
	inst.call("GET", "/api/v1/audit"+query, nil).want(inst.t, http.StatusOK).decode(inst.t, &p)
	if p.Entries == nil {
		inst.t.Fatalf("audit%s: entries is not an array", query)
	}
	return p
}

// TestAuditTrail makes each kind of change, through a streams_admin site
// behind basic_auth and through the admin endpoint, and reads one entry
// each back with who made it and what changed; refused writes and reads
// leave none; paging and the stream filter.
func TestAuditTrail(t *testing.T) {
	checkNoLeaks(t)
	inst := newInstance(t)
	site := inst.basicAuthSite("")
	viaSite := func(method, path string, body any) response {
		t.Helper()
		return doRequest(t, inst.client, method, fmt.Sprintf("http://127.0.0.1:%d%s", site, path), body,
			hdr{"Authorization", "Basic b3BzOnMzY3JldC10ZXN0"}) // ops:s3cret-test
	}
	up := newServer(t, echo)
	port := freePort(t)

	// Through the site, as ops: create, update, disable, enable.
	created := viaSite("POST", "/api/v1/streams", stream(0, port, up.Port, obj{"name": "db"})).want(t, http.StatusCreated).obj(t)
	sid := id(created)
	path := fmt.Sprintf("/api/v1/streams/%d", sid)
	viaSite("PATCH", path, obj{"upstream_port": up.Port + 1, "notes": "moved"}).want(t, http.StatusOK)
	viaSite("PATCH", path, obj{"enabled": false}).want(t, http.StatusOK)
	// Through the admin endpoint: enable, and the certificate's changes.
	inst.call("PATCH", path, obj{"enabled": true}).want(t, http.StatusOK)
	// A write that changes nothing (a bulk enable of an enabled stream)
	// is no change: no entry.
	inst.call("PATCH", path, obj{"enabled": true}).want(t, http.StatusOK)
	ca := newCA(t)
	leaf := ca.valid(t)
	cert := inst.call("POST", "/api/v1/certificates", leaf.upload("web")).want(t, http.StatusCreated).obj(t)
	cid := id(cert)
	inst.call("PUT", fmt.Sprintf("/api/v1/certificates/%d", cid), ca.valid(t).upload("web2")).want(t, http.StatusOK)
	inst.call("DELETE", fmt.Sprintf("/api/v1/certificates/%d", cid), nil).want(t, http.StatusNoContent)
	// Refused writes store nothing: a bad setting, a taken port, an
	// unknown stream.
	inst.call("PATCH", path, obj{"upstream_port": 70000}).apiErr(t, http.StatusBadRequest)
	inst.call("POST", "/api/v1/streams", stream(0, port, up.Port, nil)).apiErr(t, http.StatusBadRequest)
	inst.call("DELETE", "/api/v1/streams/999", nil).apiErr(t, http.StatusNotFound)
	// A second stream, then the first's delete through the site.
	other := id(inst.create(stream(0, freePort(t), up.Port, obj{"name": "other"})))
	viaSite("DELETE", path, nil).want(t, http.StatusNoContent)

	all := inst.audit("")
	if all.NextBefore != nil {
		t.Errorf("one page, and next_before %d", *all.NextBefore)
	}
	var got []string
	for _, e := range all.Entries {
		got = append(got, fmt.Sprintf("%s %s s%d c%d %s", e.Action, e.Actor, e.StreamID, e.CertificateID, e.Name))
		if !strings.HasPrefix(e.Remote, "127.0.0.1:") || e.Time == "" {
			t.Errorf("entry %d: remote %q, time %q", e.ID, e.Remote, e.Time)
		}
		for _, c := range e.Changes {
			if s := fmt.Sprint(c.From, c.To); strings.Contains(s, "PRIVATE KEY") || strings.Contains(s, "BEGIN") {
				t.Errorf("entry %d's change of %s shows PEM", e.ID, c.Field)
			}
		}
	}
	want := []string{
		fmt.Sprintf("delete ops s%d c0 db", sid),
		fmt.Sprintf("create admin endpoint s%d c0 other", other),
		fmt.Sprintf("cert_delete admin endpoint s0 c%d web2", cid),
		fmt.Sprintf("cert_update admin endpoint s0 c%d web2", cid),
		fmt.Sprintf("cert_create admin endpoint s0 c%d web", cid),
		fmt.Sprintf("enable admin endpoint s%d c0 db", sid),
		fmt.Sprintf("disable ops s%d c0 db", sid),
		fmt.Sprintf("update ops s%d c0 db", sid),
		fmt.Sprintf("create ops s%d c0 db", sid),
	}
	if !slices.Equal(got, want) {
		t.Fatalf("entries:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	changes := func(e auditEntry) string {
		var out []string
		for _, c := range e.Changes {
			out = append(out, fmt.Sprintf("%s:%v->%v", c.Field, c.From, c.To))
		}
		return strings.Join(out, " ")
	}
	if c := changes(all.Entries[7]); c != fmt.Sprintf("notes:<nil>->moved upstream_port:%d->%d", up.Port, up.Port+1) {
		t.Errorf("update's changes: %s", c)
	}
	if c := changes(all.Entries[6]); c != "enabled:true->false" {
		t.Errorf("disable's changes: %s", c)
	}
	if c := changes(all.Entries[3]); !strings.HasPrefix(c, "name:web->web2") || strings.Contains(c, "certificate") {
		t.Errorf("cert_update's changes: %s", c)
	}

	// Paging: 4 and 4 and 1, following next_before.
	var paged []int64
	q := "?limit=4"
	for pages := 0; ; pages++ {
		p := inst.audit(q)
		for _, e := range p.Entries {
			paged = append(paged, e.ID)
		}
		if p.NextBefore == nil {
			if pages != 2 {
				t.Errorf("%d pages, want 3", pages+1)
			}
			break
		}
		q = fmt.Sprintf("?limit=4&before=%d", *p.NextBefore)
	}
	var ids []int64
	for _, e := range all.Entries {
		ids = append(ids, e.ID)
	}
	if !slices.Equal(paged, ids) {
		t.Errorf("paged %v, want %v", paged, ids)
	}
	// The stream filter.
	mine := inst.audit(fmt.Sprintf("?stream_id=%d", sid))
	if len(mine.Entries) != 5 {
		t.Errorf("stream %d: %d entries, want 5", sid, len(mine.Entries))
	}
	for _, e := range mine.Entries {
		if e.StreamID != sid {
			t.Errorf("stream filter: %+v", e)
		}
	}
	// A full page of the filter with nothing older that matches is the
	// last: next_before is null, as the connection log's.
	if p := inst.audit(fmt.Sprintf("?stream_id=%d&limit=5", sid)); p.NextBefore != nil {
		t.Errorf("the stream's 5 entries in a page of 5, and next_before %d", *p.NextBefore)
	}
	if raw := string(inst.call("GET", "/api/v1/audit", nil).body); !strings.Contains(raw, `"next_before":null`) {
		t.Errorf("the last page has no next_before: null: %s", raw)
	}
	// Validation.
	for _, tc := range []struct{ query, field string }{
		{"?limit=0", "limit"}, {"?limit=1001", "limit"}, {"?before=x", "before"},
		{"?stream_id=-1", "stream_id"}, {"?actor=ops", "actor"},
	} {
		if e := inst.call("GET", "/api/v1/audit"+tc.query, nil).apiErr(t, http.StatusBadRequest); e.Field != tc.field {
			t.Errorf("%s: field %q, want %q", tc.query, e.Field, tc.field)
		}
	}
	inst.call("GET", "/api/v1/audit/1", nil).apiErr(t, http.StatusNotFound)
}
