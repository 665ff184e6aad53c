package spec

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/aegis-proxy/caddy-aegis/certcheck"
)

// Limits of the free-text settings, in characters (Unicode code points).
const (
	MaxNameLength  = 200
	MaxNotesLength = 10000
)

// MaxID bounds stream and certificate ids: 2^53-1, the largest integer a
// JavaScript number (the UI's) holds exactly.
const MaxID = 1<<53 - 1

// MaxSeconds bounds the settings given in seconds: one year. Longer values
// are surely a mistake, and far longer ones would overflow a time.Duration.
const MaxSeconds = 365 * 24 * 60 * 60

// MaxUDPResponses bounds udp_responses: more replies than this to one
// datagram is not a request-reply protocol, and the idle timeout fits it.
const MaxUDPResponses = 1000

// MaxPerIP bounds max_connections_per_ip and connection_rate_per_ip.
const MaxPerIP = 1_000_000

// FieldError is one problem with one setting of one stream. Its message
// names the stream, the setting (by its JSON name), the bad value and what
// is allowed, e.g.
//
//	stream 3 ("postgres"): listen_port 70000: must be 1-65535
type FieldError struct {
	// ID and Name identify the stream.
	ID   int64
	Name string
	// Field is the JSON name of the setting, e.g. "listen_port".
	Field string
	// Value is the bad value as the API returns it: a number, a string or
	// a boolean. nil when the setting is missing, or too long to show.
	// The message shows numbers and booleans bare, strings quoted.
	Value any
	// Reason says what is wrong and what is allowed.
	Reason string

	// Inline shows Value unquoted, with Reason after it as the rest of one
	// sentence: "listen_port 5432/tcp overlaps stream 1 ...".
	Inline bool
	// New: the stream is being created and its id was not given; the
	// message calls it "the new stream" rather than by the id it would
	// get. MarkNew sets it.
	New bool
}

func (e *FieldError) Error() string { return e.Label() + ": " + e.Detail() }

// Label is how the message names the stream: `stream 3 ("postgres")`, or
// "the new stream".
func (e *FieldError) Label() string {
	if e.New {
		label := "the new stream"
		if e.Name != "" {
			label += fmt.Sprintf(" (%q)", ShortName(e.Name))
		}
		return label
	}
	return StreamLabel(e.ID, e.Name)
}

// Detail is the message without the stream's label: the setting, the
// value (a long string cut short, see ShortValue) and the reason.
func (e *FieldError) Detail() string {
	if e.Value == nil { // no value: the setting is missing
		return e.Field + ": " + e.Reason
	}
	v := ShortValue(e.Value)
	if e.Inline {
		return e.Field + " " + fmt.Sprint(v) + " " + e.Reason
	}
	if v, ok := v.(string); ok {
		return e.Field + " " + strconv.Quote(v) + ": " + e.Reason
	}
	return e.Field + " " + fmt.Sprint(v) + ": " + e.Reason
}

// MaxShownValue is the most characters of a string value that an error
// shows; a longer one is cut short.
const MaxShownValue = 100

// MaxErrorsPerField is the most problems reported for the entries of one
// list setting; one more problem says how many were left out.
const MaxErrorsPerField = 10

// ShortValue is v for an error message: a string that looks like a key or
// a PEM block is never shown (certcheck.Redacted), and one longer than
// MaxShownValue characters is cut, with "…" and its length after it, so
// that a huge bad value cannot make a huge answer.
func ShortValue(v any) any {
	s, ok := v.(string)
	if !ok {
		return v
	}
	if certcheck.LooksSecret(s) {
		return certcheck.Redacted
	}
	if len(s) <= MaxShownValue || utf8.RuneCountInString(s) <= MaxShownValue {
		return v
	}
	return fmt.Sprintf("%s… (%d characters)", string([]rune(s)[:MaxShownValue]), utf8.RuneCountInString(s))
}

// MarkNew makes every *FieldError in err speak of "the new stream": one
// whose id was not given, so the id it would get means nothing to the user.
func MarkNew(err error) {
	switch e := err.(type) {
	case nil:
	case *FieldError:
		e.New = true
	case interface{ Unwrap() []error }:
		for _, x := range e.Unwrap() {
			MarkNew(x)
		}
	default:
		MarkNew(errors.Unwrap(err))
	}
}

