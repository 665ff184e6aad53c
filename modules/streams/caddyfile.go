package streams

import (
	"encoding/json"
	"fmt"
	"net"
	"reflect"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("streams", parseStreamsOption)
}

// parseStreamsOption sets up the streams app from the `streams` global
// option (see App.UnmarshalCaddyfile). Several `streams` blocks are merged
// into one app.
func parseStreamsOption(d *caddyfile.Dispenser, existingVal any) (any, error) {
	app := new(App)
	if existingVal != nil {
		existing, ok := existingVal.(httpcaddyfile.App)
		if !ok {
			return nil, d.Errf("existing streams config of unexpected type: %T", existingVal)
		}
		if err := json.Unmarshal(existing.Value, app); err != nil {
			return nil, d.Errf("parsing existing streams config: %v", err)
		}
	}
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{
		Name:  "streams",
		Value: caddyconfig.JSON(app, nil),
	}, nil
}

// UnmarshalCaddyfile sets up the app from Caddyfile tokens, appending to the
// hosts it already has. Syntax:
//
//	streams {
//		grace_period <duration>
//		storage sqlite <path> | storage postgres <dsn> | storage off
//		storage_key <64 hex digits, or a placeholder like {env.AEGIS_STREAMS_KEY}>
//		log_retention <entries per stream>
//		node_name <name>
//		host <id> [<name>] {
//			name <text>
//			protocol tcp|udp|tcp+udp
//			listen <address:port>|<port>|<address:first-last>
//			listen_address <ip>
//			listen_port <port>
//			upstream <host:port> [weight <n>] [backup]
//			load_balancing round_robin|least_connections|source_hash|random|first
//			fail_timeout_seconds <n>
//			upstream_host <host>
//			upstream_port <port>
//			enabled [true|false]
//			max_connections <n>
//			max_connections_per_ip <n>
//			connection_rate_per_ip <n>
//			connection_rate_window_seconds <n>
//			connection_timeout_seconds <n>
//			idle_timeout_seconds <n>
//			half_close [true|false]
//			proxy_protocol_version 0|1|2
//			sni <server name...>
//			whitelist_cidrs <cidr...>
//			blacklist_cidrs <cidr...>
//			accept_proxy_protocol off|optional|required
//			trusted_proxy_cidrs <cidr...>
//			proxy_header_timeout_seconds <n>
//			ssl_enabled [true|false]
//			ssl_cert_id <n>
//			ssl_cert_tag <tag>
//			ssl_domain <name>
//			upstream_tls [true|false]
//			upstream_tls_server_name <name>
//			upstream_tls_ca <pem>
//			upstream_tls_client_cert_id <n>
//			upstream_tls_insecure_skip_verify [true|false]
//			upload_rate_bytes <n>
//			download_rate_bytes <n>
//			health_check_enabled [true|false]
//			health_check_interval_seconds <n>
//			log_connections [true|false]
//			notes <text>
//		}
//	}
//
// Options are the JSON settings of a stream. `listen` is shorthand for
// listen_address and listen_port ([::1]:5432, 0.0.0.0:5432, :5432 or
// 5432), `upstream` for upstream_host and upstream_port (db.internal:5432
// or [2001:db8::5]:5432); repeated, or with a weight or backup, it
// makes upstreams, whose first one is also upstream_host and
// upstream_port. A boolean option alone means true; `enabled`
// is true unless set to false. A list (whitelist_cidrs, blacklist_cidrs,
// trusted_proxy_cidrs, sni) may repeat and append. upstream_tls_ca takes
// the PEM text as a heredoc (<<PEM ... PEM). Values are checked for syntax only; ranges and
// consistency are checked by Validate when the config is loaded.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume option name
	if d.CountRemainingArgs() > 0 {
		return d.Errf("streams takes no arguments, only a block")
	}

	ids := make(map[int64]bool, len(a.Hosts))
	for _, h := range a.Hosts {
		if h != nil {
			ids[h.ID] = true
		}
	}
	hasGracePeriod := a.GracePeriod != 0

	for nesting := d.Nesting(); d.NextBlock(nesting); {
		switch opt := d.Val(); opt {
		case "grace_period":
			if hasGracePeriod {
				return d.Errf("streams: duplicate option 'grace_period'")
			}
			v, err := oneArg(d, "streams")
			if err != nil {
				return err
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("streams: grace_period %q: not a duration (want e.g. 5s or 1m30s)", v)
			}
			a.GracePeriod, hasGracePeriod = caddy.Duration(dur), true
			if d.NextBlock(nesting + 1) {
				return d.Errf("streams: grace_period takes no block")
			}

		case "storage":
			if a.Storage != nil && (a.Storage.Path != "" || a.Storage.Disabled || a.Storage.Postgres != nil) {
				return d.Errf("streams: duplicate option 'storage'")
			}
			args := d.RemainingArgs()
			if a.Storage == nil {
				a.Storage = new(StorageConfig)
			}
			switch {
			case len(args) == 1 && args[0] == "off":
				a.Storage.Disabled = true
			case len(args) == 2 && args[0] == "sqlite" && args[1] != "":
				a.Storage.Path = args[1]
			case len(args) == 2 && args[0] == "postgres" && args[1] != "":
				a.Storage.Postgres = &PostgresConfig{DSN: args[1]}
			default:
				return d.Errf("streams: storage %q: want 'storage sqlite <path>', 'storage postgres <dsn>' or 'storage off'", strings.Join(args, " "))
			}
			if d.NextBlock(nesting + 1) {
				return d.Errf("streams: storage takes no block")
			}

		case "storage_key":
			if a.Storage != nil && a.Storage.Key != "" {
				return d.Errf("streams: duplicate option 'storage_key'")
			}
			if a.Storage == nil {
				a.Storage = new(StorageConfig)
			}
			v, err := oneArg(d, "streams")
			if err != nil {
				return err
			}
			a.Storage.Key = v
			if d.NextBlock(nesting + 1) {
				return d.Errf("streams: storage_key takes no block")
			}

		case "log_retention":
			if a.Storage != nil && a.Storage.LogRetention != 0 {
				return d.Errf("streams: duplicate option 'log_retention'")
			}
			if a.Storage == nil {
				a.Storage = new(StorageConfig)
			}
			if err := intArg(d, "streams", &a.Storage.LogRetention); err != nil {
				return err
			}
			if d.NextBlock(nesting + 1) {
				return d.Errf("streams: log_retention takes no block")
			}

		case "node_name":
			if a.NodeName != "" {
				return d.Errf("streams: duplicate option 'node_name'")
			}
			v, err := oneArg(d, "streams")
			if err != nil {
				return err
			}
			a.NodeName = v
			if d.NextBlock(nesting + 1) {
				return d.Errf("streams: node_name takes no block")
			}

		case "host":
			s, err := unmarshalHost(d, ids)
			if err != nil {
				return err
			}
			ids[s.ID] = true
			a.Hosts = append(a.Hosts, s)

		default:
			return d.Errf("streams: unknown option '%s' (want grace_period, storage, storage_key, log_retention, node_name or host)", opt)
		}
	}
	return nil
}

