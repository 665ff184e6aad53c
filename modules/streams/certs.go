package streams

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/modules/certs"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// ErrInUse: the certificate is used by streams (the error names them).
var ErrInUse = errors.New("in use")

// CertInput is a certificate as the API takes it: a custom certificate's
// PEM chain and private key. The private key is never returned.
type CertInput struct {
	Name        string `json:"name"`
	Certificate string `json:"certificate"`
	PrivateKey  string `json:"private_key"`
}

// CertStatus is a stored certificate, without its private key, with the
// streams that use it.
type CertStatus struct {
	storage.Certificate
	// UsedBy are the ids of the streams whose ssl_cert_id it is.
	UsedBy []int64 `json:"used_by"`
	// Warnings about the certificate (e.g. it expires within 30 days),
	// on create and update.
	Warnings []string `json:"warnings,omitempty"`
}

// certStatus describes c. The caller holds a.mu.
func (a *App) certStatus(c storage.Certificate) CertStatus {
	cs := CertStatus{Certificate: c, UsedBy: []int64{}}
	for _, rt := range a.streams {
		if rt.cfg.SSLCertID == c.ID {
			cs.UsedBy = append(cs.UsedBy, rt.cfg.ID)
		}
	}
	return cs
}

// Certificates lists the stored certificates.
func (a *App) Certificates(ctx context.Context) ([]CertStatus, error) {
	if a.store == nil {
		return nil, ErrNoStorage
	}
	list, err := a.store.db.ListCertificates(ctx)
	if err != nil {
		return nil, storeError(err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]CertStatus, 0, len(list))
	for _, c := range list {
		out = append(out, a.certStatus(c))
	}
	return out, nil
}