// ListenWhere says where a stream listens, for messages: "127.0.0.1:5432",
// or "port 5432 of every address" when it has no listen_address.
func (s *Stream) ListenWhere() string {
	if s.ListenAddress == "" {
		return fmt.Sprintf("port %d of every address", s.ListenPort)
	}
	return s.ListenHostPort()
}

// StreamLabel names a stream in messages: `stream 3 ("postgres")`, or
// `stream 3` when it has no name.
func StreamLabel(id int64, name string) string {
	if name == "" {
		return "stream " + strconv.FormatInt(id, 10)
	}
	return fmt.Sprintf("stream %d (%q)", id, ShortName(name))
}

// ShortName is a name for messages: one over MaxNameLength is cut short.
func ShortName(name string) string {
	if utf8.RuneCountInString(name) <= MaxNameLength {
		return name
	}
	return string([]rune(name)[:60]) + "…"
}

// Validate checks one stream on its own: every setting in range, name and
// notes within their limits, and the settings consistent with each other.
// It returns every problem found, joined with errors.Join, each one a
// *FieldError. Conflicts with other streams and with Caddy's own ports are
// the streams app's job.
func (s *Stream) Validate() error { return s.validate(true) }

// ValidateStored is Validate without the limits of name and notes, the
// rule against sni with accept_proxy_protocol, and the check of upstreams
// listed twice in two spellings, which came after some streams were
// stored: those run, and a write to them must keep to them.
func (s *Stream) ValidateStored() error { return s.validate(false) }

