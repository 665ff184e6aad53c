package admin_test

import (
	"strings"
	"testing"
)

// A misspelt field in a write names the setting that was probably meant,
// in the message and at the field, as the JSON config does (both use
// spec.UnknownFields); nothing is created.
func TestUnknownFieldSuggestsTheSetting(t *testing.T) {
	checkNoLeaks(t)
	up := newServer(t, echo)
	inst := startCaddy(t, streamsApp(), nil)

	s := stream(0, freePort(t), up.Port, obj{"whitelist_cidr": []string{"10.0.0.0/8"}})
	e := inst.call("POST", "/api/v1/streams", s).apiErr(t, 400)
	want := `unknown field "whitelist_cidr"; did you mean whitelist_cidrs?`
	if e.Field != "whitelist_cidr" || e.Error != want || len(e.Errors) != 1 || e.Errors[0].Message != want {
		t.Errorf("a misspelt setting: %+v, want the message %s", e, want)
	}
	s = stream(0, freePort(t), up.Port, obj{"nmae": "x", "bogus": 1})
	e = inst.call("POST", "/api/v1/streams", s).apiErr(t, 400)
	if !strings.HasPrefix(e.Error, `unknown fields "bogus", "nmae" (did you mean name?); the fields are: `) {
		t.Errorf("a misspelt and an unknown setting: %+v", e)
	}
	e = inst.call("POST", "/api/v1/certificates", obj{"name": "c", "certficate": "x", "private_key": "y"}).apiErr(t, 400)
	if want := `unknown field "certficate"; did you mean certificate?`; e.Field != "certficate" || e.Error != want {
		t.Errorf("a misspelt certificate field: %+v, want %s", e, want)
	}
	if list := inst.call("GET", "/api/v1/streams", nil).list(t); len(list) != 0 {
		t.Errorf("refused writes created streams: %v", list)
	}
}
