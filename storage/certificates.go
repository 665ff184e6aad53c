package storage

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// InUseError is the error of DeleteCertificate for a certificate that
// stream hosts use. errors.Is(err, ErrInUse) holds for it; errors.As
// finds the streams. Its message names them, for example
// `certificate 3 is used by streams 1 ("db"), 4 ("mail")`.
type InUseError struct {
	// CertID is the certificate's ID.
	CertID int64

	// StreamIDs are the IDs of the hosts that use it, in order.
	StreamIDs []int64

	// StreamNames are their names, in the same order ("" for a host
	// without a name).
	StreamNames []string
}

func (e *InUseError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "certificate %d is used by stream", e.CertID)
	if len(e.StreamIDs) != 1 {
		b.WriteString("s")
	}
	for i, id := range e.StreamIDs {
		if i > 0 {
			b.WriteString(",")
		}
		fmt.Fprintf(&b, " %d", id)
		if i < len(e.StreamNames) && e.StreamNames[i] != "" {
			fmt.Fprintf(&b, " (%q)", e.StreamNames[i])
		}
	}
	return b.String()
}

// Is reports whether target is ErrInUse.
func (e *InUseError) Is(target error) bool { return target == ErrInUse }

// encodeList stores a list as a JSON array; nil is [].
func encodeList(l []string) (string, error) {
	if len(l) == 0 {
		return "[]", nil
	}
	b, err := json.Marshal(l)
	return string(b), err
}

// decodeList reads a JSON array; an empty one is nil.
func decodeList(s string) ([]string, error) {
	var l []string
	if err := json.Unmarshal([]byte(s), &l); err != nil {
		return nil, err
	}
	if len(l) == 0 {
		return nil, nil
	}
	return l, nil
}

// certColumns are the certificates table's columns in the order scanCert
// reads them; the sealed key is read only by CertificateKey.
const certColumns = `id, name, source, domains, issuer, not_before, not_after,
	certificate_pem, created_at, updated_at`

func scanCert(r rowScanner) (spec.Certificate, error) {
	var (
		c                    spec.Certificate
		domains              string
		notBefore, notAfter  sql.NullInt64
		createdAt, updatedAt sql.NullInt64
	)
	err := r.Scan(&c.ID, &c.Name, &c.Source, &domains, &c.Issuer, &notBefore, &notAfter,
		&c.CertificatePEM, &createdAt, &updatedAt)
	if err != nil {
		return spec.Certificate{}, err
	}
	if c.Domains, err = decodeList(domains); err != nil {
		return spec.Certificate{}, fmt.Errorf("certificate %d: domains: %v", c.ID, err)
	}
	c.NotBefore = jsontime.Of(fromMillis(notBefore))
	c.NotAfter = jsontime.Of(fromMillis(notAfter))
	c.CreatedAt = jsontime.Of(fromMillis(createdAt))
	c.UpdatedAt = jsontime.Of(fromMillis(updatedAt))
	return c, nil
}

// normalizedCert is c as it reads back from the database: its own copy of
// Domains, nil when empty, and times to the millisecond in UTC.
func normalizedCert(c spec.Certificate) spec.Certificate {
	c.Domains = slices.Clip(slices.Clone(c.Domains))
	if len(c.Domains) == 0 {
		c.Domains = nil
	}
	c.NotBefore = jsontime.Of(fromMillis(millis(c.NotBefore.Time)))
	c.NotAfter = jsontime.Of(fromMillis(millis(c.NotAfter.Time)))
	return c
}

// checkCert checks what the store requires of a certificate it writes,
// whatever it was before: a known source, and a chain for a custom
// certificate and none, nor a key, for a managed one.
func (s *core) checkCert(c spec.Certificate, keyPEM []byte) error {
	switch c.Source {
	case spec.SourceCustom:
		if c.CertificatePEM == "" {
			return fmt.Errorf("a custom certificate needs its chain (certificate): %w", ErrInvalid)
		}
		if len(keyPEM) > 0 && s.sealer.aead == nil {
			return ErrNoKey
		}
	case spec.SourceManaged:
		if c.CertificatePEM != "" || len(keyPEM) > 0 {
			return fmt.Errorf("a managed certificate has no stored chain or private key: %w", ErrInvalid)
		}
	default:
		return fmt.Errorf("source %q: must be %q or %q: %w", c.Source, spec.SourceCustom, spec.SourceManaged, ErrInvalid)
	}
	return nil
}