// validate is Validate, with the limits of name and notes checked only if
// limits is set.
func (s *Stream) validate(limits bool) error {
	var errs []error
	bad := func(field string, value any, reason string) {
		errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: field, Value: value, Reason: reason})
	}
	badInt := func(field string, v int64, reason string) {
		bad(field, v, reason)
	}

	switch {
	case s.ID <= 0:
		badInt("id", s.ID, "must be > 0")
	case s.ID > MaxID:
		badInt("id", s.ID, fmt.Sprintf("must be at most %d (2^53-1, the largest integer a browser's JavaScript holds exactly)", MaxID))
	}
	if limits {
		// The value is not repeated: it is too long for a message.
		for _, f := range []struct {
			field, v string
			max      int
		}{{"name", s.Name, MaxNameLength}, {"notes", s.Notes, MaxNotesLength}} {
			if n := utf8.RuneCountInString(f.v); n > f.max {
				errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: f.field,
					Reason: fmt.Sprintf("%d characters, more than the limit of %d; shorten it", n, f.max)})
			}
		}
		if r, at, ok := hiddenChar(s.Name); ok {
			// Not echoed: the character would act in logs and the UI.
			errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: "name",
				Reason: fmt.Sprintf("has %U at character %d, a control or format character (such as a text direction or line separator); use visible characters only", r, at)})
		}
	}

	switch s.Protocol {
	case "", ProtocolTCP, ProtocolUDP, ProtocolTCPUDP:
	default:
		bad("protocol", s.Protocol, "must be tcp, udp or tcp+udp")
	}

	// A required setting left out (0 or "") is "required", without a
	// value.
	required := func(field, reason string) {
		errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: field, Reason: "required; " + reason})
	}
	if reason := CheckListenAddress(s.ListenAddress); reason != "" {
		bad("listen_address", s.ListenAddress, reason)
	}
	switch {
	case s.ListenPort == 0:
		required("listen_port", "must be 1-65535")
	case !ValidPort(s.ListenPort):
		badInt("listen_port", int64(s.ListenPort), "must be 1-65535")
	}
	many := len(s.Upstreams) > 0
	switch reason := checkUpstreamHost(s.UpstreamHost); {
	case s.UpstreamHost == "" && many:
	case s.UpstreamHost == "":
		required("upstream_host", upstreamHostWant)
	case reason != "":
		bad("upstream_host", s.UpstreamHost, reason)
	}
	switch {
	case s.UpstreamPort == 0 && many:
	case s.UpstreamPort == 0:
		required("upstream_port", "must be 1-65535")
	case !ValidPort(s.UpstreamPort):
		badInt("upstream_port", int64(s.UpstreamPort), "must be 1-65535")
	}
	errs = append(errs, s.validateUpstreams(limits)...)
	errs = append(errs, s.validateRange()...)
	errs = append(errs, s.validateSNI(limits)...)

	if s.MaxConnections < 0 {
		badInt("max_connections", int64(s.MaxConnections), "must be >= 0 (0 = unlimited)")
	}
	if s.MaxConnectionsPerIP < 0 || s.MaxConnectionsPerIP > MaxPerIP {
		badInt("max_connections_per_ip", int64(s.MaxConnectionsPerIP), fmt.Sprintf("must be 0-%d (0 = unlimited)", MaxPerIP))
	}
	if s.ConnectionRatePerIP < 0 || s.ConnectionRatePerIP > MaxPerIP {
		badInt("connection_rate_per_ip", int64(s.ConnectionRatePerIP), fmt.Sprintf("must be 0-%d (0 = unlimited)", MaxPerIP))
	}
	for _, f := range []struct {
		field string
		v     int
		zero  string
	}{
		{"connection_timeout_seconds", s.ConnectionTimeoutSeconds, "0 = 10s"},
		{"idle_timeout_seconds", s.IdleTimeoutSeconds, "0 = TCP never, UDP 60s"},
		{"health_check_interval_seconds", s.HealthCheckIntervalSeconds, "0 = 30s"},
		{"connection_rate_window_seconds", s.ConnectionRateWindowSeconds, "0 = 60s"},
	} {
		if f.v < 0 || f.v > MaxSeconds {
			badInt(f.field, int64(f.v), fmt.Sprintf("must be 0-%d, one year at most (%s)", MaxSeconds, f.zero))
		}
	}
	if s.UDPResponses < 0 || s.UDPResponses > MaxUDPResponses {
		badInt("udp_responses", int64(s.UDPResponses), fmt.Sprintf("must be 0-%d (0 = off: entries end on the idle timeout)", MaxUDPResponses))
	}
	if s.UploadRateBytes < 0 {
		badInt("upload_rate_bytes", s.UploadRateBytes, "must be >= 0 (0 = unlimited)")
	}
	if s.DownloadRateBytes < 0 {
		badInt("download_rate_bytes", s.DownloadRateBytes, "must be >= 0 (0 = unlimited)")
	}

	switch s.ProxyProtocolVersion {
	case 0, 2:
	case 1:
		if s.HasUDP() {
			badInt("proxy_protocol_version", 1, fmt.Sprintf("version 1 cannot describe udp; use 2 or 0 on a %s stream", s.EffectiveProtocol()))
		}
	default:
		badInt("proxy_protocol_version", int64(s.ProxyProtocolVersion), "must be 0 (off), 1 or 2")
	}

	for _, l := range []struct {
		field string
		list  []string
	}{{"whitelist_cidrs", s.WhitelistCIDRs}, {"blacklist_cidrs", s.BlacklistCIDRs}} {
		n := 0
		for _, c := range l.list {
			_, err := ParseCIDR(c)
			if err == nil {
				continue
			}
			if n++; n <= MaxErrorsPerField {
				bad(l.field, c, err.Error())
			}
		}
		if n > MaxErrorsPerField {
			errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: l.field,
				Reason: fmt.Sprintf("… and %d more invalid entries (%d in all); fix or remove them", n-MaxErrorsPerField, n)})
		}
	}

	switch {
	case s.SSLCertID < 0:
		badInt("ssl_cert_id", s.SSLCertID, "must be >= 0")
	case s.SSLCertID > MaxID:
		badInt("ssl_cert_id", s.SSLCertID, fmt.Sprintf("must be at most %d (2^53-1)", MaxID))
	}
	if s.SSLEnabled {
		if !s.HasTCP() {
			bad("ssl_enabled", true, "tls needs a tcp listener; use protocol tcp or tcp+udp, or turn ssl_enabled off")
		}
		switch n := countSet(s.SSLCertID > 0, s.SSLCertTag != "", s.SSLDomain != ""); {
		case n == 0:
			badInt("ssl_cert_id", 0, "must be > 0 (a stored certificate's id) when ssl_enabled is true")
		case n > 1:
			bad("ssl_cert_id", s.SSLCertID, "give one of ssl_cert_id, ssl_cert_tag and ssl_domain, not several")
		}
	}
	if s.SSLDomain != "" {
		if err := certcheck.ValidateDomains([]string{s.SSLDomain}); err != nil {
			bad("ssl_domain", s.SSLDomain, strings.TrimPrefix(err.Error(), "domains: "))
		}
	}

	switch s.AcceptProxyProtocol {
	case "", ProxyAcceptOff, ProxyAcceptOptional, ProxyAcceptRequired:
		if s.AcceptsProxy() && len(s.TrustedProxyCIDRs) == 0 {
			required("trusted_proxy_cidrs", "list the front proxies' addresses (e.g. 10.0.0.0/8 or 192.0.2.7) when accept_proxy_protocol is "+s.AcceptProxyProtocol)
		}
	default:
		bad("accept_proxy_protocol", s.AcceptProxyProtocol, "must be off, optional or required")
	}
	for _, c := range s.TrustedProxyCIDRs {
		if _, err := ParseCIDR(c); err != nil {
			bad("trusted_proxy_cidrs", c, err.Error())
		}
	}
	if s.ProxyHeaderTimeoutSeconds < 0 || s.ProxyHeaderTimeoutSeconds > MaxProxyHeaderTimeoutSeconds {
		badInt("proxy_header_timeout_seconds", int64(s.ProxyHeaderTimeoutSeconds), fmt.Sprintf("must be 0-%d (0 = 5s)", MaxProxyHeaderTimeoutSeconds))
	}

	if s.UpstreamTLS && !s.HasTCP() {
		bad("upstream_tls", true, "tls to the upstream needs a tcp listener; use protocol tcp or tcp+udp, or turn upstream_tls off")
	}
	if s.UpstreamTLSServerName != "" {
		if reason := checkUpstreamHost(s.UpstreamTLSServerName); reason != "" {
			bad("upstream_tls_server_name", s.UpstreamTLSServerName, strings.Replace(reason, "put the port in upstream_port", "a server name has no port", 1))
		}
	}
	if s.UpstreamTLSCA != "" {
		if _, err := ParseCAPEM(s.UpstreamTLSCA); err != nil {
			// The PEM text is too long to repeat.
			errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: "upstream_tls_ca", Reason: err.Error()})
		}
	}
	if s.UpstreamTLSClientCertID < 0 {
		badInt("upstream_tls_client_cert_id", s.UpstreamTLSClientCertID, "must be >= 0 (0 = none)")
	}

	return errors.Join(errs...)
}

