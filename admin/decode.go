package admin

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// maxBodyBytes bounds a request body: 1 MiB.
const maxBodyBytes = 1 << 20

// maxUnknown is the most unknown fields an error lists.
const maxUnknown = 10

var (
	// streamFields are the JSON fields of a stream, with their Go types.
	streamFields = spec.JSONFields(reflect.TypeFor[spec.Stream]())
	// readOnlyFields are the fields GET adds to a stream, and warnings,
	// which a write's answer adds. A client may send back what it read:
	// they are accepted and ignored.
	readOnlyFields = map[string]bool{"source": true, "status": true, "created_at": true, "updated_at": true, "version": true, "warnings": true}
	// portCheckFields are the JSON fields of a validate-port request.
	portCheckFields = spec.JSONFields(reflect.TypeFor[spec.PortCheck]())
)

// requiredFields are the stream settings without a default.
var requiredFields = []string{"listen_port", "upstream_host", "upstream_port"}

// readStream reads a stream from the request body, and the keys the body
// has.
func readStream(r *http.Request) (spec.Stream, []string, error) {
	var s spec.Stream
	body, err := readBody(r)
	if err != nil {
		return s, nil, err
	}
	raw, keys, values, err := readObject(body, streamFields, readOnlyFields)
	if err != nil {
		return s, nil, err
	}
	return s, keys, unmarshalObject(raw, keys, values, &s, streamFields)
}

// missingRequired returns an error for each required setting that a PUT
// of stream cur left out: a PUT replaces the whole stream, and a left-out
// setting would take its default, which a required one has none of.
func missingRequired(keys []string, cur spec.Stream) error {
	var errs []error
	for _, f := range requiredFields {
		if (f == "upstream_host" || f == "upstream_port") && slices.Contains(keys, "upstreams") {
			continue // the first of upstreams
		}
		if !slices.Contains(keys, f) {
			errs = append(errs, &spec.FieldError{ID: cur.ID, Name: cur.Name, Field: f,
				Reason: "missing (PUT replaces the whole stream; send every setting, or use PATCH)"})
		}
	}
	return errors.Join(errs...)
}

// readPatch reads a JSON merge patch (RFC 7396) of a stream from the
// request body: one object whose keys are stream settings or read-only
// fields, each once. Its values are checked once applied (patchStream).
func readPatch(r *http.Request) (json.RawMessage, error) {
	body, err := readBody(r)
	if err != nil {
		return nil, err
	}
	raw, _, _, err := readObject(body, streamFields, readOnlyFields)
	return raw, err
}

// patchStream applies a merge patch that readPatch accepted to stream cur
// and decodes the result as the body of a PUT: null removes a setting,
// which then takes its default; a required one is then missing.
func patchStream(cur spec.Stream, patch json.RawMessage) (spec.Stream, error) {
	var s spec.Stream
	target, err := json.Marshal(&cur)
	if err != nil {
		return s, err
	}
	var t, p any
	if err := decodeNumbers(target, &t); err != nil {
		return s, err
	}
	if err := decodeNumbers(patch, &p); err != nil {
		return s, badRequest("the request body is not valid JSON: %v", err)
	}
	// New upstreams without upstream_host and upstream_port: those become
	// the new first upstream, not the old one, which would differ.
	if po, ok := p.(map[string]any); ok {
		if to, ok := t.(map[string]any); ok && po["upstreams"] != nil {
			if _, ok := po["upstream_host"]; !ok {
				delete(to, "upstream_host")
			}
			if _, ok := po["upstream_port"]; !ok {
				delete(to, "upstream_port")
			}
		}
	}
	merged, err := json.Marshal(mergePatch(t, p))
	if err != nil {
		return s, err
	}
	err = decodeObject(merged, &s, streamFields, readOnlyFields)
	return s, err
}

