package admin

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// FuzzDecodeStream feeds arbitrary bodies to the stream decoder of POST and
// PUT. It must never panic; a refusal is a 400 *apiError with a message
// whose field, when it names one, is the first of its errors. It must take
// exactly the bodies that are one JSON object with each key once, every
// key a stream setting or a read-only field of GET, and values of the
// settings' types (what json.Unmarshal reads into a spec.Stream), and
// decode them as json.Unmarshal does; and what it decoded, encoded again,
// decodes to the same stream.
func FuzzDecodeStream(f *testing.F) {
	f.Add(`{"name":"db","listen_port":5432,"upstream_host":"10.0.0.5","upstream_port":5432}`)
	f.Add(`{"id":3,"protocol":"udp","whitelist_cidrs":["10.0.0.0/8"],"enabled":false,"status":{"x":1}}`)
	f.Add(`{"listen_port":"5432"}`)
	f.Add(`{"bogus":1,"listen_port":1,"listen_port":2}`)
	f.Add(`{} trailing`)
	f.Add(`[1,2]`)
	f.Fuzz(func(t *testing.T, body string) {
		var s spec.Stream
		err := decodeObject([]byte(body), &s, streamFields, readOnlyFields)
		acceptable, ref := referenceStream([]byte(body))
		if err != nil {
			checkRefusal(t, body, err)
			if acceptable {
				t.Fatalf("%q: refused (%v), but it is one object of known keys that decodes", body, err)
			}
			return
		}
		if !acceptable {
			t.Fatalf("%q: accepted as %+v, but it is not one object of known, unique keys that decodes", body, s)
		}
		if !reflect.DeepEqual(s, ref) {
			t.Fatalf("%q: decoded as %+v, json.Unmarshal reads %+v", body, s, ref)
		}
		b, err := json.Marshal(&s)
		if err != nil {
			t.Fatal(err)
		}
		var again spec.Stream
		if err := decodeObject(b, &again, streamFields, readOnlyFields); err != nil {
			t.Fatalf("%s: our own encoding is refused: %v", b, err)
		}
		if !reflect.DeepEqual(emptyListsNil(s), emptyListsNil(again)) {
			t.Fatalf("%q: decoded %+v, re-encoded as %s and decoded %+v", body, s, b, again)
		}
	})
}

// referenceStream says whether body is one JSON object (surrounded by JSON
// white space at most) with unique keys, each a stream setting or a
// read-only field, that json.Unmarshal reads into a spec.Stream; and
// returns what it reads.
func referenceStream(body []byte) (bool, spec.Stream) {
	var s spec.Stream
	if json.Unmarshal(body, &s) != nil {
		return false, s
	}
	if !uniqueStreamKeys(body) {
		return false, s
	}
	return true, s
}

// FuzzPatchStream feeds arbitrary bodies to PATCH's merge-patch path:
// readPatch's check, then patchStream on a stream with most settings set.
// It must never panic; a refusal is a 400 *apiError whose field, when it
// names one, leads its errors. It must take exactly the bodies that are
// one JSON object with each key once, every key a stream setting or a
// read-only field, whose result decodes; and the result must be the
// stream with each key of the patch set to its value, or to its default
// where the value is null (the settings are no objects, so RFC 7396's
// merge comes down to that).
func FuzzPatchStream(f *testing.F) {
	f.Add(`{"enabled":false}`)
	f.Add(`{"notes":null,"max_connections":null,"whitelist_cidrs":["10.0.0.0/8"]}`)
	f.Add(`{"listen_port":null}`)
	f.Add(`{"status":{"id":null},"version":"3","enabled":null}`)
	f.Add(`{"whitelist_cidrs":{"a":null}}`)
	f.Add(`{"listen_port":"80","bogus":1}`)
	f.Add(`{"name":"a","name":null}`)
	f.Add(`[{"op":"replace","path":"/enabled","value":false}]`)
	f.Add(`null`)
	base := spec.Stream{ID: 4, Name: "base", Protocol: "tcp+udp", ListenAddress: "127.0.0.1", ListenPort: 5000,
		UpstreamHost: "db.internal", UpstreamPort: 5432, Enabled: true, MaxConnections: 9, IdleTimeoutSeconds: 30,
		WhitelistCIDRs: []string{"10.0.0.0/8", "::1"}, BlacklistCIDRs: []string{"10.0.0.1"}, UploadRateBytes: 100,
		HealthCheckEnabled: true, LogConnections: true, Notes: "n"}
	f.Fuzz(func(t *testing.T, body string) {
		var got spec.Stream
		raw, _, _, err := readObject([]byte(body), streamFields, readOnlyFields)
		if err == nil {
			cur := base
			cur.WhitelistCIDRs, cur.BlacklistCIDRs = slices.Clone(base.WhitelistCIDRs), slices.Clone(base.BlacklistCIDRs)
			got, err = patchStream(cur, raw)
		}
		acceptable, want := referencePatch(base, []byte(body))
		if err != nil {
			checkRefusal(t, body, err)
			if acceptable {
				t.Fatalf("%q: refused (%v), but it is one object of known keys whose result decodes", body, err)
			}
			return
		}
		if !acceptable {
			t.Fatalf("%q: accepted as %+v, but it is not one object of known, unique keys whose result decodes", body, got)
		}
		if !reflect.DeepEqual(emptyListsNil(got), emptyListsNil(want)) {
			t.Fatalf("%q: patched to %+v, want %+v", body, got, want)
		}
	})
}