// unmarshalHost parses one `host <id> [<name>] { ... }`, the cursor on
// `host`. ids are the host ids already taken.
func unmarshalHost(d *caddyfile.Dispenser, ids map[int64]bool) (*spec.Stream, error) {
	args := d.RemainingArgs()
	if len(args) < 1 || len(args) > 2 {
		return nil, d.Errf("host: want <id> [<name>], got %d arguments", len(args))
	}
	id, err := strconv.ParseInt(args[0], 10, 64)
	if err != nil {
		return nil, d.Errf("host %q: id is not an integer", args[0])
	}
	if ids[id] {
		return nil, d.Errf("host %d: duplicate id; every host needs its own id", id)
	}
	s := &spec.Stream{ID: id, Enabled: true}
	where := "host " + args[0]
	fields := hostFields(s)

	// setBy records which option set each field, to refuse setting it twice.
	setBy := make(map[string]string)
	set := func(opt string, fields ...string) error {
		for _, f := range fields {
			if prev, ok := setBy[f]; ok {
				if prev == opt {
					return d.Errf("%s: duplicate option '%s'", where, opt)
				}
				return d.Errf("%s: option '%s' sets %s, already set by '%s'", where, opt, f, prev)
			}
			setBy[f] = opt
		}
		return nil
	}
	if len(args) == 2 {
		s.Name = args[1]
		setBy["name"] = "host"
	}

	// ups are the `upstream` options: one alone is upstream_host and
	// upstream_port, as before upstreams; several, or one with a weight or
	// backup, are upstreams.
	var ups []spec.Upstream
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		opt := d.Val()
		switch opt {
		case "whitelist_cidrs", "blacklist_cidrs", "sni":
			vals := d.RemainingArgs()
			if len(vals) == 0 {
				if opt == "sni" {
					return nil, d.Errf("%s: sni: want one or more server names", where)
				}
				return nil, d.Errf("%s: %s: want one or more CIDRs", where, opt)
			}
			switch opt {
			case "whitelist_cidrs":
				s.WhitelistCIDRs = append(s.WhitelistCIDRs, vals...)
			case "blacklist_cidrs":
				s.BlacklistCIDRs = append(s.BlacklistCIDRs, vals...)
			default:
				s.SNI = append(s.SNI, vals...)
			}

		case "upstream":
			if len(ups) == 0 {
				if err := set(opt, "upstream_host", "upstream_port"); err != nil {
					return nil, err
				}
			}
			u, err := parseUpstreamOption(d.RemainingArgs())
			if err != nil {
				return nil, d.Errf("%s: upstream %v", where, err)
			}
			ups = append(ups, u)

		case "listen":
			v, err := oneArg(d, where)
			if err != nil {
				return nil, err
			}
			fields := []string{"listen_address", "listen_port"}
			if strings.Contains(v, "-") {
				fields = append(fields, "listen_port_end")
			}
			if err := set(opt, fields...); err != nil {
				return nil, err
			}
			if s.ListenAddress, s.ListenPort, s.ListenPortEnd, err = parseListen(v); err != nil {
				return nil, d.Errf("%s: %s %q: %v", where, opt, v, err)
			}

		default:
			field, ok := fields[opt]
			if !ok {
				return nil, d.Errf("%s: unknown option '%s'", where, opt)
			}
			// A list may repeat and append, as whitelist_cidrs.
			if p, ok := field.(*[]string); ok {
				vals := d.RemainingArgs()
				if len(vals) == 0 {
					return nil, d.Errf("%s: %s: want one or more values", where, opt)
				}
				*p = append(*p, vals...)
				break
			}
			if err := set(opt, opt); err != nil {
				return nil, err
			}
			var err error
			switch p := field.(type) {
			case *string:
				*p, err = oneArg(d, where)
			case *int:
				err = intArg(d, where, p)
			case *int64:
				err = int64Arg(d, where, p)
			case *bool:
				err = boolArg(d, where, p)
			default:
				err = d.Errf("%s: option '%s' has no Caddyfile form; set it in JSON", where, opt)
			}
			if err != nil {
				return nil, err
			}
		}
		if d.NextBlock(nesting + 1) {
			return nil, d.Errf("%s: option '%s' takes no block", where, opt)
		}
	}
	if len(ups) > 0 {
		s.UpstreamHost, s.UpstreamPort = ups[0].Host, ups[0].Port
		if len(ups) > 1 || ups[0].Weight != 0 || ups[0].Backup {
			s.Upstreams = ups
		}
	}
	return s, nil
}