// mergePatch applies merge patch p to target as RFC 7396 says: an object
// patches an object key by key, null removing a key; any other value
// replaces the target.
func mergePatch(target, p any) any {
	po, ok := p.(map[string]any)
	if !ok {
		return p
	}
	to, ok := target.(map[string]any)
	if !ok {
		to = map[string]any{}
	}
	for k, v := range po {
		if v == nil {
			delete(to, k)
		} else {
			to[k] = mergePatch(to[k], v)
		}
	}
	return to
}

// decodeNumbers decodes JSON into v, numbers as json.Number, so that they
// keep their digits.
func decodeNumbers(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	return dec.Decode(v)
}

// readJSON reads the request body, which must be one JSON object whose
// keys are among known or ignored, into dst. Keys in ignored are skipped.
// Errors are *apiError values: 413 for a body over maxBodyBytes, 400 for
// the rest.
func readJSON(r *http.Request, dst any, known map[string]reflect.Type, ignored map[string]bool) error {
	body, err := readBody(r)
	if err != nil {
		return err
	}
	return decodeObject(body, dst, known, ignored)
}

// readBody reads the whole request body, at most maxBodyBytes.
func readBody(r *http.Request) ([]byte, error) {
	tooBig := &apiError{Status: http.StatusRequestEntityTooLarge,
		Message: fmt.Sprintf("request body too large: the limit is %d bytes", maxBodyBytes)}
	if r.ContentLength > maxBodyBytes {
		return nil, tooBig
	}
	b, err := io.ReadAll(io.LimitReader(r.Body, maxBodyBytes+1))
	if err != nil {
		return nil, &apiError{Status: http.StatusBadRequest, Message: "reading the request body: " + err.Error()}
	}
	if len(b) > maxBodyBytes {
		return nil, tooBig
	}
	return b, nil
}

func badRequest(format string, args ...any) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: fmt.Sprintf(format, args...)}
}

// decodeObject decodes body, which must be exactly one JSON object, into
// dst. Each key must be in known or ignored, and appear once.
//
// The keys are checked here rather than with DisallowUnknownFields, which
// cannot see into a type with its own UnmarshalJSON (spec.Stream has
// one), and which would also match keys case-insensitively.
func decodeObject(body []byte, dst any, known map[string]reflect.Type, ignored map[string]bool) error {
	raw, keys, values, err := readObject(body, known, ignored)
	if err != nil {
		return err
	}
	return unmarshalObject(raw, keys, values, dst, known)
}

// readObject checks that body is exactly one JSON object, each of whose
// keys is in known or ignored and appears once, and returns the object
// with its keys and values, in order.
func readObject(body []byte, known map[string]reflect.Type, ignored map[string]bool) (json.RawMessage, []string, []json.RawMessage, error) {
	if len(bytes.TrimSpace(body)) == 0 {
		return nil, nil, nil, badRequest("the request body is empty; send a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	var raw json.RawMessage
	if err := dec.Decode(&raw); err != nil {
		return nil, nil, nil, badRequest("the request body is not valid JSON: %v", syntaxMessage(err, body))
	}
	end := int(dec.InputOffset())
	if rest := bytes.TrimLeft(body[end:], " \t\r\n"); len(rest) > 0 {
		return nil, nil, nil, badRequest("the request body goes on after its JSON value, at byte %d: %s; send one JSON object",
			len(body)-len(rest), excerpt(rest))
	}
	if raw[0] != '{' {
		return nil, nil, nil, badRequest("the request body must be a JSON object, not %s", excerpt(raw))
	}

	keys, values, err := objectKeys(raw)
	if err != nil {
		return nil, nil, nil, badRequest("the request body is not valid JSON: %v", err)
	}
	var unknown []fieldProblem
	seen := make(map[string]bool, len(keys))
	for i, k := range keys {
		if seen[k] {
			return nil, nil, nil, fieldError(k, nil, fmt.Sprintf("field %q appears twice; give each field once", k))
		}
		seen[k] = true
		if _, ok := known[k]; ok || ignored[k] {
			continue
		}
		if len(unknown) < maxUnknown {
			unknown = append(unknown, fieldProblem{Field: k, Value: anyValue(values[i]), Message: spec.UnknownField(k, sortedKeys(known))})
		}
	}
	if len(unknown) > 0 {
		names := make([]string, len(unknown))
		for i, u := range unknown {
			names[i] = u.Field
		}
		msg := spec.UnknownFields(names, sortedKeys(known))
		return nil, nil, nil, &apiError{Status: http.StatusBadRequest, Message: msg,
			Field: unknown[0].Field, Value: unknown[0].Value, Errors: unknown}
	}
	return raw, keys, values, nil
}

// unmarshalObject decodes the object readObject returned into dst; a value
// of the wrong type is a 400 on its key.
func unmarshalObject(raw json.RawMessage, keys []string, values []json.RawMessage, dst any, known map[string]reflect.Type) error {
	if err := json.Unmarshal(raw, dst); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			field, _, _ := strings.Cut(te.Field, ".")
			var val json.RawMessage
			if i := slices.Index(keys, field); i >= 0 {
				val = values[i]
			}
			msg := fmt.Sprintf("%s %s: must be %s", field, excerpt(val), describeType(known[field]))
			return fieldError(field, anyValue(val), msg)
		}
		return badRequest("decoding the request body: %v", err)
	}
	return nil
}

