package l4aegistls

import (
	"crypto/tls"
	"errors"
	"sync/atomic"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// CertSource gives the certificate for a TLS handshake. Its
// GetCertificate is called on every handshake, from the connection's
// goroutine, so it must be safe for concurrent use and must not block.
type CertSource = streamstate.CertSource

// The certificate registry maps a cert_id to its source. It is kept with
// the rest of the streams' runtime state, in streamstate.

// Register makes src the certificate source of id, replacing any other; the
// next handshake of a handler with that cert_id uses it. Connections
// already established keep the certificate they were given. A nil src
// unregisters id.
func Register(id int64, src CertSource) { streamstate.RegisterCert(id, src) }

// Unregister removes the certificate source of id: handshakes of a handler
// with that cert_id fail until one is registered again.
func Unregister(id int64) { streamstate.RegisterCert(id, nil) }

// Lookup returns the certificate source registered as id, or nil.
func Lookup(id int64) CertSource { return streamstate.LookupCert(id) }

// errNoCertStored is StaticCert's answer while it holds no certificate.
var errNoCertStored = errors.New("no certificate stored")

// StaticCert is a CertSource that gives one certificate, whatever the
// client asks for, and that can be replaced at any time: Store takes effect
// for the next handshake, without touching listeners or established
// connections.
type StaticCert struct {
	cert atomic.Pointer[tls.Certificate]
}

// NewStaticCert returns a StaticCert that gives c.
func NewStaticCert(c *tls.Certificate) *StaticCert {
	s := new(StaticCert)
	s.cert.Store(c)
	return s
}

// Store replaces the certificate. c must not be changed afterwards; nil
// makes handshakes fail until another is stored.
func (s *StaticCert) Store(c *tls.Certificate) { s.cert.Store(c) }

// Load returns the current certificate, or nil.
func (s *StaticCert) Load() *tls.Certificate { return s.cert.Load() }

// GetCertificate returns the current certificate.
func (s *StaticCert) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := s.cert.Load(); c != nil {
		return c, nil
	}
	return nil, errNoCertStored
}

// Interface guards
var _ CertSource = (*StaticCert)(nil)
