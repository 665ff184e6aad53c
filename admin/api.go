// Package admin serves the Aegis Streams REST API (/api/v1/streams…) on
// Caddy's admin endpoint.
package admin

import (
	"encoding/json"
	"fmt"
	"net/http"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

const basePath = "/api/v1/streams"

// adminAPI is the `admin.api.streams` module: the streams REST API on
// Caddy's admin endpoint.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.streams",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// runningApp returns the streams app of the running config, or nil. It is
// looked up on each request: Caddy builds the admin endpoint of a new config
// before that config's apps, so an app found at provisioning time may belong
// to a config that then fails to load and never runs.
func runningApp() *streams.App {
	app, err := caddy.ActiveContext().AppIfConfigured("streams")
	if err != nil {
		return nil
	}
	a, _ := app.(*streams.App)
	return a
}

// Routes returns the API's routes.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: basePath, Handler: caddy.AdminHandlerFunc(a.handleStreams)},
		{Pattern: basePath + "/", Handler: caddy.AdminHandlerFunc(a.handleStreams)},
	}
}

func (a *adminAPI) handleStreams(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		return caddy.APIError{
			HTTPStatus: http.StatusMethodNotAllowed,
			Err:        fmt.Errorf("method %s not allowed: this API is read-only for now; edit the streams in the Caddy config", r.Method),
		}
	}
	switch r.URL.Path {
	case basePath, basePath + "/":
		hosts := []streams.HostStatus{}
		if app := runningApp(); app != nil {
			hosts = app.HostStatuses()
		}
		return writeJSON(w, hosts)
	case basePath + "/stats":
		stats := []streams.Status{}
		if app := runningApp(); app != nil {
			stats = app.Statuses()
		}
		return writeJSON(w, stats)
	default:
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("no such endpoint: %s", r.URL.Path)}
	}
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	return json.NewEncoder(w).Encode(v)
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
)
