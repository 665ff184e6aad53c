package admin

import (
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"

	"github.com/aegis-proxy/caddy-aegis/modules/streams"
	"github.com/aegis-proxy/caddy-aegis/ui"
)

// uiPath is where the admin endpoint serves the browser UI. The API is
// also answered below it (/ui/api/v1/...), so that the UI finds it next
// to itself wherever it is mounted.
const uiPath = "/ui"

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI is the `admin.api.streams` module: the streams REST API and
// the browser UI (/ui/) on Caddy's admin endpoint. Caddy's own Host and
// Origin checks of the admin endpoint (its `origins` setting) run before
// it.
//
// Caddy refuses a browser's request (one with a Sec-Fetch-Mode header)
// whose Origin or Referer does not name an allowed origin. The UI's own
// requests carry a same-origin Referer, but a browser opening /ui/ from
// its address bar or a bookmark sends neither header: to allow that, the
// admin origins must list the empty origin besides the endpoint's own
// (`origins localhost:2019 127.0.0.1:2019 [::1]:2019 ""`). A Caddy site
// with the streams_admin handler has no such check.
type adminAPI struct {
	api api
	ui  *ui.Handler
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
		// Caddy provisions admin modules with no module in ctx: named
		// explicitly, or the API would log on the root logger.
		logger:     ctx.Logger(a),
		originHint: "; use the admin endpoint from its own origin, or serve the API from a Caddy site with the streams_admin handler and its allowed_origins",
	}
	a.ui = ui.New()
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
		{Pattern: clusterPath, Handler: h},
		{Pattern: clusterPath + "/", Handler: h},
		{Pattern: auditPath, Handler: h},
		{Pattern: auditPath + "/", Handler: h},
		{Pattern: uiPath, Handler: caddy.AdminHandlerFunc(a.redirectUI)},
		{Pattern: uiPath + "/", Handler: caddy.AdminHandlerFunc(a.serveUI)},
	}
}

// serveHTTP writes every response itself, errors included, so that they
// carry the API's error fields; it never returns an error for Caddy to
// write.
func (a *adminAPI) serveHTTP(w http.ResponseWriter, r *http.Request) error {
	// The heartbeat tells the other nodes where this one's API is.
	streams.NoteAdminAddress(r.Host)
	a.api.serve(w, r, "")
	return nil
}

// redirectUI sends /ui to /ui/, where the UI's relative links work.
func (a *adminAPI) redirectUI(w http.ResponseWriter, r *http.Request) error {
	target := uiPath + "/"
	if r.URL.RawQuery != "" {
		target += "?" + r.URL.RawQuery
	}
	ui.SetHeaders(w.Header())
	http.Redirect(w, r, target, http.StatusMovedPermanently)
	return nil
}

// serveUI answers below /ui/: the API at /ui/api/v1/..., the UI's files
// (GET and HEAD) for the rest.
func (a *adminAPI) serveUI(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, uiPath)
	r2 := r.Clone(r.Context())
	r2.URL.Path, r2.URL.RawPath = rest, ""
	if isAPIPath(rest) {
		a.api.serve(w, r2, uiPath)
		return nil
	}
	a.ui.ServeHTTP(w, r2)
	return nil
}

// Interface guards
var (
	_ caddy.AdminRouter = (*adminAPI)(nil)
	_ caddy.Provisioner = (*adminAPI)(nil)
)
