package streams

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// The export file of `aegis streams export`, which `aegis streams import`
// reads.
const (
	// ExportFormat is the export file's "format".
	ExportFormat = "aegis-streams-export"
	// ExportVersion is the export file's "version": the layout this code
	// writes and reads.
	ExportVersion = 1
)

// ExportFile is every stored stream and certificate of a storage, as JSON.
// Private keys are sealed with the storage key, as the storage keeps them:
// only a storage with the same key (storage_key, or a copy of streams.key)
// imports them.
type ExportFile struct {
	// Format is ExportFormat and Version ExportVersion.
	Format  string `json:"format"`
	Version int    `json:"version"`

	// ExportedAt is when the file was written, and From the database it
	// was read from.
	ExportedAt time.Time `json:"exported_at"`
	From       string    `json:"from,omitempty"`

	// KeyCheck is a canary sealed with the storage key (as a store keeps
	// one, storage.SealCanary): import checks that its own key opens it
	// before anything else. Base64.
	KeyCheck []byte `json:"key_check,omitempty"`

	// Certificates are the stored certificates, by ID; Streams the stored
	// streams, by ID. IDs are kept on import.
	Certificates []ExportCertificate `json:"certificates"`
	Streams      []spec.Stream       `json:"streams"`
}

// ExportCertificate is a certificate as the API shows it, and its private
// key sealed.
type ExportCertificate struct {
	spec.Certificate

	// PrivateKeySealed is a custom certificate's private key, sealed with
	// the storage key and the certificate's ID (storage.SealPrivateKey):
	// AES-256-GCM, a 12-byte nonce then the ciphertext and tag. Base64.
	// Absent for a managed certificate (Caddy keeps its key) and for a
	// custom one whose key was deleted (aegis streams forget-keys).
	PrivateKeySealed []byte `json:"private_key_sealed,omitempty"`
}

// exportStore reads every stream and certificate of db, whose key is key,
// into an ExportFile.
func exportStore(ctx context.Context, db storage.Store, key []byte, from string) (*ExportFile, error) {
	f := &ExportFile{Format: ExportFormat, Version: ExportVersion, ExportedAt: time.Now().UTC(), From: from,
		Certificates: []ExportCertificate{}, Streams: []spec.Stream{}}
	var err error
	if f.KeyCheck, err = storage.SealCanary(key); err != nil {
		return nil, err
	}
	certs, err := db.ListCertificates(ctx)
	if err != nil {
		return nil, err
	}
	for _, c := range certs {
		ec := ExportCertificate{Certificate: c}
		if c.Source == spec.SourceCustom {
			pem, err := db.CertificateKey(ctx, c.ID)
			switch {
			case errors.Is(err, storage.ErrWrongKey):
				return nil, fmt.Errorf("certificate %d: %v; run aegis streams forget-keys first, or restore the key", c.ID, err)
			case err == nil:
				ec.PrivateKeySealed, err = storage.SealPrivateKey(key, c.ID, pem)
				clear(pem)
				if err != nil {
					return nil, err
				}
			}
			// Otherwise it has no key (forgotten): exported without one,
			// and import says so.
		}
		f.Certificates = append(f.Certificates, ec)
	}
	hosts, err := db.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	for _, h := range hosts {
		f.Streams = append(f.Streams, h.Stream)
	}
	return f, nil
}

// decodeExport reads an export file strictly: unknown keys, another
// format or version, or trailing data are errors.
func decodeExport(b []byte) (*ExportFile, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var f ExportFile
	if err := dec.Decode(&f); err != nil {
		return nil, fmt.Errorf("not an export file: %v", err)
	}
	if dec.More() {
		return nil, errors.New("not an export file: data after the JSON object")
	}
	if f.Format != ExportFormat || f.Version != ExportVersion {
		return nil, fmt.Errorf("format %q version %d: want %q version %d (written by aegis streams export)", f.Format, f.Version, ExportFormat, ExportVersion)
	}
	return &f, nil
}

