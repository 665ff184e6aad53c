// Package admin serves the Aegis Streams REST API (/api/v1/streams… and
// /api/v1/certificates…), on Caddy's admin endpoint (module
// admin.api.streams) and as an HTTP handler (module
// http.handlers.streams_admin) that a Caddy site can serve behind its own
// TLS and authentication. Both use the one implementation in this file
// and certificates.go.
package admin

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/certcheck"
	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// basePath is the API's root.
const basePath = "/api/v1/streams"

// clusterPath lists the nodes that share this node's storage.
const clusterPath = "/api/v1/cluster"

// auditPath is the audit trail of the changes made through the API.
const auditPath = "/api/v1/audit"

// isAPIPath reports whether path is the API's: basePath, certsPath,
// clusterPath or auditPath, or below one of them.
func isAPIPath(path string) bool {
	return underPath(path, basePath) || underPath(path, certsPath) || underPath(path, clusterPath) || underPath(path, auditPath)
}

// underPath reports whether path is root or below it.
func underPath(path, root string) bool {
	return path == root || strings.HasPrefix(path, root+"/")
}

// api is the streams REST API. Its state is what the admin endpoint or
// the HTTP handler configured; the streams themselves are the running
// app's (streams.Running), looked up on each request: Caddy builds the
// admin endpoint of a new config before that config's apps, and the new
// config may fail to load.
type api struct {
	logger *zap.Logger
	// origins are the origins, besides the request's own, that may send
	// state-changing requests: "scheme://host[:port]", lower case,
	// without a default port.
	origins []string
	// originHint ends the message of a request refused for its origin.
	originHint string
}

// params are what an endpoint learns from the path.
type params struct {
	id     int64
	connID uint64
	// mount is the path prefix in front of the API (see api.serve).
	mount string
}

// endpoint answers one method of one route. It writes a successful
// response itself and returns an error for the caller to write, an
// *apiError or an error of the streams package.
type endpoint func(a *api, w http.ResponseWriter, r *http.Request, p params) error

// route is what a path leads to: an endpoint per method.
type route map[string]endpoint

// methodOrder is the order of methods in an Allow header.
var methodOrder = []string{http.MethodGet, http.MethodHead, http.MethodPost, http.MethodPut, http.MethodPatch, http.MethodDelete, http.MethodOptions}

// allow is the route's Allow header: its methods, HEAD with GET, and
// OPTIONS.
func (rt route) allow() string {
	var out []string
	for _, m := range methodOrder {
		_, ok := rt[m]
		switch m {
		case http.MethodHead:
			_, ok = rt[http.MethodGet]
		case http.MethodOptions:
			ok = true
		}
		if ok {
			out = append(out, m)
		}
	}
	return strings.Join(out, ", ")
}

var (
	collectionRoute = route{http.MethodGet: (*api).listHosts, http.MethodPost: (*api).createHost}
	statsRoute      = route{http.MethodGet: (*api).stats}
	validateRoute   = route{http.MethodPost: (*api).validatePort}
	hostRoute       = route{http.MethodGet: (*api).getHost, http.MethodPut: (*api).updateHost, http.MethodPatch: (*api).patchHost, http.MethodDelete: (*api).deleteHost}
	connLogRoute    = route{http.MethodGet: (*api).connectionLog}
	activeRoute     = route{http.MethodGet: (*api).activeConnections}
	activeConnRoute = route{http.MethodDelete: (*api).closeConnection}
	clusterRoute    = route{http.MethodGet: (*api).cluster}
	historyRoute    = route{http.MethodGet: (*api).history}
	auditRoute      = route{http.MethodGet: (*api).audit}
)