// MaxProxyHeaderTimeoutSeconds bounds proxy_header_timeout_seconds: a
// front proxy sends its header at once.
const MaxProxyHeaderTimeoutSeconds = 300

// MaxCAPEMLength bounds upstream_tls_ca, in bytes.
const MaxCAPEMLength = 1 << 20

// AcceptsProxy reports whether the stream reads PROXY headers from a front
// proxy.
func (s *Stream) AcceptsProxy() bool {
	return s.AcceptProxyProtocol == ProxyAcceptOptional || s.AcceptProxyProtocol == ProxyAcceptRequired
}

// ParseCAPEM parses upstream_tls_ca: PEM text of one or more CA
// certificates and nothing else. The error says what is wrong.
func ParseCAPEM(s string) (*x509.CertPool, error) {
	if len(s) > MaxCAPEMLength {
		return nil, fmt.Errorf("%d bytes, more than the limit of %d; give only the CA certificates", len(s), MaxCAPEMLength)
	}
	pool := x509.NewCertPool()
	rest := []byte(s)
	n := 0
	for {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		n++
		if b.Type != "CERTIFICATE" {
			if strings.Contains(b.Type, "PRIVATE KEY") {
				return nil, fmt.Errorf("block %d is a private key; give only the CA's certificate (a private key never goes here)", n)
			}
			return nil, fmt.Errorf("block %d is a %q; want only CERTIFICATE blocks", n, b.Type)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %v", n, err)
		}
		pool.AddCert(c)
	}
	if n == 0 {
		return nil, errors.New("no PEM certificate found; paste the CA certificate(s), each from its BEGIN CERTIFICATE line to its END CERTIFICATE line")
	}
	if strings.TrimSpace(string(rest)) != "" {
		return nil, errors.New("text after the last certificate is not PEM; give only CERTIFICATE blocks")
	}
	return pool, nil
}

// hiddenChar finds the first control or format character in s (Unicode
// categories Cc, Cf, Zl and Zp: U+0000-U+001F, U+007F-U+009F, U+200E,
// U+202E, U+2028, U+FEFF, ...), or an invalid UTF-8 byte, and its
// position, counted in characters from 1.
func hiddenChar(s string) (r rune, at int, ok bool) {
	for _, r := range s {
		at++
		if r == utf8.RuneError || unicode.In(r, unicode.Cc, unicode.Cf, unicode.Zl, unicode.Zp) {
			return r, at, true
		}
	}
	return 0, 0, false
}

