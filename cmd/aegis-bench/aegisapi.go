package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"
)

// aegisAPI is a client of bin/aegis's REST API and of Caddy's admin API,
// both on its admin endpoint.
type aegisAPI struct {
	base string // http://127.0.0.1:<admin port>
	hc   *http.Client
}

func newAegisAPI(adminPort int) *aegisAPI {
	return &aegisAPI{base: "http://" + addr(adminPort), hc: &http.Client{Timeout: 30 * time.Second}}
}

// statusError is an API answer with another status than the one wanted.
type statusError struct {
	method, path string
	status, want int
	msg, field   string
}

func (e *statusError) Error() string {
	s := fmt.Sprintf("%s %s: status %d, want %d", e.method, e.path, e.status, e.want)
	if e.msg != "" {
		s += ": " + e.msg
	}
	return s
}

// call sends method to path with body as JSON (none if nil), checks that
// the answer has status want and decodes it into out (if not nil).
func (a *aegisAPI) call(method, path string, body any, want int, out any) error {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, a.base+path, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: reading the answer: %v", method, path, err)
	}
	if resp.StatusCode != want {
		var e struct {
			Error string `json:"error"`
			Field string `json:"field"`
		}
		json.Unmarshal(b, &e)
		return &statusError{method: method, path: path, status: resp.StatusCode, want: want, msg: e.Error, field: e.Field}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("%s %s: decoding the answer: %v", method, path, err)
		}
	}
	return nil
}

// load replaces the running config with cfg (Caddy's POST /load), which
// it has applied when load returns.
func (a *aegisAPI) load(cfg []byte) error {
	return a.call("POST", "/load", json.RawMessage(cfg), http.StatusOK, nil)
}
