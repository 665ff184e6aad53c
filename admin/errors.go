package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/aegis-proxy/caddy-aegis/certcheck"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// apiError is an error response:
//
//	{"error": "...", "field": "...", "value": ..., "errors": [{"field", "value", "message"}, ...]}
//
// field and value name the setting at fault, if one is; errors lists every
// setting at fault, the first of which is also in field and value. A
// certificate that streams use adds "streams": [their ids].
type apiError struct {
	Status  int            `json:"-"`
	Message string         `json:"error"`
	Field   string         `json:"field,omitempty"`
	Value   any            `json:"value,omitempty"`
	Errors  []fieldProblem `json:"errors,omitempty"`
	Streams []int64        `json:"streams,omitempty"`

	allow string // the Allow header of a 405
}

func (e *apiError) Error() string { return e.Message }

// fieldProblem is one setting at fault.
type fieldProblem struct {
	Field string `json:"field"`
	// Value is the bad value as JSON: a number, a string, a boolean.
	Value   any    `json:"value"`
	Message string `json:"message"`
}

// fieldError is a 400 about one field.
func fieldError(field string, value any, msg string) *apiError {
	return &apiError{Status: http.StatusBadRequest, Message: msg, Field: field, Value: value,
		Errors: []fieldProblem{{Field: field, Value: value, Message: msg}}}
}

func problemOf(fe *spec.FieldError) fieldProblem {
	return fieldProblem{Field: fe.Field, Value: spec.ShortValue(fe.Value), Message: fe.Error()}
}

// maxProblems is the most problems a 400 lists; spec caps those of one
// list setting, and this bounds the rest, so a bad request always gets a
// small answer.
const maxProblems = 50

// toAPIError maps an error to its response: an *apiError as it is; the
// streams package's sentinels to 503, 404 and 409; a database that cannot
// take the write (full disk, read-only file, lock held elsewhere) to 503;
// validation problems (*spec.FieldError and *certcheck.FieldError, one or
// several joined) to 400; anything else to 500.
func toAPIError(err error) *apiError {
	var ae *apiError
	if errors.As(err, &ae) {
		return ae
	}
	msg := err.Error()
	switch {
	case errors.Is(err, spec.ErrNotRunning):
		return &apiError{Status: http.StatusServiceUnavailable,
			Message: msg + ": the Caddy config has no streams app, or it is being replaced; try again, or add a streams app to the config"}
	case errors.Is(err, spec.ErrNotFound):
		return &apiError{Status: http.StatusNotFound, Message: msg}
	case errors.Is(err, spec.ErrReadOnly):
		return &apiError{Status: http.StatusConflict, Message: msg}
	case errors.Is(err, spec.ErrConflict):
		return &apiError{Status: http.StatusConflict, Message: msg}
	case errors.Is(err, spec.ErrNoStorage):
		return &apiError{Status: http.StatusConflict,
			Message: msg + ": streams cannot be created, changed or deleted through the API and there is no stored connection log; turn storage on in the streams app config"}
	case errors.Is(err, spec.ErrInUse), errors.Is(err, storage.ErrInUse):
		e := &apiError{Status: http.StatusConflict, Message: msg}
		var iu *storage.InUseError
		if errors.As(err, &iu) {
			e.Streams = iu.StreamIDs
		}
		return e
	case errors.Is(err, storage.ErrUnavailable):
		// The write was rolled back and the running streams left as they
		// were: say so, and what to fix.
		var ue *storage.UnavailableError
		if errors.As(err, &ue) {
			msg = ue.Problem + " (" + ue.Err.Error() + "); nothing was changed; "
			if ue.Fix != "" && !strings.Contains(ue.Fix, "nothing was changed") {
				msg += ue.Fix + ", then try again"
			} else {
				msg += "try again once it is back"
			}
		}
		return &apiError{Status: http.StatusServiceUnavailable, Message: "storage unavailable: " + msg}
	case errors.Is(err, storage.ErrStale):
		// Other nodes kept writing while this one caught up, every time.
		return &apiError{Status: http.StatusServiceUnavailable,
			Message: msg + ": other nodes wrote first each time this node tried; nothing was changed; try again"}
	case errors.Is(err, storage.ErrNoKey), errors.Is(err, storage.ErrWrongKey):
		return &apiError{Status: http.StatusInternalServerError,
			Message: msg + "; check the streams app's storage key (storage_key in the Caddyfile, storage.key in JSON, or the streams.key file beside the database)"}
	}
	// full has each problem's message; short the same without the
	// stream's label, used when every problem is a spec.FieldError of
	// one stream: the message then names it once.
	var full, short []string
	var probs []fieldProblem
	label, oneStream := "", true
	all := leaves(err)
	for i, leaf := range all {
		if len(full) == maxProblems {
			more := fmt.Sprintf("… and %d more problems", len(all)-i)
			full, short = append(full, more), append(short, more)
			probs = append(probs, fieldProblem{Message: more})
			break
		}
		var fe *spec.FieldError
		var ce *certcheck.FieldError
		switch {
		case errors.As(leaf, &fe):
			probs = append(probs, problemOf(fe))
			if l := fe.Label(); len(full) == 0 {
				label = l
			} else if l != label {
				oneStream = false
			}
			full, short = append(full, fe.Error()), append(short, fe.Detail())
		case errors.As(leaf, &ce):
			// The value is a PEM chain or a private key: never echoed.
			probs = append(probs, fieldProblem{Field: ce.Field, Message: ce.Error()})
			full, short = append(full, ce.Error()), append(short, ce.Error())
			oneStream = false
		default:
			full, short = append(full, leaf.Error()), append(short, leaf.Error())
			oneStream = false
		}
	}
	if len(probs) == 0 {
		return &apiError{Status: http.StatusInternalServerError, Message: "internal error: " + msg}
	}
	message := strings.Join(full, "; ")
	if oneStream {
		message = label + ": " + strings.Join(short, "; ")
	}
	return &apiError{Status: http.StatusBadRequest, Message: message,
		Field: probs[0].Field, Value: probs[0].Value, Errors: probs}
}

// redactError takes out of e, which the client and the log get, any text
// that looks like a key or a PEM block (certcheck.Redact): a private key
// pasted into the wrong field is never quoted back. Values are redacted
// whole.
func redactError(e *apiError) *apiError {
	e.Message = certcheck.Redact(e.Message)
	if v, ok := e.Value.(string); ok && certcheck.LooksSecret(v) {
		e.Value = certcheck.Redacted
	}
	for i := range e.Errors {
		p := &e.Errors[i]
		p.Message = certcheck.Redact(p.Message)
		if v, ok := p.Value.(string); ok && certcheck.LooksSecret(v) {
			p.Value = certcheck.Redacted
		}
	}
	return e
}

// leaves unpacks the errors joined in err (errors.Join, also when wrapped
// in a single-error wrapper such as fmt.Errorf with %w).
func leaves(err error) []error {
	for e := err; e != nil; {
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			var out []error
			for _, x := range j.Unwrap() {
				out = append(out, leaves(x)...)
			}
			return out
		}
		e = errors.Unwrap(e)
	}
	return []error{err}
}

// writeJSON writes v as the JSON response with the given status.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		status = http.StatusInternalServerError
		b, _ = json.Marshal(&apiError{Message: "internal error: encoding the response: " + err.Error()})
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}
