package testenv

import (
	"slices"
	"testing"
)

func TestRepeatedKeys(t *testing.T) {
	for _, tc := range []struct {
		line string
		want []string
		bad  bool
	}{
		{line: `{"a":1,"b":"a","c":{"a":2},"d":[{"a":1},{"a":2}]}`},
		{line: `{"stream_id":3,"stream":"dns","stream":"dns","stream_id":3}`, want: []string{"stream", "stream_id"}},
		{line: `{"a":{"x":1,"x":[1,{"y":1,"y":2}]},"b":[],"b":{}}`, want: []string{"x", "y", "b"}},
		{line: `{"a":{},"c":[[],{}],"a":"a"}`, want: []string{"a"}},
		{line: `{"a":1`, bad: true},
		{line: `{"a" 1}`, bad: true},
	} {
		got, err := RepeatedKeys([]byte(tc.line))
		if (err != nil) != tc.bad || !slices.Equal(got, tc.want) {
			t.Errorf("RepeatedKeys(%s) = %q, %v; want %q (error: %v)", tc.line, got, err, tc.want, tc.bad)
		}
	}
}