// match finds the route of an API path (one isAPIPath accepts).
func match(path string) (route, params, error) {
	var p params
	if underPath(path, certsPath) {
		return matchCerts(path)
	}
	if underPath(path, clusterPath) {
		if path != clusterPath {
			return nil, p, notFoundPath(path)
		}
		return clusterRoute, p, nil
	}
	if underPath(path, auditPath) {
		if path != auditPath {
			return nil, p, notFoundPath(path)
		}
		return auditRoute, p, nil
	}
	sub := strings.TrimPrefix(path, basePath)
	if sub == "" || sub == "/" {
		return collectionRoute, p, nil
	}
	segs := strings.Split(sub[1:], "/")
	switch segs[0] {
	case "stats":
		if len(segs) == 1 {
			return statsRoute, p, nil
		}
		return nil, p, notFoundPath(path)
	case "validate-port":
		if len(segs) == 1 {
			return validateRoute, p, nil
		}
		return nil, p, notFoundPath(path)
	}
	id, ok := parseID(segs[0])
	if !ok {
		return nil, p, &apiError{Status: http.StatusNotFound,
			Message: "no such endpoint: " + strconv.Quote(path) + ": a stream id is a positive integer, e.g. " + basePath + "/3"}
	}
	p.id = id
	switch {
	case len(segs) == 1:
		return hostRoute, p, nil
	case len(segs) == 2 && segs[1] == "connections":
		return connLogRoute, p, nil
	case len(segs) == 2 && segs[1] == "history":
		return historyRoute, p, nil
	case len(segs) == 2 && segs[1] == "active":
		return activeRoute, p, nil
	case len(segs) == 3 && segs[1] == "active":
		cid, err := strconv.ParseUint(segs[2], 10, 64)
		if err != nil || cid == 0 || !allDigits(segs[2]) {
			return nil, p, &apiError{Status: http.StatusNotFound,
				Message: "no such endpoint: " + strconv.Quote(path) + ": a connection id is a positive integer, as GET " + basePath + "/" + segs[0] + "/active lists them"}
		}
		p.connID = cid
		return activeConnRoute, p, nil
	}
	return nil, p, notFoundPath(path)
}

func notFoundPath(path string) *apiError {
	return &apiError{Status: http.StatusNotFound, Message: "no such endpoint: " + strconv.Quote(path)}
}

// parseID parses a stream id: a positive decimal integer.
func parseID(s string) (int64, bool) {
	if !allDigits(s) {
		return 0, false
	}
	id, err := strconv.ParseInt(s, 10, 64)
	return id, err == nil && id > 0
}

// parseBefore reads a paged list's before parameter: the next_before of
// the previous page.
func parseBefore(name, v string) (int64, error) {
	id, ok := parseID(v)
	if !ok {
		return 0, fieldError(name, v, fmt.Sprintf("before %q: must be a positive integer, an entry id (the next_before of the previous page)", v))
	}
	return id, nil
}

