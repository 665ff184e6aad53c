package admin

import (
	"net/http"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the `admin.api.streams` module: the streams REST API on
// Caddy's admin endpoint. Caddy's own Host and Origin checks of the admin
// endpoint (its `origins` setting) run before it.
type adminAPI struct {
	api api
}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.streams",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Provision sets up the module; Caddy calls it with no config.
func (a *adminAPI) Provision(ctx caddy.Context) error {
	a.api = api{
		logger:     ctx.Logger(),
		originHint: "; use the admin endpoint from its own origin, or serve the API from a Caddy site with the streams_admin handler and its allowed_origins",
	}
	return nil
}

// Routes returns the API's routes.
func (a *adminAPI) Routes() []caddy.AdminRoute {
	h := caddy.AdminHandlerFunc(a.serveHTTP)
	return []caddy.AdminRoute{
		{Pattern: basePath, Handler: h},
		{Pattern: basePath + "/", Handler: h},
		{Pattern: certsPath, Handler: h},
		{Pattern: certsPath + "/", Handler: h},
	}
}

// serveHTTP writes every response itself, errors included, so that they
// carry the API's error fields; it never returns an error for Caddy to
// write.
func (a *adminAPI) serveHTTP(w http.ResponseWriter, r *http.Request) error {
	a.api.serve(w, r, "")
	return nil
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
	_ caddy.Provisioner = (*adminAPI)(nil)
)