// uniqueStreamKeys says whether body is one JSON object whose keys are
// unique, each a stream setting or a read-only field.
func uniqueStreamKeys(body []byte) bool {
	dec := json.NewDecoder(bytes.NewReader(body))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return false
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return false
		}
		k := tok.(string)
		if _, known := streamFields[k]; seen[k] || !known && !readOnlyFields[k] {
			return false
		}
		seen[k] = true
		var v json.RawMessage
		if dec.Decode(&v) != nil {
			return false
		}
	}
	return true
}

// referencePatch says whether body is one JSON object with unique keys,
// each a stream setting or a read-only field, such that base with each of
// its keys set to its value, or removed where the value is null, decodes
// as a stream; and returns that stream.
func referencePatch(base spec.Stream, body []byte) (bool, spec.Stream) {
	var s spec.Stream
	var patch map[string]json.RawMessage
	if json.Unmarshal(body, &patch) != nil || patch == nil {
		return false, s
	}
	if !uniqueStreamKeys(body) {
		return false, s
	}
	b, _ := json.Marshal(&base)
	var doc map[string]json.RawMessage
	if json.Unmarshal(b, &doc) != nil {
		return false, s
	}
	for k, v := range patch {
		if string(v) == "null" {
			delete(doc, k)
		} else if !readOnlyFields[k] {
			doc[k] = v
		}
	}
	b, _ = json.Marshal(doc)
	if json.Unmarshal(b, &s) != nil {
		return false, s
	}
	return true, s
}

// emptyListsNil is s with empty lists as nil: JSON leaves empty lists out.
func emptyListsNil(s spec.Stream) spec.Stream {
	if len(s.WhitelistCIDRs) == 0 {
		s.WhitelistCIDRs = nil
	}
	if len(s.BlacklistCIDRs) == 0 {
		s.BlacklistCIDRs = nil
	}
	return s
}

// FuzzDecodeCertInput does the same for certificate uploads, whose errors
// must never quote the body (it holds a private key).
func FuzzDecodeCertInput(f *testing.F) {
	f.Add(`{"name":"a","certificate":"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----","private_key":"SECRETKEYBYTES"}`)
	f.Add(`{"name":"m","domains":["a.example","b.example"]}`)
	f.Add(`{"name":"a","key":"SECRETKEYBYTES"}`)
	f.Add(`{"private_key":["SECRETKEYBYTES"]}`)
	f.Fuzz(func(t *testing.T, body string) {
		_, err := decodeCertInput([]byte(body))
		if err == nil {
			return
		}
		var ae *apiError
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
			t.Fatalf("%q: refused with %#v, want a 400", body, err)
		}
		if ae.Value != nil {
			t.Fatalf("%q: the error carries a value from the body: %#v", body, ae.Value)
		}
		const secret = "SECRETKEYBYTES"
		if strings.Contains(body, secret) && strings.Contains(ae.Message, secret) {
			t.Fatalf("%q: the error quotes the key: %s", body, ae.Message)
		}
	})
}

// FuzzConnLogQuery feeds arbitrary query strings to the connection-log
// paging parser. It must refuse with a 400 naming the parameter, or give
// exactly the parameters asked for (limit 1-1000, default 50; before > 0;
// action allowed or blocked), each given once.
func FuzzConnLogQuery(f *testing.F) {
	f.Add("limit=10&before=99&action=blocked")
	f.Add("limit=-1")
	f.Add("action=nope&x=1")
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		got, err := parseConnLogQuery(q)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || ae.Message == "" {
				t.Fatalf("%q: refused with %#v, want a 400 naming the parameter", raw, err)
			}
			if _, given := q[ae.Field]; !given { // the name may be "" ("?=1")
				t.Fatalf("%q: refused for parameter %q, which is not in the query", raw, ae.Field)
			}
			return
		}
		want := storage.ConnLogQuery{Limit: storage.DefaultConnLogLimit}
		for k, vs := range q {
			if len(vs) != 1 {
				t.Fatalf("%q: accepted parameter %s given %d times", raw, k, len(vs))
			}
			n, _ := strconv.ParseInt(vs[0], 10, 64)
			switch k {
			case "limit":
				want.Limit = int(n)
			case "before":
				want.Before = n
			case "action":
				want.Action = vs[0]
			case "node", "source", "reason", "since", "until", "format":
				// Checked by TestConnLogFilterParams; taken as parsed.
				want.Node, want.Source, want.Reason, want.Since, want.Until = got.Node, got.Source, got.Reason, got.Since, got.Until
			default:
				t.Fatalf("%q: accepted unknown parameter %q", raw, k)
			}
		}
		most := storage.MaxConnLogLimit
		if got.csv {
			most = storage.MaxConnLogExportLimit
		}
		if got.ConnLogQuery != want || got.Limit < 1 || got.Limit > most || got.Before < 0 ||
			got.Action != "" && got.Action != storage.ActionAllowed && got.Action != storage.ActionBlocked {
			t.Fatalf("%q: parsed as %+v, want %+v within range", raw, got, want)
		}
	})
}

// checkRefusal fails unless err, the refusal of body, is a 400 with a
// message whose field, when it names one, leads its errors.
func checkRefusal(t *testing.T, body string, err error) {
	t.Helper()
	var ae *apiError
	if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || ae.Message == "" {
		t.Fatalf("%q: refused with %#v, want a 400 with a message", body, err)
	}
	if len(ae.Errors) > 0 && (ae.Field != ae.Errors[0].Field || ae.Errors[0].Message == "") {
		t.Fatalf("%q: field %q does not lead errors %+v", body, ae.Field, ae.Errors)
	}
}
