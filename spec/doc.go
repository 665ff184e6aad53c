// Package spec is the schema of Aegis Streams: a stream's settings (Stream)
// with their defaults, validation (Validate, Warnings, FieldError) and the
// "did you mean" help for unknown keys; the types the API returns (status,
// certificates, port checks); and the errors its writes return.
//
// It imports no Caddy package, so that storage, the admin API, the UI's
// API and tools such as cmd/aegis-bench share one description of a stream
// without importing the Caddy app. It sits at the top of the module, not
// under modules/, because it is not a Caddy module: storage (also at the
// top) depends on it, and modules/streams, admin and the bench do.
package spec
