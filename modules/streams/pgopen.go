package streams

import (
	"context"

	"github.com/aegis-proxy/caddy-aegis/storage"
)

// openPostgres opens the PostgreSQL store of node.
func openPostgres(ctx context.Context, dsn string, key []byte, node string) (storage.Cluster, error) {
	return storage.OpenPostgres(ctx, dsn, storage.PostgresOptions{Key: key, Node: node})
}
