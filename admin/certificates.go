package admin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// The certificate routes: uploaded TLS certificates that streams with
// ssl_enabled terminate TLS with (their ssl_cert_id).
//
// An upload holds a private key. Nothing here writes it, or any part of a
// request body, into a response or a log line: the errors of an upload
// name the field at fault and never quote its value (see decodeCertInput
// and toAPIError), and the responses are spec.CertStatus values, which
// have no field for a key.

// certsPath is the root of the certificate routes.
const certsPath = "/api/v1/certificates"

var (
	certCollectionRoute = route{http.MethodGet: (*api).listCertificates, http.MethodPost: (*api).createCertificate}
	certRoute           = route{http.MethodGet: (*api).getCertificate, http.MethodPut: (*api).updateCertificate, http.MethodDelete: (*api).deleteCertificate}

	// certInputFields are the JSON fields of an upload: a subset of
	// spec.CertInput's, all strings.
	certInputFields = map[string]bool{"name": true, "certificate": true, "private_key": true, "domains": true}
)

// matchCerts finds the route of a path at or below certsPath.
func matchCerts(path string) (route, params, error) {
	var p params
	sub := strings.TrimPrefix(path, certsPath)
	if sub == "" || sub == "/" {
		return certCollectionRoute, p, nil
	}
	segs := strings.Split(sub[1:], "/")
	id, ok := parseID(segs[0])
	if !ok {
		return nil, p, &apiError{Status: http.StatusNotFound,
			Message: "no such endpoint: " + strconv.Quote(path) + ": a certificate id is a positive integer, e.g. " + certsPath + "/3"}
	}
	if len(segs) != 1 {
		return nil, p, notFoundPath(path)
	}
	p.id = id
	return certRoute, p, nil
}

// ---- endpoints ----

func (a *api) listCertificates(w http.ResponseWriter, r *http.Request, _ params) error {
	list := []spec.CertStatus{}
	if app := streams.Running(); app != nil {
		l, err := app.Certificates(r.Context())
		if err != nil {
			return certError(err, 0)
		}
		list = append(list, l...)
	}
	writeJSON(w, http.StatusOK, list)
	return nil
}

func (a *api) createCertificate(w http.ResponseWriter, r *http.Request, p params) error {
	in, err := readCertInput(r)
	if err != nil {
		return err
	}
	cs, err := streams.CreateCertificate(r.Context(), in)
	if err != nil {
		return certError(err, 0)
	}
	w.Header().Set("Location", p.mount+certsPath+"/"+strconv.FormatInt(cs.ID, 10))
	writeJSON(w, http.StatusCreated, cs)
	return nil
}

func (a *api) getCertificate(w http.ResponseWriter, r *http.Request, p params) error {
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	cs, err := app.Certificate(r.Context(), p.id)
	if err != nil {
		return certError(err, p.id)
	}
	writeJSON(w, http.StatusOK, cs)
	return nil
}

func (a *api) updateCertificate(w http.ResponseWriter, r *http.Request, p params) error {
	in, err := readCertInput(r)
	if err != nil {
		return err
	}
	cs, err := streams.UpdateCertificate(r.Context(), p.id, in)
	if err != nil {
		return certError(err, p.id)
	}
	writeJSON(w, http.StatusOK, cs)
	return nil
}

func (a *api) deleteCertificate(w http.ResponseWriter, r *http.Request, p params) error {
	err := streams.DeleteCertificate(r.Context(), p.id)
	if err == nil {
		w.WriteHeader(http.StatusNoContent)
		return nil
	}
	e := toAPIError(certError(err, p.id))
	if e.Status == http.StatusConflict && e.Streams == nil && errors.Is(err, spec.ErrInUse) {
		// The error did not carry the *storage.InUseError: ask which
		// streams use the certificate now.
		if app := streams.Running(); app != nil {
			if cs, err := app.Certificate(r.Context(), p.id); err == nil && len(cs.UsedBy) > 0 {
				e.Streams = cs.UsedBy
			}
		}
	}
	return e
}

