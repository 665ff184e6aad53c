package streams

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"

	"github.com/aegis-proxy/caddy-aegis/spec"
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

			export := &cobra.Command{
				Use:   "export --config <path> [--adapter <name>] [--output <file>]",
				Short: "Writes every stored stream and certificate to a JSON file",
				Long: `
Writes every stream and certificate stored in the config's storage to a
JSON file (standard output without --output, or with --output -). Private
keys stay sealed with the storage key: keep the key with the file, and
import it into a storage with the same key (storage_key, or a copy of
streams.key). The streams of the config itself are not exported.
`,
				RunE: caddycmd.WrapCommandFuncForCobra(cmdExport),
			}
			export.Flags().StringP("config", "c", "", "Configuration file (required)")
			export.Flags().StringP("adapter", "a", "", "Name of config adapter to apply")
			export.Flags().StringP("output", "o", "-", "File to write (mode 0600); - for standard output")
			cmd.AddCommand(export)

			imp := &cobra.Command{
				Use:   "import --config <path> [--adapter <name>] <file>",
				Short: "Loads a file written by export into the storage",
				Long: `
Loads the streams and certificates of a file written by aegis streams
export into the config's storage, keeping their ids. If anything in the
file conflicts (ids or listen ports taken, by the storage or by the
config's own streams, certificate ids taken, another storage key, a stream
that does not validate), nothing is changed and every conflict is listed.
A running Aegis on the same storage serves the imported streams after a
reload.
`,
				Args: cobra.ExactArgs(1),
				RunE: func(cmd *cobra.Command, args []string) error {
					return caddycmd.WrapCommandFuncForCobra(func(fl caddycmd.Flags) (int, error) {
						return cmdImport(fl, args[0])
					})(cmd, args)
				},
			}
			imp.Flags().StringP("config", "c", "", "Configuration file (required)")
			imp.Flags().StringP("adapter", "a", "", "Name of config adapter to apply")
			cmd.AddCommand(imp)
		},
	})
}

// commandApp returns the streams app's storage settings (nil: the
// defaults) and its own streams in the config named by the --config and
// --adapter flags.
func commandApp(fl caddycmd.Flags) (*StorageConfig, []*spec.Stream, error) {
	file := fl.String("config")
	if file == "" {
		return nil, nil, errors.New("--config is required: the config whose streams storage to use")
	}
	raw, _, _, err := caddycmd.LoadConfig(file, fl.String("adapter"))
	if err != nil {
		return nil, nil, err
	}
	var cfg struct {
		Apps map[string]json.RawMessage `json:"apps"`
	}
	if err := json.Unmarshal(raw, &cfg); err != nil {
		return nil, nil, fmt.Errorf("reading %s: %v", file, err)
	}
	app, ok := cfg.Apps["streams"]
	if !ok {
		return nil, nil, fmt.Errorf("%s has no streams app: add the streams global option (Caddyfile) or apps.streams (JSON)", file)
	}
	var streams struct {
		Storage *StorageConfig `json:"storage"`
		Hosts   []*spec.Stream `json:"hosts"`
	}
	if err := json.Unmarshal(app, &streams); err != nil {
		return nil, nil, fmt.Errorf("reading the streams app of %s: %v", file, err)
	}
	if streams.Storage != nil && streams.Storage.Disabled {
		return nil, nil, fmt.Errorf("%s turns the streams storage off: there is no database to work on", file)
	}
	return streams.Storage, streams.Hosts, nil
}

// mustExist refuses to work on a database that is not there (a mistyped
// path, the wrong data directory) rather than make an empty one.
func (sc *StorageConfig) mustExist() error {
	if sc != nil && sc.Postgres != nil {
		return nil
	}
	if _, err := os.Stat(sc.path()); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("there is no streams database at %s: check the config's storage path (and XDG_DATA_HOME, for the default)", sc.path())
	}
	return nil
}