// validateSNI checks the sni names; with limits, also that the stream
// does not read PROXY headers, a rule that came after some were stored.
func (s *Stream) validateSNI(limits bool) []error {
	if len(s.SNI) == 0 {
		return nil
	}
	var errs []error
	bad := func(value any, reason string) {
		errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: "sni", Value: value, Reason: reason})
	}
	if s.EffectiveProtocol() != ProtocolTCP {
		bad(strings.Join(s.SNI, " "), fmt.Sprintf("server names route TLS over TCP; use protocol tcp, not %s, or leave sni empty", s.EffectiveProtocol()))
	}
	if s.IsRange() {
		bad(strings.Join(s.SNI, " "), "not with a port range (listen_port_end); give the stream one port")
	}
	if limits && s.AcceptsProxy() {
		errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: "accept_proxy_protocol", Value: s.AcceptProxyProtocol,
			Reason: "not with sni: the server name is read from the first bytes, where a front proxy's PROXY header would be; use off, or leave sni empty"})
	}
	seen := map[string]bool{}
	for _, n := range s.SNI {
		if strings.HasPrefix(n, "*.") && strings.Count(n, "*") == 1 || !strings.Contains(n, "*") {
			if err := certcheck.ValidateDomains([]string{n}); err != nil {
				bad(n, strings.TrimPrefix(err.Error(), "domains: "))
				continue
			}
			if _, err := netip.ParseAddr(n); err == nil {
				bad(n, "an IP address is not a server name; give a DNS name, e.g. db.example.com or *.example.com")
				continue
			}
		} else {
			bad(n, "a wildcard must be the whole first label, e.g. *.example.com")
			continue
		}
		if seen[strings.ToLower(n)] {
			bad(n, "given twice")
		}
		seen[strings.ToLower(n)] = true
	}
	return errs
}

// validateRange checks listen_port_end and that each upstream port of the
// range is a port.
func (s *Stream) validateRange() []error {
	if s.ListenPortEnd == 0 {
		return nil
	}
	bad := func(field string, value any, reason string) []error {
		return []error{&FieldError{ID: s.ID, Name: s.Name, Field: field, Value: value, Reason: reason}}
	}
	end := int64(s.ListenPortEnd)
	switch {
	case !ValidPort(s.ListenPortEnd):
		return bad("listen_port_end", end, "must be 1-65535 (0 = listen_port alone)")
	case !ValidPort(s.ListenPort):
		return nil // reported on listen_port
	case s.ListenPortEnd < s.ListenPort:
		return bad("listen_port_end", end, fmt.Sprintf("must be at least listen_port (%d)", s.ListenPort))
	case s.ListenPortEnd-s.ListenPort+1 > MaxPortRange:
		return bad("listen_port_end", end, fmt.Sprintf("%d ports from listen_port %d; at most %d", s.ListenPortEnd-s.ListenPort+1, s.ListenPort, MaxPortRange))
	}
	if s.UpstreamPortFixed {
		return nil
	}
	k := s.ListenPortEnd - s.ListenPort
	for i, u := range s.UpstreamList() {
		if ValidPort(u.Port) && u.Port+k > 65535 {
			reason := fmt.Sprintf("with %d listen ports it would go up to %d, past 65535; use a lower port or upstream_port_fixed", k+1, u.Port+k)
			if len(s.Upstreams) > 0 {
				return bad("upstreams", u.HostPort(), fmt.Sprintf("upstreams[%d].port: %s", i, reason))
			}
			return bad("upstream_port", int64(u.Port), reason)
		}
	}
	return nil
}

