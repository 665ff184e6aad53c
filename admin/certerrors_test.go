package admin

import (
	"errors"
	"fmt"
	"net/http"
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/certcheck"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// TestCertErrorMapping checks the responses of the certificate errors that
// the end-to-end tests cannot easily provoke.
func TestCertErrorMapping(t *testing.T) {
	inUse := &storage.InUseError{CertID: 3, StreamIDs: []int64{1, 4}, StreamNames: []string{"db", ""}}
	for _, tc := range []struct {
		name    string
		err     error
		status  int
		field   string
		streams []int64
		has     string
	}{
		{"field error", fmt.Errorf("wrapped: %w", &certcheck.FieldError{Field: "private_key", Reason: "does not match"}),
			http.StatusBadRequest, "private_key", nil, "private_key: does not match"},
		{"in use, carried", fmt.Errorf("%w: %w", inUse, spec.ErrInUse), http.StatusConflict, "", []int64{1, 4}, `streams 1 ("db"), 4`},
		{"in use, from the store", fmt.Errorf("storage: deleting certificate 3: %w", inUse), http.StatusConflict, "", []int64{1, 4}, "certificate 3"},
		{"in use, as text", fmt.Errorf("%v: %w", inUse, spec.ErrInUse), http.StatusConflict, "", nil, "certificate 3"},
		{"no key", fmt.Errorf("storage: %w", storage.ErrNoKey), http.StatusInternalServerError, "", nil, storage.ErrNoKey.Error()},
		{"wrong key", fmt.Errorf("storage: certificate 3: %w", storage.ErrWrongKey), http.StatusInternalServerError, "", nil, "cannot be decrypted"},
	} {
		e := toAPIError(certError(tc.err, 3))
		if e.Status != tc.status || e.Field != tc.field || e.Value != nil || !strings.Contains(e.Message, tc.has) ||
			fmt.Sprint(e.Streams) != fmt.Sprint(tc.streams) {
			t.Errorf("%s: %d %+v", tc.name, e.Status, e)
		}
		if tc.field != "" && (len(e.Errors) != 1 || e.Errors[0].Field != tc.field || e.Errors[0].Value != nil) {
			t.Errorf("%s: errors %+v", tc.name, e.Errors)
		}
	}
	if e := toAPIError(certError(fmt.Errorf("x: %w", spec.ErrNotFound), 7)); e.Status != 404 || e.Message != "certificate 7 not found" {
		t.Errorf("not found: %+v", e)
	}
	if e := toAPIError(certError(spec.ErrNoStorage, 0)); e.Status != 409 || !strings.Contains(e.Message, "turn storage on") {
		t.Errorf("no storage: %+v", e)
	}
}

// TestDecodeCertInput checks the upload decoder's results and that its
// errors quote no value.
func TestDecodeCertInput(t *testing.T) {
	in, err := decodeCertInput([]byte(`{"name": "a", "certificate": "C", "private_key": "K"}`))
	if err != nil || in.Name != "a" || in.Certificate != "C" || in.PrivateKey != "K" {
		t.Fatalf("good: %+v %v", in, err)
	}
	in, err = decodeCertInput([]byte(`{"name": "m", "domains": ["a.example", "b.example"]}`))
	if err != nil || len(in.Domains) != 2 || in.Domains[1] != "b.example" {
		t.Fatalf("managed: %+v %v", in, err)
	}
	in, err = decodeCertInput([]byte(` {"name": null} `))
	if err != nil || in.Name != "" {
		t.Fatalf("null: %+v %v", in, err)
	}
	const secret = "SECRETSECRET"
	long := strings.Repeat("k", 100) + secret
	for _, body := range []string{
		`{"name": "a", "private_key": ["` + secret + `"]}`,
		`{"name": "a", "private_key": {"k": "` + secret + `"}}`,
		`{"name": "a", "key": "` + secret + `"}`,
		`{"name": "a", "domains": {"k": "` + secret + `"}}`,
		`{"` + long + `": 1}`,
		`{"` + long + `": 1, "` + long + `": 2}`,
		`"` + secret + `"`,
		`["` + secret + `"]`,
		`{} "` + secret + `"`,
		`{"name": "` + secret,
		`{"name": "a"} ` + secret,
	} {
		_, err := decodeCertInput([]byte(body))
		var ae *apiError
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
			t.Errorf("%.40s: %v, want a 400", body, err)
			continue
		}
		b := fmt.Sprintf("%+v", *ae)
		if strings.Contains(b, secret) || ae.Value != nil {
			t.Errorf("%.40s: the error quotes the body: %s", body, b)
		}
	}
}
