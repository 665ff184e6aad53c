package admin

import (
	"fmt"
	"mime"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
)

// A state-changing request (POST, PUT, PATCH, DELETE) must come from the
// API's own origin, or one the HTTP handler lists in allowed_origins, and
// POST, PUT and PATCH must be sent as application/json (PATCH also as
// application/merge-patch+json). Together this keeps a web page of
// another site from driving the API through a visitor's browser: a form or
// a no-cors fetch cannot send application/json, and a browser names the
// page's origin in the Origin header of every cross-origin request that
// could.

// checkOrigin refuses (403) a state-changing request from another origin:
// one whose Origin header names a scheme, host and port other than the
// request's
// (its Host header; without a port there, 443 with TLS and 80 without) and
// an origin not in a.origins, or, without an Origin header, whose
// Sec-Fetch-Site says it comes from another site. Requests with neither
// header (curl, scripts) pass.
func (a *api) checkOrigin(r *http.Request) error {
	origin := r.Header.Get("Origin")
	if origin == "" {
		switch site := r.Header.Get("Sec-Fetch-Site"); site {
		case "", "same-origin", "none":
			return nil
		default:
			return &apiError{Status: http.StatusForbidden, Message: fmt.Sprintf(
				"cross-site request refused: a %s request from another site (Sec-Fetch-Site: %s) may not change streams", r.Method, site)}
		}
	}
	norm, err := normalizeOrigin(origin)
	if err != nil {
		return &apiError{Status: http.StatusForbidden, Message: fmt.Sprintf("origin %q refused: %v", origin, err)}
	}
	if sameHost(norm, r) || slices.Contains(a.origins, norm) {
		return nil
	}
	return &apiError{Status: http.StatusForbidden, Message: fmt.Sprintf(
		"origin %q refused: a %s request may not change streams from another origin than this server's (%s)%s",
		origin, r.Method, r.Host, a.originHint)}
}

// allowListed answers a browser's CORS checks for an origin the handler
// lists in allowed_origins (not for the API's own origin, which needs
// none): every answer, errors included, may be read there, with its ETag
// and Location. It reports whether the origin is listed.
func (a *api) allowListed(w http.ResponseWriter, r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if origin == "" || len(a.origins) == 0 {
		return false
	}
	h := w.Header()
	h.Add("Vary", "Origin")
	norm, err := normalizeOrigin(origin)
	if err != nil || sameHost(norm, r) || !slices.Contains(a.origins, norm) {
		return false
	}
	h.Set("Access-Control-Allow-Origin", origin)
	h.Set("Access-Control-Allow-Credentials", "true") // a site's basic_auth
	h.Set("Access-Control-Expose-Headers", "ETag, Location")
	return true
}

// preflight answers a listed origin's CORS preflight (OPTIONS with
// Access-Control-Request-Method) for a route that allows allow, with the
// headers the API reads; it reports whether r was one.
func preflight(w http.ResponseWriter, r *http.Request, allow string) bool {
	if r.Method != http.MethodOptions || r.Header.Get("Access-Control-Request-Method") == "" {
		return false
	}
	h := w.Header()
	h.Set("Access-Control-Allow-Methods", allow)
	h.Set("Access-Control-Allow-Headers", "Content-Type, If-Match, Authorization")
	h.Set("Access-Control-Max-Age", "600")
	w.WriteHeader(http.StatusNoContent)
	return true
}

// normalizeOrigin returns an origin as "scheme://host[:port]": lower case,
// without the scheme's default port.
func normalizeOrigin(s string) (string, error) {
	u, err := url.Parse(s)
	if err != nil {
		return "", err
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return "", fmt.Errorf("want http://host[:port] or https://host[:port]")
	}
	if u.Host == "" || u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" {
		return "", fmt.Errorf("want only a scheme, a host and an optional port, as in https://example.com:8443")
	}
	scheme := strings.ToLower(u.Scheme)
	return scheme + "://" + stripDefaultPort(scheme, strings.ToLower(u.Host)), nil
}

// sameHost reports whether the normalized origin has the scheme, host and
// port that r was sent to: https://127.0.0.1:2019 is another origin than
// the admin endpoint's http://127.0.0.1:2019.
func sameHost(origin string, r *http.Request) bool {
	u, err := url.Parse(origin)
	if err != nil {
		return false
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	if u.Scheme != scheme {
		return false
	}
	oport := u.Port()
	if oport == "" {
		oport = defaultPort(u.Scheme)
	}
	host, port, err := net.SplitHostPort(r.Host)
	if err != nil {
		host, port = strings.Trim(r.Host, "[]"), ""
	}
	if port == "" {
		port = "80"
		if r.TLS != nil {
			port = "443"
		}
	}
	return strings.EqualFold(u.Hostname(), host) && oport == port
}

func defaultPort(scheme string) string {
	if scheme == "https" {
		return "443"
	}
	return "80"
}

func stripDefaultPort(scheme, hostport string) string {
	return strings.TrimSuffix(hostport, ":"+defaultPort(scheme))
}

// tooEarly refuses (425 Too Early, RFC 8470) a write that arrived as TLS
// early data: 0-RTT data, which HTTP/3 allows, can be replayed by anyone
// who saw it. Caddy hands such a request on before the handshake is
// complete (r.TLS.HandshakeComplete false, as its `tls early_data`
// matcher reads it); a proxy in front says so with "Early-Data: 1". The
// client sends it again once the handshake is done.
func tooEarly(r *http.Request) error {
	if r.TLS != nil && !r.TLS.HandshakeComplete || r.Header.Get("Early-Data") == "1" {
		return &apiError{Status: http.StatusTooEarly,
			Message: "too early: a " + r.Method + " request sent as TLS early data (0-RTT) could be replayed; send it again after the handshake"}
	}
	return nil
}

// mergePatchType is the media type of a JSON merge patch (RFC 7396).
const mergePatchType = "application/merge-patch+json"

// acceptPatch is the Accept-Patch header of a route that takes PATCH: the
// body types it takes.
const acceptPatch = mergePatchType + ", application/json"

// requireJSON refuses (415) a request body that is not declared as
// application/json, or for PATCH as a JSON merge patch.
func requireJSON(r *http.Request) error {
	ct := r.Header.Get("Content-Type")
	mt, _, err := mime.ParseMediaType(ct)
	if err == nil && (mt == "application/json" || r.Method == http.MethodPatch && mt == mergePatchType) {
		return nil
	}
	got := "none"
	if ct != "" {
		got = fmt.Sprintf("%q", ct)
	}
	want := "application/json"
	if r.Method == http.MethodPatch {
		want = mergePatchType + " (a JSON merge patch, RFC 7396) or application/json"
	}
	return &apiError{Status: http.StatusUnsupportedMediaType,
		Message: fmt.Sprintf("a %s request needs Content-Type: %s (got %s)", r.Method, want, got)}
}