// validateUpstreams checks upstreams, load_balancing and
// fail_timeout_seconds.
func (s *Stream) validateUpstreams(limits bool) []error {
	var errs []error
	bad := func(field string, value any, reason string) {
		errs = append(errs, &FieldError{ID: s.ID, Name: s.Name, Field: field, Value: value, Reason: reason})
	}
	switch s.LoadBalancing {
	case "", BalanceRoundRobin, BalanceLeastConnections, BalanceSourceHash, BalanceRandom, BalanceFirst:
	default:
		bad("load_balancing", s.LoadBalancing, "must be round_robin, least_connections, source_hash, random or first")
	}
	if s.FailTimeoutSeconds < 0 || s.FailTimeoutSeconds > MaxSeconds {
		bad("fail_timeout_seconds", int64(s.FailTimeoutSeconds), fmt.Sprintf("must be 0-%d (0 = 10s)", MaxSeconds))
	}
	if len(s.Upstreams) == 0 {
		return errs
	}
	if len(s.Upstreams) > MaxUpstreams {
		bad("upstreams", int64(len(s.Upstreams)), fmt.Sprintf("too many; at most %d", MaxUpstreams))
		return errs
	}
	first := s.Upstreams[0]
	if s.UpstreamHost != "" && s.UpstreamHost != first.Host || s.UpstreamPort != 0 && s.UpstreamPort != first.Port {
		bad("upstream_host", s.UpstreamHostPort(), fmt.Sprintf(
			"upstream_host and upstream_port differ from the first of upstreams (%s); leave them out, or give the same", first.HostPort()))
	}
	seen := map[string]int{}
	primary := false
	for i, u := range s.Upstreams {
		// Each error is on upstreams, with the upstream as given, and
		// says which part of which one.
		item := func(part, reason string) {
			bad("upstreams", u.HostPort(), fmt.Sprintf("upstreams[%d]%s: %s", i, part, reason))
		}
		switch reason := checkUpstreamHost(u.Host); {
		case u.Host == "":
			item(".host", "required; "+upstreamHostWant)
		case reason != "":
			item(".host", reason)
		}
		if !ValidPort(u.Port) {
			item(".port", fmt.Sprintf("%d: must be 1-65535", u.Port))
		}
		if u.Weight < 0 || u.Weight > MaxWeight {
			item(".weight", fmt.Sprintf("%d: must be 1-%d (0 = 1)", u.Weight, MaxWeight))
		}
		// Spelled otherwise (a name's case, a mapped address) only with
		// the limits: streams stored before that check keep loading.
		key := u.HostPort()
		if limits {
			key = sameUpstream(u)
		}
		if j, ok := seen[key]; ok {
			item("", fmt.Sprintf("listed twice (also upstreams[%d]); give each upstream once and set its weight", j))
		} else {
			seen[key] = i
		}
		primary = primary || !u.Backup
	}
	if !primary {
		bad("upstreams", int64(len(s.Upstreams)), "every upstream is a backup; make at least one not a backup")
	}
	return errs
}

// ValidPort reports whether p is a port number, 1-65535.
func ValidPort(p int) bool { return p >= 1 && p <= 65535 }

// CheckListenAddress returns why a is not a valid listen_address, or "".
func CheckListenAddress(a string) string {
	if a == "" {
		return ""
	}
	const want = "must be an IP address (e.g. 0.0.0.0, 127.0.0.1, :: or ::1), or empty for every address"
	ip, err := netip.ParseAddr(a)
	if err != nil {
		if strings.HasPrefix(a, "[") && strings.HasSuffix(a, "]") {
			return want + "; write an IPv6 address without brackets"
		}
		if _, _, err := splitPort(a); err == nil {
			return want + "; put the port in listen_port"
		}
		return want + "; hostnames are not allowed"
	}
	if ip.Zone() != "" {
		return "an IP zone is not allowed here; " + want
	}
	return ""
}

// sameUpstream is u's host and port as one key for every spelling of
// them: a name in any case, with or without its final dot; an address in
// any of its forms (an IPv4-mapped one as IPv4).
func sameUpstream(u Upstream) string {
	if a, err := netip.ParseAddr(u.Host); err == nil {
		return netip.AddrPortFrom(a.Unmap(), uint16(u.Port)).String()
	}
	return net.JoinHostPort(strings.ToLower(strings.TrimSuffix(u.Host, ".")), strconv.Itoa(u.Port))
}

// upstreamHostWant says what an upstream_host must be.
const upstreamHostWant = "must be a hostname or an IP address (e.g. db.internal, 10.0.0.5 or 2001:db8::5)"

