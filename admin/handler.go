package admin

import (
	"fmt"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/aegis-proxy/caddy-aegis/ui"
)

func init() {
	caddy.RegisterModule(Handler{})
	httpcaddyfile.RegisterHandlerDirective("streams_admin", parseCaddyfile)
}

// Handler is the `http.handlers.streams_admin` module: the streams REST
// API and the browser UI as an HTTP handler, so that a Caddy site can
// serve them with its own TLS, authentication (e.g. basic_auth) and logs.
// It answers requests for /api/v1/streams and /api/v1/certificates and
// below them, and GET and HEAD requests for the UI's files at its mount
// (/ for the UI's page, /app.js, /style.css, ...), also after a path
// prefix was stripped in front of them (handle_path); other requests go to
// the next handler.
type Handler struct {
	// AllowedOrigins are origins ("https://ui.example.com",
	// "http://localhost:3000") that may send POST, PUT, PATCH and DELETE requests
	// besides the site's own origin. Default: none.
	AllowedOrigins []string `json:"allowed_origins,omitempty"`

	// NoUI turns the web UI off: only the API is answered, and the UI's
	// paths (/, /app.js, ...) go to the next handler. Default: false.
	NoUI bool `json:"no_ui,omitempty"`

	api api
	ui  *ui.Handler
}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.streams_admin",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision checks and normalizes the allowed origins.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.api = api{
		logger:     ctx.Logger(),
		originHint: "; add it to allowed_origins of streams_admin to allow it",
	}
	if !h.NoUI {
		h.ui = ui.New()
	}
	for _, o := range h.AllowedOrigins {
		norm, err := normalizeOrigin(o)
		if err != nil {
			return fmt.Errorf("allowed_origins: %q: %v", o, err)
		}
		h.api.origins = append(h.api.origins, norm)
	}
	return nil
}

// ServeHTTP answers API requests and the UI's GET and HEAD requests, and
// hands others to next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	if isAPIPath(r.URL.Path) {
		h.api.serve(w, r, mountPrefix(r))
		return nil
	}
	if (r.Method == http.MethodGet || r.Method == http.MethodHead) && h.ui != nil && h.ui.Has(r.URL.Path) {
		h.ui.ServeHTTP(w, r)
		return nil
	}
	return next.ServeHTTP(w, r)
}

// mountPrefix is the path prefix stripped in front of the API path (as
// handle_path does), found by comparing the path with the original
// request's; "" when none was or it cannot be told.
func mountPrefix(r *http.Request) string {
	orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request)
	if !ok || orig.URL == nil {
		return ""
	}
	if prefix, ok := strings.CutSuffix(orig.URL.Path, r.URL.Path); ok {
		return prefix
	}
	return ""
}

// parseCaddyfile sets up the handler from the streams_admin directive.
func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var sa Handler
	err := sa.UnmarshalCaddyfile(h.Dispenser)
	return &sa, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	streams_admin [<matcher>] {
//		allowed_origins <origin...>
//		ui off
//	}
//
// The directive has no default order: put it in a route block, or give it
// one with the order global option (order streams_admin before respond);
// handle and handle_path blocks need the order too.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the directive's name
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := false
	for d.NextBlock(0) {
		switch opt := d.Val(); opt {
		case "allowed_origins":
			if seen {
				return d.Errf("streams_admin: duplicate option 'allowed_origins'")
			}
			seen = true
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			h.AllowedOrigins = append(h.AllowedOrigins, args...)
			if d.NextBlock(1) {
				return d.Errf("streams_admin: allowed_origins takes no block")
			}
		case "ui":
			if !d.NextArg() || d.Val() != "off" || d.NextArg() {
				return d.Errf("streams_admin: ui takes one word, off (the UI is on by default)")
			}
			if d.NextBlock(1) {
				return d.Errf("streams_admin: ui takes no block")
			}
			h.NoUI = true
		default:
			return d.Errf("streams_admin: unknown option '%s' (want allowed_origins or ui off)", opt)
		}
	}
	return nil
}

// Interface guards
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ caddyfile.Unmarshaler       = (*Handler)(nil)
)