// objectKeys returns the keys of a JSON object, in order, with their
// values.
func objectKeys(obj json.RawMessage) ([]string, []json.RawMessage, error) {
	dec := json.NewDecoder(bytes.NewReader(obj))
	if _, err := dec.Token(); err != nil { // '{'
		return nil, nil, err
	}
	var keys []string
	var values []json.RawMessage
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, nil, err
		}
		k, _ := tok.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, nil, err
		}
		keys = append(keys, k)
		values = append(values, v)
	}
	return keys, values, nil
}

// anyValue is a JSON value as a Go value for a response; numbers keep
// their digits. A value over 256 bytes is left out (nil).
func anyValue(raw json.RawMessage) any {
	if len(raw) == 0 || len(raw) > 256 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if dec.Decode(&v) != nil {
		return nil
	}
	return v
}

// excerpt is up to 60 bytes of raw JSON, for a message.
func excerpt(b []byte) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) == nil {
		b = buf.Bytes()
	}
	if len(b) > 60 {
		return string(b[:60]) + "…"
	}
	return string(b)
}

// syntaxMessage says where a JSON syntax error is.
func syntaxMessage(err error, body []byte) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("%v (at byte %d)", se, se.Offset)
	}
	if errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Sprintf("it ends early, after %d bytes", len(body))
	}
	return err.Error()
}

