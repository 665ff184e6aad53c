package spec

import (
	"fmt"
	"math"
	"reflect"
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