// certError gives the errors of the certificate functions of the streams
// package the messages of this API; others are returned as they are, for
// toAPIError. id is the certificate of the path, 0 for none.
func certError(err error, id int64) error {
	switch {
	case errors.Is(err, spec.ErrNoStorage):
		return &apiError{Status: http.StatusConflict,
			Message: err.Error() + ": certificates are kept in the streams app's storage; turn storage on in the streams app config"}
	case id > 0 && errors.Is(err, spec.ErrNotFound):
		return &apiError{Status: http.StatusNotFound, Message: fmt.Sprintf("certificate %d not found", id)}
	case errors.Is(err, spec.ErrInUse), errors.Is(err, storage.ErrInUse):
		e := toAPIError(err)
		e.Message += "; delete those streams, or give them another certificate (ssl_cert_id, upstream_tls_client_cert_id), first"
		return e
	}
	return err
}

// ---- request bodies ----

// readCertInput reads an upload from the request body.
func readCertInput(r *http.Request) (spec.CertInput, error) {
	body, err := readBody(r)
	if err != nil {
		return spec.CertInput{}, err
	}
	return decodeCertInput(body)
}

// maxFieldName is the longest unknown field name an error quotes in full.
const maxFieldName = 40

// decodeCertInput decodes an upload: one JSON object with the string (or
// null) fields name, certificate and private_key, each at most once, and
// no others. It checks what decodeObject checks, but its errors never
// quote a value of the body, nor more of an unknown field's name than
// maxFieldName bytes: the body holds a private key, whatever field it was
// put in.
func decodeCertInput(body []byte) (spec.CertInput, error) {
	var in spec.CertInput
	if len(bytes.TrimSpace(body)) == 0 {
		return in, badRequest("the request body is empty; send a JSON object with name, certificate and private_key")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return in, badRequest("the request body is not valid JSON: %v", syntaxMessage(err, body))
	}
	if rest := bytes.TrimLeft(body[dec.InputOffset():], " \t\r\n"); len(rest) > 0 {
		return in, badRequest("the request body goes on after its JSON value, at byte %d; send one JSON object", len(body)-len(rest))
	}
	if raw[0] != '{' {
		return in, badRequest("the request body must be a JSON object with name, certificate and private_key, not %s", jsonKind(raw))
	}
	keys, values, err := objectKeys(raw)
	if err != nil {
		return in, badRequest("the request body is not valid JSON: %v", err)
	}

	var unknown []fieldProblem
	seen := make(map[string]bool, len(keys))
	for i, k := range keys {
		name := shortName(k)
		if seen[k] {
			return in, fieldError(name, nil, fmt.Sprintf("field %q appears twice; give each field once", name))
		}
		seen[k] = true
		if _, ok := certInputFields[k]; !ok {
			if len(unknown) < maxUnknown {
				unknown = append(unknown, fieldProblem{Field: name, Message: spec.UnknownField(name, sortedKeys(certInputFields))})
			}
			continue
		}
		if k == "domains" {
			// A managed certificate: the names Caddy obtains it for.
			if err := json.Unmarshal(values[i], &in.Domains); err != nil {
				return in, fieldError(k, nil, fmt.Sprintf("domains: must be a list of strings, not %s", jsonKind(values[i])))
			}
			continue
		}
		var v *string
		if err := json.Unmarshal(values[i], &v); err != nil {
			return in, fieldError(k, nil, fmt.Sprintf("%s: must be a string, not %s", k, jsonKind(values[i])))
		}
		if v == nil {
			continue
		}
		switch k {
		case "name":
			in.Name = *v
		case "certificate":
			in.Certificate = *v
		case "private_key":
			in.PrivateKey = *v
		}
	}
	if len(unknown) > 0 {
		names := make([]string, len(unknown))
		for i, u := range unknown {
			names[i] = u.Field
		}
		msg := spec.UnknownFields(names, sortedKeys(certInputFields))
		return in, &apiError{Status: http.StatusBadRequest, Message: msg, Field: unknown[0].Field, Errors: unknown}
	}
	return in, nil
}

// shortName is a field name for a message: cut to maxFieldName bytes.
func shortName(k string) string {
	if len(k) <= maxFieldName {
		return k
	}
	return strings.ToValidUTF8(k[:maxFieldName], "") + "…"
}

// jsonKind names the kind of a JSON value, without quoting it.
func jsonKind(v json.RawMessage) string {
	switch v[0] {
	case '{':
		return "an object"
	case '[':
		return "an array"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}
