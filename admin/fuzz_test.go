package admin

import (
	"errors"
	"net/http"
	"net/url"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

// FuzzDecodeStream feeds arbitrary bodies to the stream decoder of POST and
// PUT: it must never panic, and must answer a refusal with a 400 *apiError
// that has a message.
func FuzzDecodeStream(f *testing.F) {
	f.Add(`{"name":"db","listen_port":5432,"upstream_host":"10.0.0.5","upstream_port":5432}`)
	f.Add(`{"id":3,"protocol":"udp","whitelist_cidrs":["10.0.0.0/8"],"enabled":false,"status":{"x":1}}`)
	f.Add(`{"listen_port":"5432"}`)
	f.Add(`{"bogus":1,"listen_port":1,"listen_port":2}`)
	f.Add(`{} trailing`)
	f.Add(`[1,2]`)
	f.Fuzz(func(t *testing.T, body string) {
		var s streams.Stream
		err := decodeObject([]byte(body), &s, streamFields, readOnlyFields)
		if err != nil {
			var ae *apiError
			if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || ae.Message == "" {
				t.Fatalf("%q: refused with %#v, want a 400 with a message", body, err)
			}
		}
	})
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
// paging parser.
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
			if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
				t.Fatalf("%q: refused with %#v, want a 400", raw, err)
			}
			return
		}
		if got.Limit < 0 || got.Limit > 1000 || got.Before < 0 {
			t.Fatalf("%q: accepted out of range: %+v", raw, got)
		}
	})
}
