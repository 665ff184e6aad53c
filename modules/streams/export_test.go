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

// SetCreatedHook makes f run as each stream created through the API is
// stored and bound, before it serves (and before the streams on its port
// move to a port it shares with them).
func SetCreatedHook(f func()) (restore func()) {
	old := createdHook
	createdHook = f
	return func() { createdHook = old }
}
