// Package jsontime is the one timestamp format of the API's answers:
// RFC 3339 in UTC with milliseconds, e.g. 2026-12-06T10:42:31.123Z.
// time.Time's own JSON form has nanoseconds and drops trailing zeros, so
// the same instant could show as …:31Z, …:31.1Z or …:31.123456789Z.
package jsontime

import "time"

// Layout is the format: RFC 3339, always three fractional digits, and Z
// for UTC.
const Layout = "2006-01-02T15:04:05.000Z07:00"

// Time is a time.Time whose JSON form is Layout in UTC, and null for the
// zero time. Its methods are time.Time's; use .Time where a time.Time is
// wanted.
type Time struct{ time.Time }

// Of wraps t.
func Of(t time.Time) Time { return Time{t} }

// Ptr wraps t and returns a pointer to it, for the optional fields.
func Ptr(t time.Time) *Time { return &Time{t} }

// MarshalJSON writes t in Layout, in UTC, or null for the zero time.
func (t Time) MarshalJSON() ([]byte, error) {
	if t.IsZero() {
		return []byte("null"), nil
	}
	b := make([]byte, 0, len(Layout)+2)
	b = append(b, '"')
	b = t.UTC().AppendFormat(b, Layout)
	return append(b, '"'), nil
}

// UnmarshalJSON reads an RFC 3339 time; null leaves the zero time.
func (t *Time) UnmarshalJSON(b []byte) error {
	if string(b) == "null" {
		*t = Time{}
		return nil
	}
	return t.Time.UnmarshalJSON(b)
}
