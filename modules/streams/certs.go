package streams

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/certcheck"
	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/l4aegistls"
	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// certStatus describes c. The caller holds a.mu.
func (a *App) certStatus(c spec.Certificate) spec.CertStatus {
	if src, ok := a.certs[c.ID].(*l4aegistls.CaddyCert); ok && c.Source == spec.SourceManaged {
		fillFromCache(&c, src)
	}
	cs := spec.CertStatus{Certificate: c, UsedBy: []int64{}}
	for _, inst := range a.streams {
		if usesCert(inst.cfg, c.ID) {
			cs.UsedBy = append(cs.UsedBy, inst.cfg.ID)
		}
	}
	return cs
}

// storage returns the app's storage, nil once Cleanup let go of it (or
// without storage).
func (a *App) storage() *sharedStore {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.store
}

// Certificates lists the stored certificates.
func (a *App) Certificates(ctx context.Context) ([]spec.CertStatus, error) {
	store := a.storage()
	if store == nil {
		return nil, spec.ErrNoStorage
	}
	list, err := store.db.ListCertificates(ctx)
	if err != nil {
		var ok bool
		if list, ok = store.certsFallback(err); !ok {
			return nil, storeError(err)
		}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]spec.CertStatus, 0, len(list))
	for _, c := range list {
		out = append(out, a.certStatus(c))
	}
	return out, nil
}

