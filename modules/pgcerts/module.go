// Package pgcerts is the Caddy storage module caddy.storage.aegis_postgres:
// certmagic's Storage and Locker on PostgreSQL, so that Aegis nodes that
// share one database share the certificates Caddy obtains (ACME or its
// internal CA): one node obtains a certificate, under a lock every node
// respects, and every node serves it.
package pgcerts

import (
	"errors"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
)

func init() {
	caddy.RegisterModule(Storage{})
}

// Storage keeps Caddy's certificates, keys, ACME accounts and locks in a
// PostgreSQL database, in two tables of its own (aegis_certmagic_data and
// aegis_certmagic_locks), created by the first node that needs them.
//
// JSON: {"storage": {"module": "aegis_postgres", "dsn": "postgres://…"}}.
type Storage struct {
	// DSN is the database: a postgres:// URL or key=value settings, as
	// libpq takes them. Placeholders such as {env.AEGIS_PG_DSN} are
	// replaced. Required.
	DSN string `json:"dsn,omitempty"`

	key   string // the DSN with placeholders replaced, its key in stores
	store *Store
}

// stores shares one Store per database between the configs that use it:
// a reload overlaps two, and locks held across it stay held.
var stores = caddy.NewUsagePool()

// CaddyModule returns the Caddy module information.
func (Storage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.aegis_postgres",
		New: func() caddy.Module { return new(Storage) },
	}
}

// Provision replaces the DSN's placeholders and opens (or joins) its
// Store. It does not connect: the database may be down at start.
func (s *Storage) Provision(ctx caddy.Context) error {
	dsn, err := caddy.NewReplacer().ReplaceOrErr(s.DSN, true, true)
	if err != nil {
		return fmt.Errorf("aegis_postgres storage: dsn: %v", err)
	}
	if dsn == "" {
		return errors.New("aegis_postgres storage: dsn: missing; set it to the database's URL, e.g. dsn {env.AEGIS_PG_DSN}")
	}
	logger := ctx.Logger()
	v, _, err := stores.LoadOrNew(dsn, func() (caddy.Destructor, error) {
		st, err := Open(dsn, logger)
		if err != nil {
			return nil, fmt.Errorf("aegis_postgres storage: %v", err)
		}
		return destructor{st}, nil
	})
	if err != nil {
		return err
	}
	s.key, s.store = dsn, v.(destructor).Store
	return nil
}

type destructor struct{ *Store }

func (d destructor) Destruct() error { d.Close(); return nil }

// Cleanup lets go of the Store; the last config using it closes it.
func (s *Storage) Cleanup() error {
	if s.store != nil {
		_, _ = stores.Delete(s.key)
		s.store = nil
	}
	return nil
}

// CertMagicStorage returns the Store.
func (s *Storage) CertMagicStorage() (certmagic.Storage, error) {
	if s.store == nil {
		return nil, errors.New("aegis_postgres storage: not provisioned")
	}
	return s.store, nil
}

// UnmarshalCaddyfile sets up the storage from Caddyfile tokens, in the
// global options:
//
//	storage aegis_postgres [<dsn>] {
//		dsn <dsn>
//	}
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // the module's name
	if d.NextArg() {
		s.DSN = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "dsn":
			if s.DSN != "" {
				return d.Err("aegis_postgres: dsn given twice")
			}
			if !d.NextArg() {
				return d.ArgErr()
			}
			s.DSN = d.Val()
			if d.NextArg() {
				return d.ArgErr()
			}
		default:
			return d.Errf("aegis_postgres: unknown option '%s' (want dsn)", d.Val())
		}
	}
	if s.DSN == "" {
		return d.Err("aegis_postgres: missing dsn")
	}
	return nil
}

// Interface guards.
var (
	_ caddy.Provisioner      = (*Storage)(nil)
	_ caddy.CleanerUpper     = (*Storage)(nil)
	_ caddy.StorageConverter = (*Storage)(nil)
	_ caddyfile.Unmarshaler  = (*Storage)(nil)
)
