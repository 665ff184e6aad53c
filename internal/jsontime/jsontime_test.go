package jsontime

import (
	"encoding/json"
	"testing"
	"time"
)

func TestJSON(t *testing.T) {
	east := time.FixedZone("east", 3*3600)
	for _, tc := range []struct {
		in   time.Time
		want string
	}{
		{time.Date(2026, 12, 6, 10, 42, 31, 123456789, time.UTC), `"2026-12-06T10:42:31.123Z"`},
		{time.Date(2026, 12, 6, 10, 42, 31, 0, time.UTC), `"2026-12-06T10:42:31.000Z"`},
		{time.Date(2026, 12, 6, 10, 42, 31, 100e6, time.UTC), `"2026-12-06T10:42:31.100Z"`},
		{time.Date(2026, 12, 6, 13, 42, 31, 5e6, east), `"2026-12-06T10:42:31.005Z"`},
		{time.Time{}, `null`},
	} {
		b, err := json.Marshal(Of(tc.in))
		if err != nil || string(b) != tc.want {
			t.Errorf("%v: %s, %v; want %s", tc.in, b, err, tc.want)
		}
		var back Time
		if err := json.Unmarshal(b, &back); err != nil || !back.Equal(tc.in.Truncate(time.Millisecond)) {
			t.Errorf("%s read back as %v, %v", b, back, err)
		}
	}
	// omitzero leaves the zero time out; a nil pointer is null.
	b, _ := json.Marshal(struct {
		A Time  `json:"a,omitzero"`
		B *Time `json:"b"`
		C *Time `json:"c,omitempty"`
	}{})
	if string(b) != `{"b":null}` {
		t.Errorf("zero fields: %s", b)
	}
}