// Certificate returns stored certificate id, or ErrNotFound.
func (a *App) Certificate(ctx context.Context, id int64) (spec.CertStatus, error) {
	store := a.storage()
	if store == nil {
		return spec.CertStatus{}, spec.ErrNoStorage
	}
	c, err := store.db.GetCertificate(ctx, id)
	if err != nil {
		list, ok := store.certsFallback(err)
		i := slices.IndexFunc(list, func(c spec.Certificate) bool { return c.ID == id })
		switch {
		case !ok:
			return spec.CertStatus{}, storeError(err)
		case i < 0:
			return spec.CertStatus{}, fmt.Errorf("certificate %d: %w", id, spec.ErrNotFound)
		}
		c = list[i]
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.certStatus(c), nil
}

// parseCertInput validates an upload and returns the certificate to store,
// its key pair (nil for a managed certificate) and warnings.
func parseCertInput(in spec.CertInput) (spec.Certificate, *certcheck.Parsed, []string, error) {
	if in.Name == "" {
		return spec.Certificate{}, nil, nil, &certcheck.FieldError{Field: "name", Reason: "required: a name for the certificate"}
	}
	if len(in.Domains) > 0 {
		if in.Certificate != "" || in.PrivateKey != "" {
			return spec.Certificate{}, nil, nil, &certcheck.FieldError{Field: "domains",
				Reason: "give either domains (Caddy obtains the certificate) or certificate and private_key (an upload), not both"}
		}
		domains, err := certcheck.NormalizeDomains(in.Domains)
		if err != nil {
			return spec.Certificate{}, nil, nil, err
		}
		return spec.Certificate{Name: in.Name, Source: spec.SourceManaged, Domains: domains}, nil, nil, nil
	}
	p, warnings, err := certcheck.ParseCustom(in.Certificate, in.PrivateKey, time.Now())
	if err != nil {
		return spec.Certificate{}, nil, nil, err
	}
	c := spec.Certificate{
		Name: in.Name, Source: spec.SourceCustom, Domains: p.Domains, Issuer: p.Issuer,
		NotBefore: jsontime.Of(p.NotBefore), NotAfter: jsontime.Of(p.NotAfter), CertificatePEM: p.ChainPEM,
	}
	return c, p, warnings, nil
}

// CreateCertificate validates and stores an uploaded certificate and makes
// it available to streams at once.
func CreateCertificate(ctx context.Context, in spec.CertInput) (spec.CertStatus, error) {
	var out spec.CertStatus
	err := withRunning(func(a *App) error {
		if a.store == nil {
			return spec.ErrNoStorage
		}
		c, p, warnings, err := parseCertInput(in)
		if err != nil {
			return err
		}
		var published int64
		stored, err := a.store.db.CreateCertificate(ctx, c, keyOf(p), func(c spec.Certificate) error {
			published = c.ID
			return a.publish(c, p)
		})
		if err != nil {
			if published > 0 { // the commit failed after the publish
				a.dropCert(published)
			}
			return storeError(err)
		}
		out = a.certStatus(stored)
		out.Warnings = warnings
		a.logger.Info("certificate stored", zap.Int64("cert_id", stored.ID), zap.Strings("domains", stored.Domains))
		return nil
	})
	return out, err
}

// UpdateCertificate replaces certificate id with a new upload. New
// handshakes use it at once; open connections keep their sessions.
func UpdateCertificate(ctx context.Context, id int64, in spec.CertInput) (spec.CertStatus, error) {
	var out spec.CertStatus
	err := withRunning(func(a *App) error {
		if a.store == nil {
			return spec.ErrNoStorage
		}
		c, p, warnings, err := parseCertInput(in)
		if err != nil {
			return err
		}
		c.ID = id
		undo := a.snapshotCert(id)
		stored, err := a.store.db.UpdateCertificate(ctx, c, keyOf(p), func(_, c spec.Certificate) error {
			return a.publish(c, p)
		})
		if err != nil {
			undo() // the store kept the old certificate: so do handshakes
			return storeError(err)
		}
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
	return withRunning(func(a *App) error {
		if a.store == nil {
			return spec.ErrNoStorage
		}
		// Every stream counts, the config's and the stored ones; the store
		// checks its own hosts again inside the transaction.
		inUse := &storage.InUseError{CertID: id}
		for _, inst := range a.streams {
			if usesCert(inst.cfg, id) {
				inUse.StreamIDs = append(inUse.StreamIDs, inst.cfg.ID)
				inUse.StreamNames = append(inUse.StreamNames, inst.cfg.Name)
			}
		}
		if len(inUse.StreamIDs) > 0 {
			if _, err := a.store.db.GetCertificate(ctx, id); err != nil {
				return storeError(err)
			}
			return fmt.Errorf("%w: %w", inUse, spec.ErrInUse)
		}
		err := a.store.db.DeleteCertificate(ctx, id, nil)
		if err != nil {
			return storeError(err)
		}
		a.dropCert(id)
		a.logger.Info("certificate deleted", zap.Int64("cert_id", id))
		return nil
	})
}

// usesCert reports whether stream s names stored certificate id: as the
// one it serves (ssl_cert_id) or the one it presents to its upstream
// (upstream_tls_client_cert_id), whether or not TLS is on.
func usesCert(s *spec.Stream, id int64) bool {
	return s.SSLCertID == id || s.UpstreamTLSClientCertID == id
}

// snapshotCert returns a function that puts this app's source of
// certificate id back as it is now, in the registry too. The caller holds
// a.mu.
func (a *App) snapshotCert(id int64) func() {
	src, had := a.certs[id]
	row, hadRow := a.certRows[id]
	return func() {
		if !had {
			a.dropCert(id)
			return
		}
		a.setCert(id, src)
		if hadRow {
			a.certRows[id] = row
		}
	}
}

// setCert makes src the source of certificate id for this app's streams,
// and for every stream with that id once the app has started. The caller
// holds a.mu, or is Provision.
func (a *App) setCert(id int64, src l4aegistls.CertSource) {
	if a.certs == nil {
		a.certs = map[int64]l4aegistls.CertSource{}
		a.certRows = map[int64]string{}
	}
	a.certs[id] = src
	if a.certsLive {
		l4aegistls.Register(id, src)
	}
}

// dropCert forgets certificate id: its handshakes fail from now on.
func (a *App) dropCert(id int64) {
	delete(a.certs, id)
	delete(a.certRows, id)
	if a.certsLive {
		l4aegistls.Unregister(id)
	}
}

// registerCerts puts this app's certificate sources into the registry,
// and takes out those of ids that only another config registered (one
// that failed to start). The caller holds a.mu.
func (a *App) registerCerts(theirs []int64) {
	for _, id := range theirs {
		if _, ok := a.certs[id]; !ok {
			l4aegistls.Unregister(id)
		}
	}
	for id, src := range a.certs {
		l4aegistls.Register(id, src)
	}
}

// certRow is what identifies the content of stored certificate c: a
// change of its chain (and so of its key) or domains changes it.
func certRow(c spec.Certificate) string {
	return c.Source + "\n" + strings.Join(c.Domains, ",") + "\n" + c.CertificatePEM
}

// syncCerts publishes the stored certificates that changed since this app
// read them (an API write meanwhile went to the previous app) and forgets
// deleted ones. The caller holds writeMu and a.mu.
func (a *App) syncCerts(ctx context.Context) error {
	list, err := a.store.db.ListCertificates(ctx)
	if err != nil {
		return fmt.Errorf("re-reading stored certificates: %w", err)
	}
	seen := make(map[int64]bool, len(list))
	for _, c := range list {
		seen[c.ID] = true
		if row, ok := a.certRows[c.ID]; ok && row == certRow(c) {
			continue
		}
		if err := a.publishStored(ctx, c); err != nil {
			a.logger.Error("loading a certificate stored meanwhile", zap.Int64("cert_id", c.ID), zap.Error(err))
		}
	}
	for id := range a.certRows {
		if !seen[id] && !a.keepForConfig(id) {
			a.dropCert(id)
		}
	}
	return nil
}

// keepForConfig reports whether a certificate that another node deleted
// is one a stream of this node's Caddy config uses (the writing node
// checked only its own streams): it keeps serving it, so the stream's
// handshakes go on, and logs why; the node's next start needs it stored
// again. The caller holds a.mu.
func (a *App) keepForConfig(id int64) bool {
	for _, inst := range a.streams {
		s := inst.cfg
		if inst.source == spec.SourceConfig && s.Enabled && (s.SSLEnabled && s.SSLCertID == id || s.UpstreamTLS && s.UpstreamTLSClientCertID == id) {
			a.logger.Error("a certificate this node's config uses was deleted on another node; this node keeps serving it until it restarts, which needs a stored certificate: upload it again and give the stream its new id, or change the stream",
				zap.Int64("cert_id", id), zap.Int64("stream_id", inst.cfg.ID), zap.String("stream", inst.cfg.Name))
			return true
		}
	}
	return false
}

// applyCert makes the certificate registry match stored certificate id,
// which another node wrote: it publishes it anew, or forgets it. The
// caller holds writeMu and a.mu.
func (a *App) applyCert(ctx context.Context, id int64) error {
	c, err := a.store.db.GetCertificate(ctx, id)
	if errors.Is(err, storage.ErrNotFound) {
		if _, ok := a.certRows[id]; ok && !a.keepForConfig(id) {
			a.dropCert(id)
			a.logger.Info("certificate deleted", zap.Int64("cert_id", id))
		}
		return nil
	}
	if err != nil {
		return err
	}
	if row, ok := a.certRows[id]; ok && row == certRow(c) {
		return nil
	}
	if err := a.publishStored(ctx, c); err != nil {
		return err
	}
	a.logger.Info("certificate stored", zap.Int64("cert_id", id), zap.Strings("domains", c.Domains))
	return nil
}

// loadCertificates loads every stored certificate (Caddy starts managing
// the managed ones) and checks that the certificate of each TLS stream
// exists. Handshakes get them when the app starts.
func (a *App) loadCertificates(ctx context.Context) error {
	var stored []spec.Certificate
	if a.store != nil {
		var err error
		if stored, err = a.store.db.ListCertificates(ctx); err != nil {
			return fmt.Errorf("storage: reading certificates: %v", err)
		}
	}
	problems := map[int64]error{}
	have := map[int64]bool{}
	for _, c := range stored {
		have[c.ID] = true
		if err := a.publishStored(ctx, c); err != nil {
			problems[c.ID] = err
			a.logger.Error("loading a stored certificate", zap.Int64("cert_id", c.ID), zap.Error(err))
		}
	}
	var errs []error
	for _, inst := range a.streams {
		s := inst.cfg
		if id := s.UpstreamTLSClientCertID; s.Enabled && s.UpstreamTLS && id > 0 {
			err := problems[id]
			if !have[id] {
				err = errNoCert(a.store != nil)
			}
			if err != nil {
				errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "upstream_tls_client_cert_id", Value: id, Reason: err.Error()})
			}
		}
		if !s.Enabled || !s.SSLEnabled || !s.HasTCP() {
			continue
		}
		if s.SSLCertTag != "" || s.SSLDomain != "" {
			if err := a.publishConfigCert(s); err != nil {
				field := "ssl_cert_tag"
				if s.SSLDomain != "" {
					field = "ssl_domain"
				}
				errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: field, Value: s.SSLCertTag + s.SSLDomain, Reason: err.Error()})
			}
			continue
		}
		err := problems[s.SSLCertID]
		if !have[s.SSLCertID] {
			err = errNoCert(a.store != nil)
		}
		if err != nil {
			errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "ssl_cert_id", Value: s.SSLCertID, Reason: err.Error()})
		}
	}
	return errors.Join(errs...)
}

