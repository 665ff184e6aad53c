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
func OpenStore(sc *StorageConfig) (storage.Store, []byte, error) { return sc.openStore("test", false) }

// HoldWrites takes the lock of API writes, which the follower also takes
// to apply other nodes' changes, and returns its release: a test stops the
// follower with it while another node writes.
func HoldWrites() (release func()) {
	writeMu.Lock()
	return writeMu.Unlock
}
