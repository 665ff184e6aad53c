package streams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/aegis-proxy/caddy-aegis/storage"
)

// The `aegis streams` commands work on the storage a config names, opened
// by the same function as the app's (StorageConfig.openStore).
func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "streams",
		Short: "Commands for the storage of Aegis Streams (forget-keys, export, import)",
		Long: `
Work on the database of the streams app that a config names (its storage
and storage_key settings, or the defaults: streams.db and streams.key in
Caddy's data directory).
`,
		CobraFunc: func(cmd *cobra.Command) {
			forget := &cobra.Command{
				Use:   "forget-keys --config <path> [--adapter <name>]",
				Short: "Deletes the private keys the storage key cannot open",
				Long: `
When the key that sealed the stored certificates' private keys is lost
(streams.key deleted, or another storage_key), Aegis refuses to start.
If the key cannot be restored from a backup, forget-keys makes the current
key (a new streams.key if the file is missing) the database's key: it
deletes every private key this key cannot open and lists the certificates
that need a new upload, with the streams that use them. Stored streams that
terminate TLS with one of them are disabled; enable them after the upload.
`,
				RunE: caddycmd.WrapCommandFuncForCobra(cmdForgetKeys),
			}
			forget.Flags().StringP("config", "c", "", "Configuration file (required)")
			forget.Flags().StringP("adapter", "a", "", "Name of config adapter to apply")
			cmd.AddCommand(forget)
		},
	})
}

// commandStorage returns the streams storage settings of the config named
// by the --config and --adapter flags (nil: the defaults).
func commandStorage(fl caddycmd.Flags) (*StorageConfig, error) {
	file := fl.String("config")
	if file == "" {
		return nil, errors.New("--config is required: the config whose streams storage to use")
	}
	raw, _, _, err := caddycmd.LoadConfig(file, fl.String("adapter"))
	if err != nil {
		return nil, err
	}
	var cfg struct {
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, fmt.Errorf("reading %s: %v", file, err)
	}
	app, ok := cfg.Apps["streams"]
	if !ok {
		return nil, fmt.Errorf("%s has no streams app: add the streams global option (Caddyfile) or apps.streams (JSON)", file)
	}
	var streams struct {
		Storage *StorageConfig `json:"storage"`
	}
	if err := json.Unmarshal(app, &streams); err != nil {
		return nil, fmt.Errorf("reading the streams app of %s: %v", file, err)
	}
	if streams.Storage != nil && streams.Storage.Disabled {
		return nil, fmt.Errorf("%s turns the streams storage off: there is no database to work on", file)
	}
	return streams.Storage, nil
}

// keyName says where sc's key is, as the commands print it.
func (sc *StorageConfig) keyName() string {
	if sc != nil && sc.Key != "" {
		return "the configured storage_key"
	}
	return "key file " + filepath.Join(filepath.Dir(sc.path()), DefaultKeyFile)
}

func cmdForgetKeys(fl caddycmd.Flags) (int, error) {
	sc, err := commandStorage(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	db, _, err := sc.openStore(true)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := forgetKeys(ctx, os.Stdout, db, sc); err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	return caddy.ExitCodeSuccess, nil
}

// forgetKeys runs storage's ForgetKeys on db, disables the stored streams
// that terminate TLS with a certificate left without a key (the app would
// not start with them), and says what it did on w.
func forgetKeys(ctx context.Context, w io.Writer, db storage.Store, sc *StorageConfig) error {
	kf, ok := db.(storage.KeyForgetter)
	if !ok {
		return fmt.Errorf("this storage cannot forget keys")
	}
	keyless, err := kf.ForgetKeys(ctx)
	if err != nil {
		return err
	}
	forgotten := 0
	for _, k := range keyless {
		if k.Forgotten {
			forgotten++
		}
	}
	fmt.Fprintf(w, "Database %s, %s.\n", sc.path(), sc.keyName())
	fmt.Fprintf(w, "Deleted the private keys of %d certificate(s) that this key cannot open; the database's private keys are now those of this key.\n", forgotten)
	if len(keyless) == 0 {
		fmt.Fprintln(w, "No certificate needs a new upload.")
		return nil
	}
	fmt.Fprintln(w, "These certificates have no private key: upload each again with its key (PUT /api/v1/certificates/{id}):")
	for _, k := range keyless {
		c := k.Certificate
		fmt.Fprintf(w, "  certificate %d %q (%s): ", c.ID, c.Name, strings.Join(c.Domains, ", "))
		if len(k.StreamIDs) == 0 {
			fmt.Fprintln(w, "used by no stream")
			continue
		}
		var uses []string
		for i, id := range k.StreamIDs {
			use := fmt.Sprintf("stream %d %q", id, k.StreamNames[i])
			h, err := db.GetHost(ctx, id)
			if err != nil {
				return err
			}
			if h.Enabled && h.SSLEnabled && h.HasTCP() {
				s := h.Stream
				s.Enabled = false
				if _, err := db.UpdateHost(ctx, s, nil); err != nil {
					return fmt.Errorf("disabling stream %d: %v", id, err)
				}
				use += " (disabled now: enable it after the upload)"
			}
			uses = append(uses, use)
		}
		fmt.Fprintf(w, "used by %s\n", strings.Join(uses, ", "))
	}
	return nil
}