func errNoCert(storageOn bool) error {
	if !storageOn {
		return errors.New("storage is off, so there is no certificate store; turn storage on")
	}
	return errors.New("no such certificate; upload it (POST /api/v1/certificates) or use another id")
}

// publishStored publishes stored certificate c, with its key when custom.
func (a *App) publishStored(ctx context.Context, c spec.Certificate) error {
	if c.Source == spec.SourceManaged {
		return a.publish(c, nil)
	}
	key, err := a.store.db.CertificateKey(ctx, c.ID)
	if err != nil {
		return err
	}
	pair, err := tls.X509KeyPair([]byte(c.CertificatePEM), key)
	if err != nil {
		return fmt.Errorf("certificate %d: %v", c.ID, err)
	}
	a.setCert(c.ID, l4aegistls.NewStaticCert(&pair))
	a.certRows[c.ID] = certRow(c)
	return nil
}

// checkCert publishes certificate id for a stream about to use it, or says
// why it cannot.
func (a *App) checkCert(ctx context.Context, id int64) error {
	c, err := a.storedCert(ctx, id)
	if err != nil {
		return err
	}
	return a.publishStored(ctx, c)
}

// certExists is checkCert for a disabled stream: the certificate must
// exist, and is not published.
func (a *App) certExists(ctx context.Context, id int64) error {
	_, err := a.storedCert(ctx, id)
	return err
}