// ListCertificates returns every certificate, ordered by ID.
func (s *core) ListCertificates(ctx context.Context) ([]spec.Certificate, error) {
	var certs []spec.Certificate
	err := s.reads.queryEach(ctx, `SELECT `+certColumns+` FROM certificates ORDER BY id`, nil, func(r rowScanner) error {
		c, err := scanCert(r)
		certs = append(certs, c)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("storage: listing certificates: %w", err)
	}
	return certs, nil
}

// GetCertificate returns the certificate with the given ID, or ErrNotFound.
func (s *core) GetCertificate(ctx context.Context, id int64) (spec.Certificate, error) {
	c, err := getCert(ctx, s.reads, id)
	if err != nil {
		return spec.Certificate{}, fmt.Errorf("storage: getting certificate %d: %w", id, err)
	}
	return c, nil
}

func getCert(ctx context.Context, q sqlDB, id int64) (spec.Certificate, error) {
	c, err := scanCert(q.queryRow(ctx, `SELECT `+certColumns+` FROM certificates WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return spec.Certificate{}, ErrNotFound
	}
	return c, err
}

// CertificateKey returns a custom certificate's private key, decrypted;
// see Store.
func (s *core) CertificateKey(ctx context.Context, id int64) ([]byte, error) {
	var (
		source string
		sealed []byte
	)
	err := s.reads.queryRow(ctx, `SELECT source, key_sealed FROM certificates WHERE id = ?`, id).Scan(&source, &sealed)
	switch {
	case errors.Is(err, sql.ErrNoRows):
		return nil, fmt.Errorf("storage: reading the private key of certificate %d: %w", id, ErrNotFound)
	case err != nil:
		return nil, fmt.Errorf("storage: reading the private key of certificate %d: %w", id, err)
	case source != spec.SourceCustom:
		return nil, fmt.Errorf("storage: certificate %d is %s: Caddy keeps its private key: %w", id, source, ErrInvalid)
	case len(sealed) == 0:
		return nil, fmt.Errorf("storage: certificate %d has no private key stored", id)
	}
	key, err := s.sealer.open(id, sealed)
	if err != nil {
		return nil, fmt.Errorf("storage: certificate %d: %w", id, err)
	}
	return key, nil
}

// CreateCertificate stores a new certificate; see Store.
func (s *core) CreateCertificate(ctx context.Context, c spec.Certificate, keyPEM []byte, apply func(c spec.Certificate) error) (spec.Certificate, error) {
	if c.ID < 0 || c.ID > maxID {
		return spec.Certificate{}, fmt.Errorf("storage: creating certificate %d: id must be from 0 to %d: %w", c.ID, int64(maxID), ErrInvalid)
	}
	err := s.checkCert(c, keyPEM)
	if err == nil && c.Source == spec.SourceCustom && len(keyPEM) == 0 {
		err = fmt.Errorf("a custom certificate needs its private key: %w", ErrInvalid)
	}
	if err != nil {
		return spec.Certificate{}, fmt.Errorf("storage: creating certificate: %w", err)
	}
	c = normalizedCert(c)
	err = s.be.inTx(ctx, true, func(tx writeTx) error {
		if err := checkFreeID(ctx, tx, "certificates", c.ID); err != nil {
			return err
		}
		c.CreatedAt = jsontime.Of(s.nowMillis())
		c.UpdatedAt = c.CreatedAt
		domains, err := encodeList(c.Domains)
		if err != nil {
			return fmt.Errorf("domains: %v", err)
		}
		id, err := s.be.newID(ctx, tx, "certificates", c.ID)
		if err != nil {
			return err
		}
		err = tx.queryRow(ctx, `INSERT INTO certificates (id, name, source, domains, issuer,
			not_before, not_after, certificate_pem, created_at, updated_at)
			VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id`,
			id, c.Name, c.Source, domains, c.Issuer, millis(c.NotBefore.Time), millis(c.NotAfter.Time),
			c.CertificatePEM, millis(c.CreatedAt.Time), millis(c.UpdatedAt.Time)).Scan(&c.ID)
		if err != nil {
			return fmt.Errorf("inserting: %w", err)
		}
		// The key is sealed with the ID as additional data, so only now.
		if c.Source == spec.SourceCustom {
			sealed, err := s.sealer.seal(c.ID, keyPEM)
			if err != nil {
				return err
			}
			if _, err := tx.exec(ctx, `UPDATE certificates SET key_sealed = ? WHERE id = ?`, sealed, c.ID); err != nil {
				return fmt.Errorf("storing the private key: %w", err)
			}
		}
		if err := tx.changed(ctx, ChangeCertificate, OpCreate, c.ID); err != nil {
			return err
		}
		if _, ok := auditFrom(ctx); ok {
			nc := normalizedCert(c)
			if err := s.audit(ctx, tx, AuditEntry{Action: AuditCertCreate, CertificateID: c.ID, Name: c.Name,
				Changes: certChanges(nil, &nc)}); err != nil {
				return err
			}
		}
		if apply != nil {
			return apply(normalizedCert(c))
		}
		return nil
	})
	if err != nil {
		if c.ID == 0 {
			return spec.Certificate{}, fmt.Errorf("storage: creating certificate: %w", err)
		}
		return spec.Certificate{}, fmt.Errorf("storage: creating certificate %d: %w", c.ID, err)
	}
	return c, nil
}

// UpdateCertificate replaces a certificate; see Store.
func (s *core) UpdateCertificate(ctx context.Context, c spec.Certificate, keyPEM []byte, apply func(old, new spec.Certificate) error) (spec.Certificate, error) {
	if err := s.checkCert(c, keyPEM); err != nil {
		return spec.Certificate{}, fmt.Errorf("storage: updating certificate %d: %w", c.ID, err)
	}
	c = normalizedCert(c)
	err := s.be.inTx(ctx, true, func(tx writeTx) error {
		old, err := getCert(ctx, tx, c.ID)
		if err != nil {
			return err
		}
		c.CreatedAt = old.CreatedAt
		c.UpdatedAt = jsontime.Of(s.nowMillis())
		domains, err := encodeList(c.Domains)
		if err != nil {
			return fmt.Errorf("domains: %v", err)
		}
		query := `UPDATE certificates SET name = ?, source = ?, domains = ?, issuer = ?,
			not_before = ?, not_after = ?, certificate_pem = ?, updated_at = ?`
		args := []any{c.Name, c.Source, domains, c.Issuer, millis(c.NotBefore.Time), millis(c.NotAfter.Time),
			c.CertificatePEM, millis(c.UpdatedAt.Time)}
		switch {
		case c.Source == spec.SourceManaged:
			query += `, key_sealed = NULL`
		case len(keyPEM) > 0:
			sealed, err := s.sealer.seal(c.ID, keyPEM)
			if err != nil {
				return err
			}
			query += `, key_sealed = ?`
			args = append(args, sealed)
		case old.Source != spec.SourceCustom:
			return fmt.Errorf("a custom certificate needs its private key (it was %s and has none stored): %w", old.Source, ErrInvalid)
		}
		if _, err := tx.exec(ctx, query+` WHERE id = ?`, append(args, c.ID)...); err != nil {
			return fmt.Errorf("updating: %w", err)
		}
		if err := tx.changed(ctx, ChangeCertificate, OpUpdate, c.ID); err != nil {
			return err
		}
		if _, ok := auditFrom(ctx); ok {
			nc := normalizedCert(c)
			if err := s.audit(ctx, tx, AuditEntry{Action: AuditCertUpdate, CertificateID: c.ID, Name: c.Name,
				Changes: certChanges(&old, &nc)}); err != nil {
				return err
			}
		}
		if apply != nil {
			return apply(old, normalizedCert(c))
		}
		return nil
	})
	if err != nil {
		return spec.Certificate{}, fmt.Errorf("storage: updating certificate %d: %w", c.ID, err)
	}
	return c, nil
}

// DeleteCertificate deletes a certificate that no host uses; see Store.
func (s *core) DeleteCertificate(ctx context.Context, id int64, apply func(old spec.Certificate) error) error {
	err := s.be.inTx(ctx, true, func(tx writeTx) error {
		old, err := getCert(ctx, tx, id)
		if err != nil {
			return err
		}
		if err := s.certInUse(ctx, tx, id); err != nil {
			return err
		}
		if _, err := tx.exec(ctx, `DELETE FROM certificates WHERE id = ?`, id); err != nil {
			return fmt.Errorf("deleting: %w", err)
		}
		if err := tx.changed(ctx, ChangeCertificate, OpDelete, id); err != nil {
			return err
		}
		if err := s.audit(ctx, tx, AuditEntry{Action: AuditCertDelete, CertificateID: id, Name: old.Name}); err != nil {
			return err
		}
		if apply != nil {
			return apply(old)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("storage: deleting certificate %d: %w", id, err)
	}
	return nil
}

// certInUse returns an *InUseError if hosts refer to the certificate id:
// as the certificate they serve (ssl_cert_id, a column) or the one they
// present to their upstream (upstream_tls_client_cert_id, in settings).
func (s *core) certInUse(ctx context.Context, tx sqlDB, id int64) error {
	inUse := &InUseError{CertID: id}
	err := tx.queryEach(ctx, `SELECT id, COALESCE(`+s.setting("name")+`, '') FROM hosts
		WHERE ssl_cert_id = ? OR CAST(`+s.setting("upstream_tls_client_cert_id")+` AS BIGINT) = ? ORDER BY id`, []any{id, id}, func(r rowScanner) error {
		var (
			hostID int64
			name   string
		)
		if err := r.Scan(&hostID, &name); err != nil {
			return err
		}
		inUse.StreamIDs = append(inUse.StreamIDs, hostID)
		inUse.StreamNames = append(inUse.StreamNames, name)
		return nil
	})
	if err != nil {
		return fmt.Errorf("finding the hosts that use it: %w", err)
	}
	if len(inUse.StreamIDs) > 0 {
		return inUse
	}
	return nil
}
