package streamstate

import (
	"crypto/tls"
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

// certs maps a certificate id (aegis_tls's cert_id) to its source. It sits
// beside the streams' pool rather than in one stream's state because one
// stored certificate serves every stream that names it. Handshakes read it
// without a lock: the map behind the pointer is never changed once
// published, and writers (rare: a certificate added or removed) copy it
// under mu.
var certs struct {
	mu sync.Mutex
	m  atomic.Pointer[map[int64]CertSource]
}

// RegisterCert makes src the certificate source of id, replacing any
// other; nil unregisters id.
func RegisterCert(id int64, src CertSource) {
	certs.mu.Lock()
	defer certs.mu.Unlock()
	var m map[int64]CertSource
	if old := certs.m.Load(); old != nil {
		if src == nil {
			if _, ok := (*old)[id]; !ok {
				return
			}
		}
		m = maps.Clone(*old)
	}
	if m == nil {
		m = make(map[int64]CertSource, 1)
	}
	if src == nil {
		delete(m, id)
	} else {
		m[id] = src
	}
	certs.m.Store(&m)
}

// LookupCert returns the certificate source registered as id, or nil.
func LookupCert(id int64) CertSource {
	if m := certs.m.Load(); m != nil {
		return (*m)[id]
	}
	return nil
}
