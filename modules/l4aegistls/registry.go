package l4aegistls

import (
	"crypto/tls"
	"errors"
	"maps"
	"sync"
	"sync/atomic"
)

// CertSource gives the certificate for a TLS handshake. Its
// GetCertificate is called on every handshake, from the connection's
// goroutine, so it must be safe for concurrent use and must not block.
type CertSource interface {
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
}

// The certificate registry maps a cert_id to its source. Handshakes read it
// without a lock: the map behind the pointer is never changed once
// published, and writers (rare: a certificate added or removed) copy it
// under registryMu.
var (
	registryMu sync.Mutex
	registry   atomic.Pointer[map[int64]CertSource]
)

// Register makes src the certificate source of id, replacing any other; the
// next handshake of a handler with that cert_id uses it. Connections
// already established keep the certificate they were given. A nil src
// unregisters id.
func Register(id int64, src CertSource) {
	if src == nil {
		Unregister(id)
		return
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	var m map[int64]CertSource
	if old := registry.Load(); old != nil {
		m = maps.Clone(*old)
	}
	if m == nil {
		m = make(map[int64]CertSource, 1)
	}
	m[id] = src
	registry.Store(&m)
}

// Unregister removes the certificate source of id: handshakes of a handler
// with that cert_id fail until one is registered again.
func Unregister(id int64) {
	registryMu.Lock()
	defer registryMu.Unlock()
	old := registry.Load()
	if old == nil {
		return
	}
	if _, ok := (*old)[id]; !ok {
		return
	}
	m := maps.Clone(*old)
	delete(m, id)
	registry.Store(&m)
}

// Lookup returns the certificate source registered as id, or nil.
func Lookup(id int64) CertSource {
	if m := registry.Load(); m != nil {
		return (*m)[id]
	}
	return nil
}

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