// checkUpstreamHost returns why h is not a valid upstream_host, or "".
// A valid one is an IP address or a DNS hostname (letters, digits, '-' and
// '_' in dot-separated labels; '_' for container service names).
func checkUpstreamHost(h string) string {
	const want = upstreamHostWant
	if h == "" {
		return "required; " + want
	}
	if strings.IndexFunc(h, func(r rune) bool { return unicode.IsSpace(r) || unicode.IsControl(r) }) >= 0 {
		return "must not contain spaces or control characters; " + want
	}
	if ip, err := netip.ParseAddr(h); err == nil {
		// A zone is allowed, as dialing a link-local upstream needs it,
		// but only an interface's name or index.
		if z := ip.Zone(); z != "" && !validZone(z) {
			return fmt.Sprintf("the IPv6 zone %q is not an interface name; write the address as fe80::1%%eth0, with the name (or index) of the interface the upstream is on", ShortValue(z))
		}
		return ""
	}
	if strings.HasPrefix(h, "[") && strings.HasSuffix(h, "]") {
		return want + "; write an IPv6 address without brackets"
	}
	if strings.Contains(h, ":") {
		if _, _, err := splitPort(h); err == nil {
			return want + "; put the port in upstream_port"
		}
		return want
	}
	name := strings.TrimSuffix(h, ".")
	if len(name) > 253 {
		return want + "; a hostname has at most 253 characters"
	}
	labels := strings.Split(name, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 {
			return want + "; each dot-separated part of a hostname has 1-63 characters"
		}
		if l[0] == '-' || l[len(l)-1] == '-' {
			return want + "; a hostname part cannot start or end with '-'"
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return want + "; a hostname has only letters, digits, '-', '_' and '.' (use the xn-- form for international names)"
			}
		}
	}
	if last := labels[len(labels)-1]; strings.Trim(last, "0123456789") == "" {
		return want + "; not a valid IP address"
	}
	return ""
}

// validZone reports whether z can be an interface's name (as Linux allows
// it: 1-15 bytes, no '/', no space, not "." or "..") made of letters,
// digits, '.', '-', '_' and '@', or its index.
func validZone(z string) bool {
	if len(z) == 0 || len(z) > 15 || z == "." || z == ".." {
		return false
	}
	for i := 0; i < len(z); i++ {
		c := z[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '-' || c == '_' || c == '@') {
			return false
		}
	}
	return true
}

// splitPort splits "host:port" with a numeric port; it is used only to
// recognise a port written in an address setting.
func splitPort(hp string) (host string, port int, err error) {
	i := strings.LastIndexByte(hp, ':')
	if i < 0 {
		return "", 0, errors.New("no port")
	}
	host, ps := hp[:i], hp[i+1:]
	if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1]
	} else if strings.Contains(host, ":") {
		return "", 0, errors.New("bare IPv6 address")
	}
	port, err = strconv.Atoi(ps)
	if err != nil || ps == "" || ps[0] == '+' || ps[0] == '-' {
		return "", 0, errors.New("not a port")
	}
	return host, port, nil
}

// hostBits warns of each CIDR of list whose address has bits past its
// prefix length ("10.0.0.5/8"): it is taken as the whole network, which is
// seldom what was meant.
func hostBits(field string, list []string) []string {
	var w []string
	for _, c := range list {
		p, err := ParseCIDR(c)
		if err != nil || !strings.Contains(c, "/") {
			continue
		}
		raw, err := netip.ParsePrefix(strings.TrimSpace(c))
		if err != nil || raw.Addr().Unmap() == p.Addr() {
			continue
		}
		single := 32
		if raw.Addr().Is6() && !raw.Addr().Is4In6() {
			single = 128
		}
		w = append(w, fmt.Sprintf("%s %q: has bits set past /%d, so it means all of %s; write %s, or %s/%d for the one address",
			field, c, p.Bits(), p, p, raw.Addr().Unmap(), single))
	}
	return w
}