func allDigits(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// serve answers one request to an API path. mount is the path prefix in
// front of the API that was stripped before the request got here (it goes
// into Location headers); "" on the admin endpoint.
func (a *api) serve(w http.ResponseWriter, r *http.Request, mount string) {
	listed := a.allowListed(w, r)
	rt, p, err := match(r.URL.Path)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	if listed && preflight(w, r, rt.allow()) {
		return
	}
	method := r.Method
	if method == http.MethodOptions {
		if _, ok := rt[http.MethodPatch]; ok {
			w.Header().Set("Accept-Patch", acceptPatch)
		}
		w.Header().Set("Allow", rt.allow())
		w.WriteHeader(http.StatusNoContent)
		return
	}
	if method == http.MethodHead {
		method = http.MethodGet
	}
	ep, ok := rt[method]
	if !ok {
		a.fail(w, r, &apiError{Status: http.StatusMethodNotAllowed, allow: rt.allow(),
			Message: "method " + r.Method + " not allowed on " + r.URL.Path + "; allowed: " + rt.allow()})
		return
	}
	if method != http.MethodGet {
		if err := tooEarly(r); err != nil {
			a.fail(w, r, err)
			return
		}
		if err := a.checkOrigin(r); err != nil {
			a.fail(w, r, err)
			return
		}
		if method != http.MethodDelete {
			if err := requireJSON(r); err != nil {
				a.fail(w, r, err)
				return
			}
		}
	}
	p.mount = mount
	if method != http.MethodGet {
		// The writes it leads to store who asked in the audit trail.
		r = r.WithContext(storage.WithAudit(r.Context(), storage.AuditSource{Actor: actor(r), Remote: r.RemoteAddr}))
	}
	if err := ep(a, w, r, p); err != nil {
		a.fail(w, r, err)
	}
}

// fail writes err as a JSON error response.
func (a *api) fail(w http.ResponseWriter, r *http.Request, err error) {
	e := redactError(toAPIError(err))
	if e.allow != "" {
		w.Header().Set("Allow", e.allow)
	}
	if e.Status == http.StatusUnsupportedMediaType && r.Method == http.MethodPatch {
		w.Header().Set("Accept-Patch", acceptPatch)
	}
	// No streams app is running while a config starts or is replaced:
	// the client is told to try again, and nothing is wrong with Aegis.
	if e.Status >= 500 && !errors.Is(err, spec.ErrNotRunning) {
		a.log().Error("streams API request failed", zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.Int("status", e.Status), zap.String("error", certcheck.Redact(err.Error())))
	} else {
		a.log().Debug("streams API request refused", zap.String("method", r.Method), zap.String("path", r.URL.Path),
			zap.Int("status", e.Status), zap.String("error", e.Message))
	}
	writeJSON(w, e.Status, e)
}

func (a *api) log() *zap.Logger {
	if a.logger == nil {
		return zap.NewNop()
	}
	return a.logger
}

// ---- endpoints ----

func (a *api) listHosts(w http.ResponseWriter, r *http.Request, _ params) error {
	hosts := []spec.HostStatus{}
	if app := streams.Running(); app != nil {
		hosts = app.HostStatuses()
	}
	writeJSON(w, http.StatusOK, hosts)
	return nil
}

// nodeStatus is a stats row of GET stats?node=all: the node's name and
// its stream's status.
type nodeStatus struct {
	Node string `json:"node"`
	spec.Status
}

func (a *api) stats(w http.ResponseWriter, r *http.Request, _ params) error {
	node, err := statsNode(r.URL.Query())
	if err != nil {
		return err
	}
	app := streams.Running()
	if node == "" {
		stats := []spec.Status{}
		if app != nil {
			stats = app.Statuses()
		}
		writeJSON(w, http.StatusOK, stats)
		return nil
	}
	if app == nil {
		return spec.ErrNotRunning
	}
	nodes, err := app.ClusterStats(r.Context())
	if err != nil {
		return err
	}
	rows := []nodeStatus{}
	found := node == "all"
	for _, n := range nodes {
		if node != "all" && n.Node != node {
			continue
		}
		found = true
		for _, s := range n.Stats {
			rows = append(rows, nodeStatus{Node: n.Node, Status: s})
		}
	}
	if !found {
		return fieldError("node", node, "node "+strconv.Quote(node)+": no such node; GET "+clusterPath+" lists them, and node=all returns every node's rows")
	}
	writeJSON(w, http.StatusOK, rows)
	return nil
}

// statsNode reads the stats' query: node, a node's name or "all".
func statsNode(q url.Values) (string, error) {
	for name, vals := range q {
		if name != "node" {
			return "", fieldError(name, vals[0], fmt.Sprintf("unknown query parameter %q; the parameter is: node (a node's name, or all)", name))
		}
		if len(vals) > 1 {
			return "", fieldError(name, vals[0], fmt.Sprintf("query parameter %s is given %d times; give it once", name, len(vals)))
		}
		if vals[0] == "" {
			return "", fieldError(name, "", "node: empty; give a node's name, or all")
		}
	}
	return q.Get("node"), nil
}

func (a *api) cluster(w http.ResponseWriter, r *http.Request, _ params) error {
	if len(r.URL.Query()) > 0 {
		for name, vals := range r.URL.Query() {
			return fieldError(name, vals[0], fmt.Sprintf("unknown query parameter %q; %s takes none", name, clusterPath))
		}
	}
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	writeJSON(w, http.StatusOK, app.ClusterView(r.Context()))
	return nil
}

func (a *api) createHost(w http.ResponseWriter, r *http.Request, p params) error {
	s, _, err := readStream(r)
	if err != nil {
		return err
	}
	hs, err := streams.CreateHost(r.Context(), s)
	if err != nil {
		e := toAPIError(err)
		if errors.Is(err, spec.ErrConflict) && s.ID != 0 {
			e.Field, e.Value = "id", s.ID
			e.Errors = []fieldProblem{{Field: "id", Value: s.ID, Message: e.Message}}
		}
		return e
	}
	w.Header().Set("Location", p.mount+basePath+"/"+strconv.FormatInt(hs.ID, 10))
	writeWritten(w, http.StatusCreated, hs)
	return nil
}

// written is the answer of a write to a stream: the stream as GET shows
// it, and warnings about its settings that do not stop it from working as
// asked (a privileged or well-known port, health checks on UDP), also for
// a disabled stream; Caddy logs them when the stream starts.
type written struct {
	spec.HostStatus
	// Warnings are never null: [] when there are none.
	Warnings []string `json:"warnings"`
}

// writeWritten answers a write to a stream: its ETag, and the stream with
// its warnings.
func writeWritten(w http.ResponseWriter, status int, hs spec.HostStatus) {
	out := written{HostStatus: hs, Warnings: hs.Stream.Warnings()}
	if out.Warnings == nil {
		out.Warnings = []string{}
	}
	setETag(w, hs)
	writeJSON(w, status, out)
}

func (a *api) getHost(w http.ResponseWriter, r *http.Request, p params) error {
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	hs, err := app.HostStatus(p.id)
	if err != nil {
		return err
	}
	setETag(w, hs)
	writeJSON(w, http.StatusOK, hs)
	return nil
}

func (a *api) updateHost(w http.ResponseWriter, r *http.Request, p params) error {
	s, keys, err := readStream(r)
	if err != nil {
		return err
	}
	if s.ID != 0 && s.ID != p.id {
		return fieldError("id", s.ID, "id "+strconv.FormatInt(s.ID, 10)+": does not match the id "+
			strconv.FormatInt(p.id, 10)+" in the path; the id cannot change (leave it out, or send the same)")
	}
	pre, err := ifMatch(r, p.id)
	if err != nil {
		return err
	}
	// A PUT is the whole stream: a required setting it leaves out is
	// named as missing, with the stored stream's name.
	hs, err := streams.UpdateHostFunc(r.Context(), p.id, func(cur spec.Stream) (spec.Stream, error) {
		return s, missingRequired(keys, cur)
	}, pre...)
	if err != nil {
		return err
	}
	writeWritten(w, http.StatusOK, hs)
	return nil
}

// patchHost changes the settings a JSON merge patch (RFC 7396) names and
// keeps the others: {"enabled": false} disables a stream, {"notes": null}
// takes notes back to its default. The patch is applied to the stream as
// it is when the write happens, and the result checked as a PUT's body.
func (a *api) patchHost(w http.ResponseWriter, r *http.Request, p params) error {
	patch, err := readPatch(r)
	if err != nil {
		return err
	}
	pre, err := ifMatch(r, p.id)
	if err != nil {
		return err
	}
	hs, err := streams.UpdateHostFunc(r.Context(), p.id, func(cur spec.Stream) (spec.Stream, error) {
		return patchStream(cur, patch)
	}, pre...)
	if err != nil {
		return err
	}
	writeWritten(w, http.StatusOK, hs)
	return nil
}

func (a *api) deleteHost(w http.ResponseWriter, r *http.Request, p params) error {
	pre, err := ifMatch(r, p.id)
	if err != nil {
		return err
	}
	if err := streams.DeleteHost(r.Context(), p.id, pre...); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// portCheckResponse is the answer of POST validate-port.
type portCheckResponse struct {
	Valid    bool           `json:"valid"`
	Errors   []fieldProblem `json:"errors"`
	Warnings []string       `json:"warnings"`
}

func (a *api) validatePort(w http.ResponseWriter, r *http.Request, _ params) error {
	var pc spec.PortCheck
	if err := readJSON(r, &pc, portCheckFields, nil); err != nil {
		return err
	}
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	res := app.ValidatePort(pc)
	out := portCheckResponse{Valid: res.Valid, Errors: []fieldProblem{}, Warnings: res.Warnings}
	for _, fe := range res.Errors {
		out.Errors = append(out.Errors, problemOf(fe))
	}
	if out.Warnings == nil {
		out.Warnings = []string{}
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// connLogPage is one page of a stream's connection log.
type connLogPage struct {
	// Entries are newest first.
	Entries []storage.ConnLog `json:"entries"`
	// NextBefore is the before parameter of the next (older) page, or
	// null when this page is the last.
	NextBefore *int64 `json:"next_before"`
}

func (a *api) connectionLog(w http.ResponseWriter, r *http.Request, p params) error {
	cq, err := parseConnLogQuery(r.URL.Query())
	if err != nil {
		return err
	}
	q := cq.ConnLogQuery
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	entries, err := app.ConnectionLog(r.Context(), p.id, q)
	if err != nil {
		return err
	}
	if cq.csv {
		writeConnLogCSV(w, p.id, entries)
		return nil
	}
	page := connLogPage{Entries: entries}
	page.NextBefore, err = nextBefore(entries, q.Limit, func(e storage.ConnLog) int64 { return e.ID },
		func(before int64) (bool, error) {
			next := q
			next.Limit, next.Before = 1, before
			more, err := app.ConnectionLog(r.Context(), p.id, next)
			return len(more) > 0, err
		})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, page)
	return nil
}

// nextBefore is a page's next_before: the id of its last entry when the
// page is full (limit entries) and older asks that an entry older than it
// matches the same filters; else nil, the last page.
func nextBefore[E any](entries []E, limit int, id func(E) int64, older func(before int64) (bool, error)) (*int64, error) {
	if len(entries) == 0 || len(entries) < limit {
		return nil, nil
	}
	last := id(entries[len(entries)-1])
	more, err := older(last)
	if err != nil || !more {
		return nil, err
	}
	return &last, nil
}

func (a *api) activeConnections(w http.ResponseWriter, r *http.Request, p params) error {
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	conns, err := app.ActiveConnections(p.id)
	if err != nil {
		return err
	}
	if conns == nil {
		conns = []spec.ActiveConn{}
	}
	writeJSON(w, http.StatusOK, conns)
	return nil
}

func (a *api) closeConnection(w http.ResponseWriter, r *http.Request, p params) error {
	app := streams.Running()
	if app == nil {
		return spec.ErrNotRunning
	}
	if err := app.CloseConnection(p.id, p.connID); err != nil {
		return err
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}
