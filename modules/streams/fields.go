package streams

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"reflect"
	"slices"
	"strconv"
	"strings"
)

// The JSON config and the API refuse a key that is not a setting, saying
// which setting was probably meant: a misspelt setting that was silently
// ignored could open a stream to everyone (a typo in whitelist_cidrs).

// JSONFields maps the JSON names of struct type t's fields to their types.
func JSONFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f.Type
	}
	return out
}

// UnknownField says that the key name is not among known (the JSON names
// of an object's fields), with the names it was probably meant to be:
//
//	unknown field "whitelist_cidr"; did you mean whitelist_cidrs?
func UnknownField(name string, known []string) string {
	msg := fmt.Sprintf("unknown field %q", name)
	if s := Suggest(name, known); len(s) > 0 {
		msg += "; did you mean " + strings.Join(s, " or ") + "?"
	}
	return msg
}

// UnknownFields says that the keys names are not among known: each with
// the names it was probably meant to be, and the list of known names when
// one of them is like none:
//
//	unknown field "whitelist_cidr"; did you mean whitelist_cidrs?
//	unknown field "bogus"; the fields are: id, name, …
//	unknown fields "nme" (did you mean name?), "bogus"; the fields are: id, name, …
func UnknownFields(names []string, known []string) string {
	if len(names) == 1 {
		if s := Suggest(names[0], known); len(s) > 0 {
			return UnknownField(names[0], known)
		}
	}
	list := false
	quoted := make([]string, len(names))
	for i, n := range names {
		quoted[i] = strconv.Quote(n)
		if s := Suggest(n, known); len(s) > 0 && len(names) > 1 {
			quoted[i] += " (did you mean " + strings.Join(s, " or ") + "?)"
		} else if len(s) == 0 {
			list = true
		}
	}
	msg := "unknown field " + strings.Join(quoted, ", ")
	if len(names) > 1 {
		msg = "unknown fields " + strings.Join(quoted, ", ")
	}
	if list {
		msg += "; the fields are: " + strings.Join(known, ", ")
	}
	return msg
}

// Suggest returns the names in known that name is closest to, if it is
// close enough to be a typo of them: the same but for case, a few letters
// off (fewer than one in four), or the start of a name (upload_rate for
// upload_rate_bytes). Ties are all returned, in known's order.
func Suggest(name string, known []string) []string {
	n := strings.ToLower(strings.ReplaceAll(name, "-", "_"))
	best, out := -1, []string(nil)
	for _, k := range known {
		// A start of a name ranks behind every near miss, and the same as
		// any other start.
		d := editDistance(n, k)
		ok := d <= max(1, len(n)/4)
		if !ok && len(n) >= 4 && (strings.HasPrefix(k, n) || strings.HasPrefix(n, k)) {
			ok, d = true, math.MaxInt
		}
		switch {
		case !ok || best >= 0 && d > best:
		case d == best:
			out = append(out, k)
		default:
			best, out = d, []string{k}
		}
	}
	return out
}

// editDistance is the number of single-letter insertions, deletions,
// substitutions and swaps of neighbours that turn a into b.
func editDistance(a, b string) int {
	// Three rows of the table: i-2, i-1, i.
	prev2 := make([]int, len(b)+1)
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				cur[j] = min(cur[j], prev2[j-2]+1)
			}
		}
		prev2, prev, cur = prev, cur, prev2
	}
	return prev[len(b)]
}

// UnmarshalJSON decodes the app's config, refusing a key that is not a
// setting anywhere in it (see checkFields), with every such key named.
func (a *App) UnmarshalJSON(b []byte) error {
	if err := errors.Join(checkFields(b, reflect.TypeFor[App](), "")...); err != nil {
		return err
	}
	type plain App
	return json.Unmarshal(b, (*plain)(a))
}

var streamType = reflect.TypeFor[Stream]()

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
		fields := JSONFields(t)
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
				label += ", " + streamLabel(h.ID, h.Name)
			}
			msg := UnknownFields(unknown, sortedKeys(fields))
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