// openForCommand opens the storage sc names for a command (see openStore),
// as this host. On PostgreSQL the command writes after every change made
// so far, as a node that has applied them; the running nodes apply its
// writes as any other node's.
func (sc *StorageConfig) openForCommand(noKeyCheck bool) (storage.Store, []byte, error) {
	db, key, err := sc.openStore(defaultNodeName(), noKeyCheck)
	if err != nil {
		return nil, nil, err
	}
	if c, ok := db.(storage.Cluster); ok {
		ctx, cancel := context.WithTimeout(context.Background(), openTimeout)
		defer cancel()
		last, err := c.LastChange(ctx)
		if err != nil {
			db.Close()
			return nil, nil, err
		}
		c.SetApplied(last)
	}
	return db, key, nil
}

// existingStore opens the storage of the config the flags name, which
// must exist, for a command that reads it or repairs it (see
// openForCommand).
func existingStore(fl caddycmd.Flags, noKeyCheck bool) (*StorageConfig, storage.Store, []byte, error) {
	sc, _, err := commandApp(fl)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := sc.mustExist(); err != nil {
		return nil, nil, nil, err
	}
	db, key, err := sc.openForCommand(noKeyCheck)
	if err != nil {
		return nil, nil, nil, err
	}
	return sc, db, key, nil
}

func cmdForgetKeys(fl caddycmd.Flags) (int, error) {
	sc, db, _, err := existingStore(fl, true)
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
	fmt.Fprintf(w, "Database %s, %s.\n", sc.where(), sc.keyName())
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

func cmdExport(fl caddycmd.Flags) (int, error) {
	sc, db, key, err := existingStore(fl, false)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	f, err := exportStore(ctx, db, key, sc.path())
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("exporting %s: %v", sc.path(), err)
	}
	b, err := json.MarshalIndent(f, "", "  ")
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	b = append(b, '\n')
	out := fl.String("output")
	if out == "" || out == "-" {
		_, err = os.Stdout.Write(b)
		return caddy.ExitCodeSuccess, err
	}
	if err := writeFileAtomic(out, b); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("writing %s: %v", out, err)
	}
	fmt.Fprintf(os.Stderr, "Exported %d streams and %d certificates from %s to %s.\n", len(f.Streams), len(f.Certificates), sc.where(), out)
	return caddy.ExitCodeSuccess, nil
}

// maxExportFile bounds what import reads.
const maxExportFile = 256 << 20

func cmdImport(fl caddycmd.Flags, file string) (int, error) {
	sc, config, err := commandApp(fl)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	b, err := readBounded(file, maxExportFile)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	f, err := decodeExport(b)
	if err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("%s: %v; nothing was changed", file, err)
	}
	db, key, err := sc.openForCommand(false)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	defer db.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conflicts, err := importConflicts(ctx, db, key, sc.keyName(), config, f)
	if err != nil {
		return caddy.ExitCodeFailedStartup, err
	}
	if len(conflicts) > 0 {
		fmt.Fprintf(os.Stderr, "%s does not fit into %s:\n", file, sc.where())
		for _, c := range conflicts {
			fmt.Fprintf(os.Stderr, "  %s\n", c)
		}
		return caddy.ExitCodeFailedStartup, fmt.Errorf("%s: %d conflict(s), listed above; nothing was changed", file, len(conflicts))
	}
	if err := importStore(ctx, db, key, f); err != nil {
		return caddy.ExitCodeFailedStartup, fmt.Errorf("importing %s: %v", file, err)
	}
	fmt.Printf("Imported %d streams and %d certificates from %s into %s. A running Aegis on this storage serves them after a reload.\n",
		len(f.Streams), len(f.Certificates), file, sc.where())
	return caddy.ExitCodeSuccess, nil
}

// readBounded reads a file of at most limit bytes; - is standard input.
func readBounded(path string, limit int64) ([]byte, error) {
	var r io.Reader = os.Stdin
	if path != "-" {
		f, err := os.Open(path)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	b, err := io.ReadAll(io.LimitReader(r, limit+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %v", path, err)
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s: larger than %d MiB, too large for an export file", path, limit>>20)
	}
	return b, nil
}
