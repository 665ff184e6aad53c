package streams

import (
	"context"
	"errors"

	"github.com/aegis-proxy/caddy-aegis/storage"
)

// openPostgres opens the PostgreSQL store of node.
var openPostgres = func(ctx context.Context, dsn string, key []byte, node string) (storage.Cluster, error) {
	return nil, errors.New("storage postgres: not built in yet")
}
