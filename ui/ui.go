// Package ui is the browser UI of Aegis Streams: plain HTML, CSS and
// JavaScript modules, embedded in the binary and served as they are (no
// build step, nothing fetched from the network). The admin package serves
// it on Caddy's admin endpoint under /ui/ and at the mount of the
// streams_admin HTTP handler; the UI calls the API relative to its own
// location, at api/v1/.
package ui

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"io/fs"
	"net/http"
	"path"
	"strings"
	"time"
)

//go:embed static
var static embed.FS

// FS returns the UI's files, index.html at its root.
func FS() fs.FS {
	sub, err := fs.Sub(static, "static")
	if err != nil {
		panic("ui: " + err.Error()) // "static" is a valid path: cannot happen
	}
	return sub
}

// Security headers of every response. The pages load only their own
// scripts and styles, fetch only from their own origin and may not be
// framed. The referrer is sent only to the same origin: Caddy's admin
// endpoint refuses a browser's request (one with Sec-Fetch-Mode) that
// names its origin in neither Origin nor Referer, and a same-origin GET
// carries no Origin.
const (
	csp            = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
	referrerPolicy = "same-origin"
)

// contentTypes are the types of the files the UI may hold, by extension.
var contentTypes = map[string]string{
	".html": "text/html; charset=utf-8",
	".js":   "text/javascript; charset=utf-8",
	".mjs":  "text/javascript; charset=utf-8",
	".css":  "text/css; charset=utf-8",
	".svg":  "image/svg+xml",
	".json": "application/json",
	".png":  "image/png",
	".ico":  "image/x-icon",
	".txt":  "text/plain; charset=utf-8",
}

// ContentType returns the Content-Type of a UI file by its name, or ""
// for a type the UI does not serve.
func ContentType(name string) string {
	return contentTypes[strings.ToLower(path.Ext(name))]
}

// file is one UI file, read once.
type file struct {
	data  []byte
	ctype string
	etag  string
}

// Handler serves the UI's files: GET and HEAD of "/" (index.html) and of
// "/<file>", as the request path names them relative to the UI's mount.
// It answers nothing else: the caller decides, with Has, which requests
// are the UI's.
type Handler struct {
	files map[string]*file
}

// New reads the embedded files. Each gets an ETag, a hash of its content,
// so a browser revalidates (Cache-Control: no-cache) without downloading
// an unchanged file again.
func New() *Handler {
	h := &Handler{files: map[string]*file{}}
	err := fs.WalkDir(FS(), ".", func(name string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := fs.ReadFile(FS(), name)
		if err != nil {
			return err
		}
		ct := ContentType(name)
		if ct == "" {
			ct = "application/octet-stream"
		}
		sum := sha256.Sum256(data)
		h.files["/"+name] = &file{data: data, ctype: ct, etag: `"` + hex.EncodeToString(sum[:12]) + `"`}
		return nil
	})
	if err != nil {
		panic("ui: reading the embedded files: " + err.Error()) // embedded: cannot fail
	}
	if idx := h.files["/index.html"]; idx != nil {
		h.files["/"] = idx
	}
	return h
}

// Has reports whether p (a request path relative to the UI's mount) is
// one of the UI's files; "/" is index.html.
func (h *Handler) Has(p string) bool {
	_, ok := h.files[p]
	return ok
}

// Names returns the paths Has accepts, "/" included, for tests and
// listings.
func (h *Handler) Names() []string {
	out := make([]string, 0, len(h.files))
	for p := range h.files {
		out = append(out, p)
	}
	return out
}

// ServeHTTP serves the file r.URL.Path names: 404 for a path that is not
// one of the UI's files (there are no directories and no other files to
// reach), 405 for a method other than GET and HEAD.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	hdr := w.Header()
	SetHeaders(hdr)
	f := h.files[r.URL.Path]
	if f == nil {
		http.Error(w, "not found: "+r.URL.Path+" is not a file of the Aegis Streams UI; open ./ for the UI", http.StatusNotFound)
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		hdr.Set("Allow", "GET, HEAD")
		http.Error(w, "method "+r.Method+" not allowed on a UI file; allowed: GET, HEAD", http.StatusMethodNotAllowed)
		return
	}
	hdr.Set("Content-Type", f.ctype)
	hdr.Set("Cache-Control", "no-cache")
	hdr.Set("ETag", f.etag)
	// ServeContent answers If-None-Match with 304, HEAD without a body,
	// and ranges.
	http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(f.data))
}

// SetHeaders sets the security headers of the UI's responses.
func SetHeaders(h http.Header) {
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", referrerPolicy)
	h.Set("X-Frame-Options", "DENY")
}