// parseUpstreamOption parses the arguments of `upstream <host:port>
// [weight <n>] [backup]`.
func parseUpstreamOption(args []string) (spec.Upstream, error) {
	var u spec.Upstream
	if len(args) == 0 {
		return u, fmt.Errorf("(none): want <host:port> [weight <n>] [backup]")
	}
	var err error
	if u.Host, u.Port, err = parseUpstream(args[0]); err != nil {
		return u, fmt.Errorf("%q: %v", args[0], err)
	}
	u.Weight, u.Backup, err = spec.ParseUpstreamOptions(args[0], args[1:])
	return u, err
}

// hostFields maps the host options that set one field, named as the
// field's JSON name, to that field of s: every setting of spec.Stream but
// the id (the host's argument) and the lists (options that append), so a
// new setting of a type below needs no change here.
func hostFields(s *spec.Stream) map[string]any {
	out := map[string]any{}
	v := reflect.ValueOf(s).Elem()
	for i := range v.NumField() {
		name, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("json"), ",")
		switch name {
		case "", "-", "id", "whitelist_cidrs", "blacklist_cidrs", "upstreams", "sni":
			continue
		}
		out[name] = v.Field(i).Addr().Interface()
	}
	return out
}

// oneArg returns the one argument of the current option.
func oneArg(d *caddyfile.Dispenser, where string) (string, error) {
	opt := d.Val()
	args := d.RemainingArgs()
	if len(args) != 1 {
		return "", d.Errf("%s: %s: want one value, got %d", where, opt, len(args))
	}
	return args[0], nil
}