// Certificate returns stored certificate id, or ErrNotFound.
func (a *App) Certificate(ctx context.Context, id int64) (CertStatus, error) {
	if a.store == nil {
		return CertStatus{}, ErrNoStorage
	}
	c, err := a.store.db.GetCertificate(ctx, id)
	if err != nil {
		return CertStatus{}, storeError(err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.certStatus(c), nil
}

// parseCertInput validates an upload and returns the certificate to store,
// its key pair and warnings.
func parseCertInput(in CertInput) (storage.Certificate, *certs.Parsed, []string, error) {
	if in.Name == "" {
		return storage.Certificate{}, nil, nil, &certs.FieldError{Field: "name", Reason: "required: a name for the certificate"}
	}
	p, warnings, err := certs.ParseCustom(in.Certificate, in.PrivateKey, time.Now())
	if err != nil {
		return storage.Certificate{}, nil, nil, err
	}
	c := storage.Certificate{
		Name: in.Name, Source: storage.SourceCustom, Domains: p.Domains, Issuer: p.Issuer,
		NotBefore: p.NotBefore, NotAfter: p.NotAfter, CertificatePEM: p.ChainPEM,
	}
	return c, p, warnings, nil
}

// CreateCertificate validates and stores an uploaded certificate and makes
// it available to streams at once.
func CreateCertificate(ctx context.Context, in CertInput) (CertStatus, error) {
	var out CertStatus
	err := manage(func(a *App) error {
		if a.store == nil {
			return ErrNoStorage
		}
		c, p, warnings, err := parseCertInput(in)
		if err != nil {
			return err
		}
		stored, err := a.store.db.CreateCertificate(ctx, c, []byte(p.KeyPEM), nil)
		if err != nil {
			return storeError(err)
		}
		publishCert(stored.ID, &p.Certificate)
		out = a.certStatus(stored)
		out.Warnings = warnings
		a.logger.Info("certificate stored", zap.Int64("cert_id", stored.ID), zap.Strings("domains", stored.Domains))
		return nil
	})
	return out, err
}

// UpdateCertificate replaces certificate id with a new upload. New
// handshakes use it at once; open connections keep their sessions.
func UpdateCertificate(ctx context.Context, id int64, in CertInput) (CertStatus, error) {
	var out CertStatus
	err := manage(func(a *App) error {
		if a.store == nil {
			return ErrNoStorage
		}
		c, p, warnings, err := parseCertInput(in)
		if err != nil {
			return err
		}
		c.ID = id
		stored, err := a.store.db.UpdateCertificate(ctx, c, []byte(p.KeyPEM), nil)
		if err != nil {
			return storeError(err)
		}
		publishCert(id, &p.Certificate)
		out = a.certStatus(stored)
		out.Warnings = warnings
		a.logger.Info("certificate replaced", zap.Int64("cert_id", id), zap.Strings("domains", stored.Domains))
		return nil
	})
	return out, err
}

// DeleteCertificate deletes certificate id unless a stream uses it (a
// stream of the config, or a stored one).
func DeleteCertificate(ctx context.Context, id int64) error {
	return manage(func(a *App) error {
		if a.store == nil {
			return ErrNoStorage
		}
		// Every stream counts, the config's and the stored ones; the store
		// checks its own hosts again inside the transaction.
		inUse := &storage.InUseError{CertID: id}
		for _, rt := range a.streams {
			if rt.cfg.SSLCertID == id {
				inUse.StreamIDs = append(inUse.StreamIDs, rt.cfg.ID)
				inUse.StreamNames = append(inUse.StreamNames, rt.cfg.Name)
			}
		}
		if len(inUse.StreamIDs) > 0 {
			if _, err := a.store.db.GetCertificate(ctx, id); err != nil {
				return storeError(err)
			}
			return fmt.Errorf("%w: %w", inUse, ErrInUse)
		}
		err := a.store.db.DeleteCertificate(ctx, id, nil)
		if err != nil {
			return storeError(err)
		}
		l4aegistls.Unregister(id)
		a.logger.Info("certificate deleted", zap.Int64("cert_id", id))
		return nil
	})
}

// publishCert makes c the certificate that streams with ssl_cert_id id
// serve from their next handshake on.
func publishCert(id int64, c *tls.Certificate) {
	if sc, ok := l4aegistls.Lookup(id).(*l4aegistls.StaticCert); ok {
		sc.Store(c)
		return
	}
	l4aegistls.Register(id, l4aegistls.NewStaticCert(c))
}

// loadCertificates publishes every stored certificate that a stream of
// this config uses, and checks that each such stream's certificate exists.
func (a *App) loadCertificates(ctx context.Context) error {
	need := map[int64][]*Stream{}
	for _, rt := range a.streams {
		if rt.cfg.Enabled && rt.cfg.SSLEnabled && rt.cfg.HasTCP() {
			need[rt.cfg.SSLCertID] = append(need[rt.cfg.SSLCertID], rt.cfg)
		}
	}
	if len(need) == 0 {
		return nil
	}
	var errs []error
	for id, users := range need {
		if err := a.publishStored(ctx, id); err != nil {
			for _, s := range users {
				errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: "ssl_cert_id", Value: fmt.Sprint(id), Reason: err.Error()})
			}
		}
	}
	slices.SortFunc(errs, func(x, y error) int { return compareStrings(x.Error(), y.Error()) })
	return errors.Join(errs...)
}

// publishStored loads stored certificate id with its key and publishes it.
func (a *App) publishStored(ctx context.Context, id int64) error {
	if a.store == nil {
		return errors.New("storage is off, so there is no certificate store; turn storage on")
	}
	c, err := a.store.db.GetCertificate(ctx, id)
	if errors.Is(err, storage.ErrNotFound) {
		return errors.New("no such certificate; upload it (POST /api/v1/certificates) or use another id")
	}
	if err != nil {
		return err
	}
	if c.Source != storage.SourceCustom {
		return fmt.Errorf("certificate %d is %s; only uploaded (custom) certificates are served in this version", id, c.Source)
	}
	key, err := a.store.db.CertificateKey(ctx, id)
	if err != nil {
		return err
	}
	pair, err := tls.X509KeyPair([]byte(c.CertificatePEM), key)
	if err != nil {
		return fmt.Errorf("certificate %d: %v", id, err)
	}
	publishCert(id, &pair)
	return nil
}

func compareStrings(a, b string) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}