// describeType says what a JSON value of Go type t looks like.
func describeType(t reflect.Type) string {
	if t == nil {
		return "a valid value"
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "an integer"
	case reflect.String:
		return "a string"
	case reflect.Bool:
		return "true or false"
	case reflect.Slice:
		return "a list of " + strings.TrimPrefix(strings.TrimPrefix(describeType(t.Elem()), "a "), "an ") + "s"
	}
	return "a " + t.Kind().String()
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// eachParam calls f with each of q's parameters, in order of name, until
// f fails; a parameter given more than once is a 400 that names it.
func eachParam(q url.Values, f func(name, v string) error) error {
	for _, name := range sortedKeys(q) {
		vals := q[name]
		if len(vals) > 1 {
			return fieldError(name, vals[0], fmt.Sprintf("query parameter %s is given %d times; give it once", name, len(vals)))
		}
		if err := f(name, vals[0]); err != nil {
			return err
		}
	}
	return nil
}

// connLogQuery is what GET connections asks for: the entries (q) and
// their format.
type connLogQuery struct {
	storage.ConnLogQuery
	// csv asks for CSV instead of a JSON page.
	csv bool
}

// parseConnLogQuery reads the connection log's query parameters: limit
// (1 to MaxConnLogLimit, or MaxConnLogExportLimit with format=csv),
// before, action, node, source (an address or CIDR network), reason,
// since and until (RFC 3339) and format (json or csv). It refuses any
// other parameter, and any given twice.
func parseConnLogQuery(q url.Values) (connLogQuery, error) {
	out := connLogQuery{ConnLogQuery: storage.ConnLogQuery{Limit: storage.DefaultConnLogLimit}}
	limit := ""
	err := eachParam(q, func(name, v string) error {
		switch name {
		case "limit":
			limit = v
		case "before":
			id, err := parseBefore(name, v)
			if err != nil {
				return err
			}
			out.Before = id
		case "action":
			if v != storage.ActionAllowed && v != storage.ActionBlocked {
				return fieldError(name, v, fmt.Sprintf("action %q: must be %s or %s", v, storage.ActionAllowed, storage.ActionBlocked))
			}
			out.Action = v
		case "node":
			if v == "" || len(v) > 200 {
				return fieldError(name, v, "node: must be a node's name (GET "+clusterPath+" lists them)")
			}
			out.Node = v
		case "source":
			pfx, err := netip.ParsePrefix(v)
			if err != nil {
				addr, aerr := netip.ParseAddr(v)
				if aerr != nil || addr.Zone() != "" {
					return fieldError(name, v, fmt.Sprintf("source %q: must be an IP address (203.0.113.7) or a CIDR network (203.0.113.0/24, 2001:db8::/32)", v))
				}
				pfx = netip.PrefixFrom(addr.Unmap(), addr.Unmap().BitLen())
			}
			if a := pfx.Addr(); a.Is4In6() && pfx.Bits() >= 96 {
				// The log keeps IPv4 sources as IPv4 (never ::ffff:…).
				pfx = netip.PrefixFrom(a.Unmap(), pfx.Bits()-96)
			}
			out.Source = pfx.Masked()
		case "reason":
			if !isReason(v) {
				return fieldError(name, v, fmt.Sprintf("reason %q: must be a disconnect_reason as the log shows it, e.g. client_close or acl_denied (lower-case letters, digits and _)", v))
			}
			out.Reason = v
		case "since", "until":
			t, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return fieldError(name, v, fmt.Sprintf("%s %q: must be an RFC 3339 time, e.g. 2026-12-06T15:00:00Z", name, v))
			}
			if name == "since" {
				out.Since = t.UTC()
			} else {
				out.Until = t.UTC()
			}
		case "format":
			if v != "json" && v != "csv" {
				return fieldError(name, v, fmt.Sprintf("format %q: must be json (the default) or csv", v))
			}
			out.csv = v == "csv"
		default:
			return fieldError(name, v, fmt.Sprintf("unknown query parameter %q; the parameters are: action, before, format, limit, node, reason, since, source, until", name))
		}
		return nil
	})
	if err != nil {
		return out, err
	}
	if !out.Since.IsZero() && !out.Until.IsZero() && !out.Until.After(out.Since) {
		return out, fieldError("until", q.Get("until"), fmt.Sprintf("until %q: must be after since (%s)", q.Get("until"), q.Get("since")))
	}
	if limit != "" {
		most := storage.MaxConnLogLimit
		if out.csv {
			most = storage.MaxConnLogExportLimit
		}
		n, err := strconv.Atoi(limit)
		if err != nil || !allDigits(limit) || n < 1 || n > most {
			return out, fieldError("limit", limit, fmt.Sprintf("limit %q: must be an integer from 1 to %d (default %d; up to %d with format=csv)",
				limit, most, storage.DefaultConnLogLimit, storage.MaxConnLogExportLimit))
		}
		out.Limit = n
	}
	return out, nil
}

// isReason reports whether v looks like a disconnect_reason.
func isReason(v string) bool {
	if v == "" || len(v) > 64 {
		return false
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}