func intArg(d *caddyfile.Dispenser, where string, dst *int) error {
	opt := d.Val()
	v, err := oneArg(d, where)
	if err != nil {
		return err
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return d.Errf("%s: %s %q: not an integer", where, opt, v)
	}
	*dst = n
	return nil
}

func int64Arg(d *caddyfile.Dispenser, where string, dst *int64) error {
	opt := d.Val()
	v, err := oneArg(d, where)
	if err != nil {
		return err
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return d.Errf("%s: %s %q: not an integer", where, opt, v)
	}
	*dst = n
	return nil
}

// boolArg reads an optional true|false; the option alone means true.
func boolArg(d *caddyfile.Dispenser, where string, dst *bool) error {
	opt := d.Val()
	args := d.RemainingArgs()
	switch {
	case len(args) == 0:
		*dst = true
	case len(args) > 1:
		return d.Errf("%s: %s: want true, false or nothing, got %d values", where, opt, len(args))
	case args[0] == "true":
		*dst = true
	case args[0] == "false":
		*dst = false
	default:
		return d.Errf("%s: %s %q: want true or false", where, opt, args[0])
	}
	return nil
}

// parseListen parses the `listen` shorthand: <address:port> or <port>,
// where the port may be a range <first>-<last>.
func parseListen(v string) (addr string, port, end int, err error) {
	const want = "want <address:port> or <port>, e.g. 127.0.0.1:5432, [::1]:5432, :5432, 5432 or a range 0.0.0.0:30000-30099"
	if strings.Contains(v, "/") {
		return "", 0, 0, fmt.Errorf("%s; set tcp or udp with the protocol option", want)
	}
	ports := v
	if i := strings.LastIndexByte(v, ':'); i >= 0 {
		ports = v[i+1:]
	}
	if first, last, ok := strings.Cut(ports, "-"); ok {
		a, err1 := strconv.Atoi(first)
		b, err2 := strconv.Atoi(last)
		if err1 != nil || err2 != nil || a < 0 || b < 0 {
			return "", 0, 0, fmt.Errorf("port range %q is not <first>-<last>; %s", ports, want)
		}
		addr, port, err = parseListenOne(v[:len(v)-len(ports)] + first)
		return addr, port, b, err
	}
	addr, port, err = parseListenOne(v)
	return addr, port, 0, err
}

// parseListenOne parses <address:port> or <port>.
func parseListenOne(v string) (addr string, port int, err error) {
	const want = "want <address:port> or <port>, e.g. 127.0.0.1:5432, [::1]:5432, :5432 or 5432"
	if n, err := strconv.Atoi(v); err == nil {
		return "", n, nil
	}
	return splitHostPort(v, want)
}

// splitHostPort splits host:port; want says what was expected.
func splitHostPort(v, want string) (host string, port int, err error) {
	host, ps, err := net.SplitHostPort(v)
	if err != nil {
		return "", 0, fmt.Errorf("%s", want)
	}
	port, err = strconv.Atoi(ps)
	if err != nil {
		return "", 0, fmt.Errorf("port %q is not an integer; %s", ps, want)
	}
	return host, port, nil
}

// parseUpstream parses the `upstream` shorthand: <host:port>.
func parseUpstream(v string) (host string, port int, err error) {
	const want = "want <host:port>, e.g. db.internal:5432, 10.0.0.5:5432 or [2001:db8::5]:5432"
	return splitHostPort(v, want)
}

// Interface guard.
var _ caddyfile.Unmarshaler = (*App)(nil)
