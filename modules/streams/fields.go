package streams

import (
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// UnmarshalJSON decodes the app's config, refusing a key that is not a
// setting anywhere in it (see checkFields), with every such key named.
func (a *App) UnmarshalJSON(b []byte) error {
	if err := errors.Join(checkFields(b, reflect.TypeFor[App](), "")...); err != nil {
		return err
	}
	type plain App
	return json.Unmarshal(b, (*plain)(a))
}

var streamType = reflect.TypeFor[spec.Stream]()

// checkFields checks that each key of the JSON value raw, which decodes
// into type t at where (a path such as "hosts[2]"), and of every object
// nested in it, is a field of its type. A value of the wrong kind is left
// for json.Unmarshal to report.
//
// Caddy refuses unknown keys of the app's own object and of storage, but
// not inside a host, whose type decodes itself; this names the host too.
func checkFields(raw json.RawMessage, t reflect.Type, where string) []error {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	var errs []error
	switch t.Kind() {
	case reflect.Slice, reflect.Array:
		var items []json.RawMessage
		if t.Elem().Kind() == reflect.Uint8 || json.Unmarshal(raw, &items) != nil {
			return nil
		}
		for i, item := range items {
			errs = append(errs, checkFields(item, t.Elem(), fmt.Sprintf("%s[%d]", where, i))...)
		}
	case reflect.Map:
		var items map[string]json.RawMessage
		if json.Unmarshal(raw, &items) != nil {
			return nil
		}
		for _, k := range sortedKeys(items) {
			errs = append(errs, checkFields(items[k], t.Elem(), fmt.Sprintf("%s[%q]", where, k))...)
		}
	case reflect.Struct:
		var obj map[string]json.RawMessage
		if json.Unmarshal(raw, &obj) != nil {
			return nil
		}
		fields := spec.JSONFields(t)
		var unknown []string
		for _, k := range sortedKeys(obj) {
			ft, ok := fields[k]
			if !ok {
				unknown = append(unknown, k)
				continue
			}
			path := k
			if where != "" {
				path = where + "." + k
			}
			errs = append(errs, checkFields(obj[k], ft, path)...)
		}
		if len(unknown) > 0 {
			label := where
			if t == streamType {
				var h struct {
					ID   int64  `json:"id"`
					Name string `json:"name"`
				}
				_ = json.Unmarshal(raw, &h)
				label += ", " + spec.StreamLabel(h.ID, h.Name)
			}
			msg := spec.UnknownFields(unknown, sortedKeys(fields))
			if label != "" {
				msg = label + ": " + msg
			}
			errs = append([]error{errors.New(msg)}, errs...)
		}
	}
	return errs
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