// Warnings returns advice about a stream that is valid but may not work as
// meant: a privileged port, or the well-known port of a common service that
// may already be bound on this machine. Each message starts with the field
// and value (e.g. "listen_port 22: ..."); callers add the stream's name.
func (s *Stream) Warnings() []string {
	var w []string
	if s.HealthCheckEnabled && s.EffectiveProtocol() == ProtocolUDP {
		w = append(w, "health_check_enabled: health checks are TCP dials and say nothing about a UDP-only upstream; its health shows not_checked")
	}
	if s.HalfClose && s.EffectiveProtocol() == ProtocolUDP {
		w = append(w, "half_close: applies to TCP connections only; a UDP-only stream has none")
	}
	if s.ConnectionRateWindowSeconds > 0 && s.ConnectionRatePerIP == 0 {
		w = append(w, "connection_rate_window_seconds: does nothing without connection_rate_per_ip")
	}
	if s.MaxConnections > 0 && s.MaxConnectionsPerIP > s.MaxConnections {
		w = append(w, fmt.Sprintf("max_connections_per_ip %d: above max_connections %d, so it never applies", s.MaxConnectionsPerIP, s.MaxConnections))
	}
	if s.UpstreamPortFixed && !s.IsRange() {
		w = append(w, "upstream_port_fixed: applies to a port range (listen_port_end) only")
	}
	if len(s.SNI) > 0 && !s.SSLEnabled {
		w = append(w, "sni: without ssl_enabled the TLS bytes pass through to the upstream, which must serve these names")
	}
	if s.UDPResponses > 0 && !s.HasUDP() {
		w = append(w, "udp_responses: applies to UDP NAT entries only; a TCP-only stream has none")
	}
	if len(s.TrustedProxyCIDRs) > 0 && !s.AcceptsProxy() {
		w = append(w, "trusted_proxy_cidrs: does nothing while accept_proxy_protocol is off")
	}
	w = append(w, hostBits("whitelist_cidrs", s.WhitelistCIDRs)...)
	w = append(w, hostBits("blacklist_cidrs", s.BlacklistCIDRs)...)
	w = append(w, hostBits("trusted_proxy_cidrs", s.TrustedProxyCIDRs)...)
	if s.UpstreamTLS {
		if s.UpstreamTLSInsecureSkipVerify {
			w = append(w, "upstream_tls_insecure_skip_verify: the upstream's certificate is not checked, so anyone on the path can pose as the upstream; give its CA in upstream_tls_ca instead")
		}
		if s.EffectiveProtocol() == ProtocolTCPUDP {
			w = append(w, "upstream_tls: applies to TCP connections only; UDP datagrams go to the upstream as they are")
		}
	} else {
		for _, f := range []struct {
			field string
			set   bool
		}{
			{"upstream_tls_server_name", s.UpstreamTLSServerName != ""},
			{"upstream_tls_ca", s.UpstreamTLSCA != ""},
			{"upstream_tls_client_cert_id", s.UpstreamTLSClientCertID > 0},
			{"upstream_tls_insecure_skip_verify", s.UpstreamTLSInsecureSkipVerify},
		} {
			if f.set {
				w = append(w, f.field+": does nothing while upstream_tls is off")
			}
		}
	}
	if !ValidPort(s.ListenPort) {
		return w
	}
	prefix := "listen_port " + strconv.Itoa(s.ListenPort) + ": "
	if s.ListenPort < 1024 {
		w = append(w, prefix+"a privileged port (below 1024); binding it needs root or CAP_NET_BIND_SERVICE")
	}
	if svc, ok := wellKnownPorts[s.ListenPort]; ok {
		w = append(w, prefix+"the well-known port of "+svc+"; a local "+svc+" server may already listen on it")
	}
	return w
}

// wellKnownPorts are the ports of common services, for Warnings.
var wellKnownPorts = map[int]string{
	20: "FTP data", 21: "FTP", 22: "SSH", 23: "Telnet", 25: "SMTP", 53: "DNS",
	67: "DHCP", 68: "DHCP", 69: "TFTP", 80: "HTTP", 110: "POP3", 111: "RPC portmapper",
	123: "NTP", 137: "NetBIOS", 138: "NetBIOS", 139: "NetBIOS", 143: "IMAP",
	161: "SNMP", 162: "SNMP traps", 389: "LDAP", 443: "HTTPS", 445: "SMB",
	465: "SMTPS", 514: "syslog", 587: "SMTP submission", 631: "IPP/CUPS",
	636: "LDAPS", 853: "DNS over TLS", 873: "rsync", 993: "IMAPS", 995: "POP3S",
	1433: "Microsoft SQL Server", 1521: "Oracle Database", 1883: "MQTT",
	2019: "the Caddy admin API", 2049: "NFS", 2375: "Docker API", 2376: "Docker API (TLS)",
	2379: "etcd", 3306: "MySQL", 3389: "RDP", 5353: "mDNS", 5432: "PostgreSQL",
	5672: "AMQP", 5900: "VNC", 6379: "Redis", 6443: "the Kubernetes API",
	8883: "MQTT over TLS", 9092: "Kafka", 9200: "Elasticsearch",
	11211: "memcached", 27017: "MongoDB",
}

// countSet counts the true values.
func countSet(set ...bool) int {
	n := 0
	for _, b := range set {
		if b {
			n++
		}
	}
	return n
}
