package storage

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strconv"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// FuzzStoredStream: any stream that decodes from JSON is stored whole: its
// settings column holds none of the settings that have columns, and the
// stream reads back as it was written (empty lists as nil), every setting
// included, from a real database of each backend.
func FuzzStoredStream(f *testing.F) {
	f.Add([]byte(`{"id":1,"listen_port":5432,"upstream_host":"db","upstream_port":5432}`))
	f.Add([]byte(`{"id":2,"protocol":"tcp+udp","listen_address":"::","listen_port":53,"upstream_host":"ns","upstream_port":53,
		"enabled":false,"whitelist_cidrs":[],"blacklist_cidrs":["10.0.0.9"],"ssl_enabled":true,"ssl_cert_id":4,
		"ssl_cert_tag":"db","notes":"é\u0000\"","half_close":true,"upload_rate_bytes":9007199254740993}`))
	var stores []testStore
	for _, b := range backends {
		stores = append(stores, b.store(f))
	}
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, data []byte) {
		var in spec.Stream
		if json.Unmarshal(data, &in) != nil || in.ID < 0 {
			return
		}
		in.ID = 0 // the store assigns one; ids are checked elsewhere
		want, settings, err := normalized(in)
		if err != nil {
			t.Fatalf("encoding %+v: %v", in, err)
		}
		for _, k := range settingColumns {
			if strings.Contains(settings, `"`+k+`":`) {
				t.Fatalf("settings %s hold %s, which has a column", settings, k)
			}
		}
		if len(in.WhitelistCIDRs) == 0 {
			in.WhitelistCIDRs = nil
		}
		if len(in.BlacklistCIDRs) == 0 {
			in.BlacklistCIDRs = nil
		}
		if !reflect.DeepEqual(want, in) {
			t.Fatalf("the stored form changed the stream:\n got %+v\nwant %+v", want, in)
		}
		for i, s := range stores {
			h, err := s.CreateHost(ctx, in, nil)
			if err != nil {
				t.Fatalf("%s: storing %+v: %v", backends[i].name, in, err)
			}
			got, err := s.GetHost(ctx, h.ID)
			if err != nil {
				t.Fatal(err)
			}
			in.ID = h.ID
			if !reflect.DeepEqual(got.Stream, in) || !reflect.DeepEqual(got, h) {
				t.Fatalf("%s: read back:\n got %+v\nwant %+v", backends[i].name, got.Stream, in)
			}
			in.ID = 0
		}
	})
}

// FuzzChangePayload: a notification's payload is a change ID only when it
// is the ID's canonical decimal form, from 1 to 2^53-1; anything else is
// refused, and nothing panics.
func FuzzChangePayload(f *testing.F) {
	for _, s := range []string{"1", "42", "9007199254740991", "9007199254740992", "0", "01", "-1", "+1", " 1", "1 ",
		"", "1e3", "0x10", "١", "99999999999999999999", "12\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := parseChangePayload(s)
		if err != nil {
			if id != 0 || !errors.Is(err, errBadPayload) {
				t.Fatalf("parseChangePayload(%q) = %d, %v", s, id, err)
			}
			return
		}
		if id < 1 || id > maxID || strconv.FormatInt(id, 10) != s {
			t.Fatalf("parseChangePayload(%q) = %d", s, id)
		}
	})
}
