package streams

import "github.com/aegis-proxy/caddy-aegis/storage"

// What the tests of package streams_test use of the `aegis streams`
// commands' work.
var (
	ExportStore     = exportStore
	DecodeExport    = decodeExport
	ImportConflicts = importConflicts
	ImportStore     = importStore
)

// OpenStore opens the storage sc names as the app and the commands do.
func OpenStore(sc *StorageConfig) (*storage.SQLite, []byte, error) { return sc.openStore(false) }
