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
type adminAPI struct {
	app *streams.App
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.streams",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision finds the running config's streams app, if it has one.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	app, err := ctx.AppIfConfigured("streams")
	if err == nil {
		a.app = app.(*streams.App)
	}
	return nil
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
		if a.app != nil {
			hosts = a.app.HostStatuses()
		}
		return writeJSON(w, hosts)
	case basePath + "/stats":
		stats := []streams.Status{}
		if a.app != nil {
			stats = a.app.Statuses()
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
	_ caddy.Provisioner = (*adminAPI)(nil)
	_ caddy.AdminRouter = (*adminAPI)(nil)
)