// importConflicts lists every reason the file f cannot be imported into db
// (whose key is key, named keyName) beside the config's own streams: a
// different key, IDs and listen ports taken, streams that do not validate,
// certificates missing. Empty means the import may proceed.
func importConflicts(ctx context.Context, db storage.Store, key []byte, keyName string, config []*spec.Stream, f *ExportFile) ([]string, error) {
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	storedCerts, err := db.ListCertificates(ctx)
	if err != nil {
		return nil, err
	}
	certs := map[int64]string{} // every certificate ID after the import, and where it is from
	for _, c := range storedCerts {
		certs[c.ID] = fmt.Sprintf("certificate %d %q in the storage", c.ID, c.Name)
	}
	keyOK := true
	if len(f.KeyCheck) > 0 {
		if _, err := (storage.KeyCheck{Canary: f.KeyCheck}).Verify(key); err != nil {
			keyOK = false
			add("the file's private keys are sealed with another key than %s: import with the storage key it was exported with", keyName)
		}
	}
	for i, c := range f.Certificates {
		label := fmt.Sprintf("certificate %d %q", c.ID, c.Name)
		switch {
		case c.ID <= 0:
			add("certificates[%d] %q: id %d: must be > 0", i, c.Name, c.ID)
			continue
		case certs[c.ID] != "":
			add("%s: id %d is taken by %s", label, c.ID, certs[c.ID])
			continue
		}
		certs[c.ID] = label + " in the file"
		switch c.Source {
		case spec.SourceManaged:
			if len(c.PrivateKeySealed) > 0 || c.CertificatePEM != "" {
				add("%s: managed, so it has no chain or private key in the file", label)
			}
		case spec.SourceCustom:
			switch {
			case c.CertificatePEM == "":
				add("%s: no certificate chain", label)
			case len(c.PrivateKeySealed) == 0:
				add("%s: no private key (deleted by aegis streams forget-keys): upload it again before exporting, or delete it", label)
			case keyOK:
				pem, err := storage.OpenPrivateKey(key, c.ID, c.PrivateKeySealed)
				if err != nil {
					add("%s: its private key does not open with %s (another key, or a damaged file)", label, keyName)
				}
				clear(pem)
			}
		default:
			add("%s: source %q: must be %q or %q", label, c.Source, spec.SourceCustom, spec.SourceManaged)
		}
	}

	stored, err := db.ListHosts(ctx)
	if err != nil {
		return nil, err
	}
	where := map[int64]string{}
	var enabled []*spec.Stream
	for _, s := range config {
		if s != nil {
			where[s.ID] = spec.StreamLabel(s.ID, s.Name) + " in the config"
			if s.Enabled {
				enabled = append(enabled, s)
			}
		}
	}
	for i := range stored {
		s := &stored[i].Stream
		where[s.ID] = spec.StreamLabel(s.ID, s.Name) + " in the storage"
		if s.Enabled {
			enabled = append(enabled, s)
		}
	}
	var none App // no reserved ports: Caddy's own are checked when it starts
	for i := range f.Streams {
		s := &f.Streams[i]
		label := spec.StreamLabel(s.ID, s.Name)
		if err := s.ValidateStored(); err != nil {
			add("%v", err)
			continue
		}
		if w := where[s.ID]; w != "" {
			add("%s: id %d is taken by %s", label, s.ID, w)
			continue
		}
		where[s.ID] = label + " in the file"
		if s.SSLEnabled && s.SSLCertID > 0 && certs[s.SSLCertID] == "" {
			add("%s: ssl_cert_id %d: no such certificate in the file or the storage", label, s.SSLCertID)
		}
		if s.Enabled {
			for _, err := range none.listenConflicts(s, enabled, false) {
				add("%v", err)
			}
			enabled = append(enabled, s)
		}
	}
	return out, nil
}

// importStore writes the certificates and streams of f, which
// importConflicts found none in, into db. If a write fails, the ones
// written before are deleted again, so that nothing is left half done.
func importStore(ctx context.Context, db storage.Store, key []byte, f *ExportFile) (err error) {
	var certsDone, streamsDone []int64
	defer func() {
		if err == nil {
			return
		}
		var undo []error
		for _, id := range slices.Backward(streamsDone) {
			undo = append(undo, db.DeleteHost(ctx, id, nil))
		}
		for _, id := range slices.Backward(certsDone) {
			undo = append(undo, db.DeleteCertificate(ctx, id, nil))
		}
		if u := errors.Join(undo...); u != nil {
			err = fmt.Errorf("%v; undoing the writes before it failed too, check the storage: %v", err, u)
		} else {
			err = fmt.Errorf("%v; nothing was changed", err)
		}
	}()
	for _, c := range f.Certificates {
		var pem []byte
		if c.Source == spec.SourceCustom {
			if pem, err = storage.OpenPrivateKey(key, c.ID, c.PrivateKeySealed); err != nil {
				return fmt.Errorf("certificate %d: %v", c.ID, err)
			}
		}
		_, err = db.CreateCertificate(ctx, c.Certificate, pem, nil)
		clear(pem)
		if err != nil {
			return err
		}
		certsDone = append(certsDone, c.ID)
	}
	for _, s := range f.Streams {
		if _, err = db.CreateHost(ctx, s, nil); err != nil {
			return err
		}
		streamsDone = append(streamsDone, s.ID)
	}
	return nil
}