// storedCert reads stored certificate id; the error says why a stream
// cannot use it.
func (a *App) storedCert(ctx context.Context, id int64) (spec.Certificate, error) {
	if a.store == nil {
		return spec.Certificate{}, errNoCert(false)
	}
	c, err := a.store.db.GetCertificate(ctx, id)
	if errors.Is(err, storage.ErrNotFound) {
		return c, errNoCert(true)
	}
	return c, err
}

// publish makes certificate c available to handshakes: a custom one from
// its parsed key pair p, a managed one from Caddy's certificate cache,
// after asking Caddy's TLS app to obtain and renew it.
func (a *App) publish(c spec.Certificate, p *certcheck.Parsed) error {
	if c.Source != spec.SourceManaged {
		a.setCert(c.ID, l4aegistls.NewStaticCert(&p.Certificate))
		a.certRows[c.ID] = certRow(c)
		return nil
	}
	if a.tlsApp == nil {
		return errors.New("managed certificates need Caddy's tls app, which this config did not load")
	}
	names := make(map[string]struct{}, len(c.Domains))
	for _, d := range c.Domains {
		names[d] = struct{}{}
	}
	if err := a.tlsManage(names); err != nil {
		return fmt.Errorf("asking Caddy to manage %v: %v", c.Domains, err)
	}
	src, err := l4aegistls.NewCaddyCert(a.ctx, c.Domains[0], nil)
	if err != nil {
		return err
	}
	a.setCert(c.ID, src)
	a.certRows[c.ID] = certRow(c)
	return nil
}

