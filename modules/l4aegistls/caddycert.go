package l4aegistls

import (
	"crypto/tls"
	"errors"
	"fmt"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddytls"
)

// CaddyCert is a CertSource that serves a certificate from Caddy's
// certificate cache (the tls app's), as a Caddy site would: by SNI, or
// the default name's without one, among the certificates with the given
// tags if any. It keeps the last one served.
type CaddyCert struct {
	cfg  *tls.Config
	last atomic.Pointer[tls.Certificate]
}

// NewCaddyCert returns a CaddyCert for defaultSNI and tags (either may be
// empty). It loads Caddy's tls app, so ctx must be provisioning.
func NewCaddyCert(ctx caddy.Context, defaultSNI string, tags []string) (*CaddyCert, error) {
	cp := caddytls.ConnectionPolicies{&caddytls.ConnectionPolicy{DefaultSNI: defaultSNI}}
	if len(tags) > 0 {
		cp[0].CertSelection = &caddytls.CustomCertSelectionPolicy{AnyTag: tags}
	}
	if err := cp.Provision(ctx); err != nil {
		return nil, fmt.Errorf("TLS connection policy for %s: %v", defaultSNI, err)
	}
	return &CaddyCert{cfg: cp.TLSConfig(ctx)}, nil
}

// GetCertificate implements CertSource.
func (c *CaddyCert) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	cfg, err := c.cfg.GetConfigForClient(hello)
	if err != nil {
		return nil, err
	}
	if cfg == nil || cfg.GetCertificate == nil {
		return nil, errors.New("caddy: no certificate for this connection")
	}
	cert, err := cfg.GetCertificate(hello)
	if err == nil && cert != nil {
		c.last.Store(cert)
	}
	return cert, err
}

// Last returns the certificate served last, or nil.
func (c *CaddyCert) Last() *tls.Certificate { return c.last.Load() }

// Interface guards
var _ CertSource = (*CaddyCert)(nil)
