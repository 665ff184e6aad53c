package l4aegisproxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// UpstreamTLS opens TLS to an upstream, after the PROXY header if one is
// sent (as HAProxy's `server … ssl send-proxy`).
type UpstreamTLS struct {
	// ServerName is sent (SNI) and verified in the upstream's
	// certificate. Default: the upstream's host (an IP address is
	// verified against the certificate's IP addresses, and not sent).
	ServerName string `json:"server_name,omitempty"`

	// CA is the PEM text of the CA certificates the upstream's
	// certificate must chain to. Default: "" (the system's roots).
	CA string `json:"ca,omitempty"`

	// ClientCertID is a certificate of the certificate registry (a stored
	// certificate, with its key) presented to the upstream. Default: 0
	// (none).
	ClientCertID int64 `json:"client_cert_id,omitempty"`

	// InsecureSkipVerify accepts any certificate. Default: false.
	InsecureSkipVerify bool `json:"insecure_skip_verify,omitempty"`
}

// clientConfig is the TLS client config for the upstream whose host is
// host (the name verified unless ServerName is set). Each upstream gets
// its own, with a session cache so that reconnections resume.
func (t *UpstreamTLS) clientConfig(host string) (*tls.Config, error) {
	cfg := &tls.Config{
		ServerName:         host,
		InsecureSkipVerify: t.InsecureSkipVerify,
		MinVersion:         tls.VersionTLS12,
		ClientSessionCache: tls.NewLRUClientSessionCache(64),
	}
	if t.ServerName != "" {
		cfg.ServerName = t.ServerName
	}
	if t.CA != "" {
		pool, err := spec.ParseCAPEM(t.CA)
		if err != nil {
			return nil, fmt.Errorf("upstream_tls_ca: %v", err)
		}
		cfg.RootCAs = pool
	}
	if id := t.ClientCertID; id > 0 {
		// Looked up at each handshake: a replaced certificate applies at
		// once.
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			src := streamstate.LookupCert(id)
			if src == nil {
				return nil, fmt.Errorf("client certificate %d is not loaded", id)
			}
			return src.GetCertificate(&tls.ClientHelloInfo{})
		}
	}
	return cfg, nil
}

// ErrUpstreamTLS marks the error of a failed TLS handshake with the
// upstream; its message starts with "upstream_tls_failed: " and the
// reason (unknown authority, name mismatch, expired, handshake timeout).
var ErrUpstreamTLS = errors.New("upstream_tls_failed")

// handshakeUpstream runs the TLS client handshake on c, the connection to
// one upstream, within timeout. On error c is left to the caller to close.
func handshakeUpstream(ctx context.Context, c net.Conn, cfg *tls.Config, timeout time.Duration) (*tls.Conn, error) {
	tc := tls.Client(c, cfg)
	deadline := time.Now().Add(timeout)
	_ = c.SetDeadline(deadline)
	hctx, cancel := context.WithDeadline(ctx, deadline)
	err := tc.HandshakeContext(hctx)
	cancel()
	_ = c.SetDeadline(time.Time{})
	if err != nil {
		return nil, fmt.Errorf("%w: %s", ErrUpstreamTLS, tlsFailure(err, timeout))
	}
	return tc, nil
}

// tlsFailure says why a handshake with the upstream failed, in words an
// operator can act on, followed by Go's own message.
func tlsFailure(err error, timeout time.Duration) string {
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
	)
	switch {
	case errors.As(err, &unknown):
		return "unknown authority (the certificate is not signed by a CA in upstream_tls_ca or the system's roots): " + err.Error()
	case errors.As(err, &hostname):
		return "name mismatch (the certificate is not for upstream_tls_server_name): " + err.Error()
	case errors.As(err, &invalid) && invalid.Reason == x509.Expired:
		return "expired (or not yet valid): " + err.Error()
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Sprintf("handshake timeout (no handshake within %s)", timeout)
	}
	msg := err.Error()
	if strings.Contains(msg, "first record does not look like a TLS handshake") {
		return "handshake failed (the upstream does not speak TLS on this port): " + msg
	}
	return "handshake failed: " + msg
}