// certID is the certificate registry id a TLS stream serves: its
// ssl_cert_id, or for a certificate named by Caddy tag or domain (config
// streams only) an id of its own, above any stored one.
func certID(s *spec.Stream) int64 {
	if s.SSLCertTag != "" || s.SSLDomain != "" {
		return 1<<48 + s.ID
	}
	return s.SSLCertID
}

// usesCaddyCerts reports whether a stream names a certificate by Caddy tag
// or domain.
func usesCaddyCerts(hosts []*spec.Stream) bool {
	for _, s := range hosts {
		if s != nil && s.SSLEnabled && (s.SSLCertTag != "" || s.SSLDomain != "") {
			return true
		}
	}
	return false
}

// publishConfigCert publishes the certificate a config stream names by
// Caddy tag (loaded by the tls app's certificate loaders) or by a domain
// (which the tls app is asked to manage).
func (a *App) publishConfigCert(s *spec.Stream) error {
	if a.tlsApp == nil {
		return errors.New("Caddy's tls app is not loaded")
	}
	var src *l4aegistls.CaddyCert
	var err error
	if s.SSLDomain != "" {
		if err := a.tlsManage(map[string]struct{}{s.SSLDomain: {}}); err != nil {
			return fmt.Errorf("asking Caddy to manage %s: %v", s.SSLDomain, err)
		}
		src, err = l4aegistls.NewCaddyCert(a.ctx, s.SSLDomain, nil)
	} else {
		// Caddy picks among the certificates for the client's SNI those
		// with the tag.
		src, err = l4aegistls.NewCaddyCert(a.ctx, "", []string{s.SSLCertTag})
	}
	if err != nil {
		return err
	}
	a.setCert(certID(s), src)
	return nil
}

// tlsManage asks Caddy's tls app to obtain and renew names. Until this app's
// config is running, the names wait: the tls app may not have started
// yet, and managing names before it has races with its start.
func (a *App) tlsManage(names map[string]struct{}) error {
	a.namesMu.Lock()
	defer a.namesMu.Unlock()
	if !a.running {
		if a.toManage == nil {
			a.toManage = map[string]struct{}{}
		}
		for n := range names {
			a.toManage[n] = struct{}{}
		}
		return nil
	}
	return a.tlsApp.Manage(names)
}

// configStarted hands the names waiting for Caddy's tls app to it when
// every app of this app's config has started (Caddy's "started" event);
// from then on tlsManage hands them over at once.
type configStarted struct{ a *App }

// Handle implements caddyevents.Handler.
func (h configStarted) Handle(context.Context, caddy.Event) error {
	a := h.a
	a.namesMu.Lock()
	a.running = true
	names := a.toManage
	a.toManage = nil
	a.namesMu.Unlock()
	if len(names) > 0 {
		if err := a.tlsApp.Manage(names); err != nil {
			a.logger.Error("asking Caddy to manage certificate names", zap.Error(err))
		}
	}
	return nil
}

// keyOf is the private key to store: none for a managed certificate.
func keyOf(p *certcheck.Parsed) []byte {
	if p == nil {
		return nil
	}
	return []byte(p.KeyPEM)
}

// fillFromCache fills in the issuer and validity of a managed certificate
// from the one last served for it, once a handshake has used it.
func fillFromCache(c *spec.Certificate, src *l4aegistls.CaddyCert) {
	cert := src.Last()
	if cert == nil {
		return
	}
	var err error
	leaf := cert.Leaf
	if leaf == nil && len(cert.Certificate) > 0 {
		if leaf, err = x509.ParseCertificate(cert.Certificate[0]); err != nil {
			return
		}
	}
	if leaf != nil {
		c.Issuer, c.NotBefore, c.NotAfter = leaf.Issuer.String(), jsontime.Of(leaf.NotBefore.UTC()), jsontime.Of(leaf.NotAfter.UTC())
	}
}
