package streams

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/spec"
	"github.com/aegis-proxy/caddy-aegis/storage"
)

// Validate implements caddy.Validator. It checks every host (see
// Stream.Validate), that ids are unique, and that no two enabled hosts, nor
// an enabled host and Caddy itself, would listen on the same port. It
// returns every problem found, joined with errors.Join. Provision runs
// the checks before it builds the streams, so Caddy's call after
// Provision has nothing left to check.
func (a *App) Validate() error {
	if a.validated {
		return nil
	}
	return a.validate()
}

// onValidate is called on each run of the checks, for tests.
var onValidate = func() {}

func (a *App) validate() error {
	onValidate()
	var errs []error
	if a.GracePeriod < 0 {
		errs = append(errs, fmt.Errorf("grace_period %s: must be >= 0 (0 = 5s)", time.Duration(a.GracePeriod)))
	}
	if a.Storage != nil && a.Storage.LogRetention < -1 {
		errs = append(errs, fmt.Errorf("storage log_retention %d: must be >= -1 (-1 = keep all, 0 = 10000)", a.Storage.LogRetention))
	}
	errs = append(errs, a.validateList(a.Hosts, true)...)
	return errors.Join(errs...)
}

// validateHosts checks the config's hosts together with the stored ones:
// ids and listen ports may not collide between the two. On a cluster it
// returns the stored hosts without those that collide with this node's
// config: other nodes stored them, and they run there, not here (as
// applyHost does with a change made on another node); elsewhere a
// collision is the config's error.
func (a *App) validateHosts(config []*spec.Stream, stored []storage.Stored) ([]storage.Stored, error) {
	if err := a.validate(); err != nil {
		return nil, err
	}
	a.validated = true
	if a.store != nil && a.store.cluster != nil {
		stored = a.runnableHere(config, stored)
	}
	if len(stored) == 0 {
		return stored, nil
	}
	all := append([]*spec.Stream(nil), config...)
	for _, h := range stored {
		all = append(all, &h.Stream)
	}
	// The config's hosts have passed Validate; stored ones are not held
	// to the limits of name and notes, which came after some were stored:
	// they run, and a write to them must keep to the limits.
	if err := errors.Join(a.validateList(all, false)...); err != nil {
		return nil, fmt.Errorf("the config's streams and the %d stored through the API (in %s) do not fit together; change the config, or change or delete the stored stream through the API:\n%w",
			len(stored), a.store.where, err)
	}
	return stored, nil
}

// runnableHere is stored without the hosts that take the id of one of
// this node's config streams, or a port an enabled one listens on; each
// left out is logged.
func (a *App) runnableHere(config []*spec.Stream, stored []storage.Stored) []storage.Stored {
	byID := make(map[int64]*spec.Stream, len(config))
	var enabled []*spec.Stream
	for _, s := range config {
		if s == nil {
			continue // validate reported it
		}
		byID[s.ID] = s
		if s.Enabled {
			enabled = append(enabled, s)
		}
	}
	var kept []storage.Stored
	for _, h := range stored {
		var err error
		if c := byID[h.ID]; c != nil {
			err = fmt.Errorf("%w: id %d is taken by %s, declared in this node's Caddy config", spec.ErrConflict, h.ID, spec.StreamLabel(c.ID, c.Name))
		} else if h.Enabled {
			err = errors.Join(a.listenConflicts(&h.Stream, enabled, true)...) // as applyHost checks it
		}
		if err != nil {
			a.logger.Error("a stream stored through the API cannot run on this node; it runs on the nodes whose config leaves room for it",
				zap.Int64("stream_id", h.ID), zap.String("stream", h.Name), zap.Error(err))
			continue
		}
		kept = append(kept, h)
	}
	return kept
}

// validateList checks every host on its own (with the limits of name and
// notes if limits is set), that ids are unique and that no two enabled
// hosts, nor one and Caddy itself, share a port.
func (a *App) validateList(hosts []*spec.Stream, limits bool) []error {
	var errs []error
	byID := make(map[int64]*spec.Stream, len(hosts))
	var enabled []*spec.Stream
	for i, s := range hosts {
		if s == nil {
			errs = append(errs, fmt.Errorf("hosts[%d]: null: must be a stream object", i))
			continue
		}
		validate := s.Validate
		if !limits {
			validate = s.ValidateStored
		}
		if err := validate(); err != nil {
			errs = append(errs, err)
		}
		if first, dup := byID[s.ID]; dup {
			errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "id", Value: s.ID,
				Reason: "already used by " + spec.StreamLabel(first.ID, first.Name) + "; every stream needs its own id"})
		} else {
			byID[s.ID] = s
		}
		if s.Enabled {
			errs = append(errs, a.listenConflicts(s, enabled, limits)...)
			enabled = append(enabled, s)
		}
	}
	// Loops: only with the limits, as for name and notes; stored streams
	// that relay into one another run, and the run-time check stops a
	// real loop.
	if limits {
		var local localAddrs
		for _, s := range enabled {
			errs = append(errs, a.upstreamLoops(s, enabled, &local)...)
		}
	}
	return errs
}

// validateListen checks where s would listen against the running enabled
// streams (other than s's own id) and the ports Caddy holds, and that no
// stream relays into another or to Caddy's admin endpoint, as Validate
// does for a whole config. A disabled s conflicts with nothing. The caller
// holds a.mu.
func (a *App) validateListen(s *spec.Stream) error {
	if !s.Enabled {
		return nil
	}
	var others []*spec.Stream
	for _, inst := range a.streams {
		if inst.cfg.Enabled && inst.cfg.ID != s.ID {
			others = append(others, inst.cfg)
		}
	}
	errs := a.listenConflicts(s, others, true)
	var local localAddrs
	errs = append(errs, a.upstreamLoops(s, append(others, s), &local)...)
	if into := relayedInto(s, others, &local); len(into) > 0 {
		// A port that another program holds is the address a stream
		// relays to, not a loop: say that it is in use.
		if err := a.probe(s); err != nil {
			errs = append(errs, err)
		} else {
			errs = append(errs, into...)
		}
	}
	return errors.Join(errs...)
}

// listenConflicts returns an error for each of others that s would share a
// socket with, and one if s takes a port reserved by Caddy. A stream whose
// listen address or port is invalid is skipped: Stream.Validate reports it.
// With strict (a write, or the config), a port shared by server name may
// not have a stream that reads PROXY headers: stored streams are not held
// to that rule, which came after some were stored.
func (a *App) listenConflicts(s *spec.Stream, others []*spec.Stream, strict bool) []error {
	addr, ok := listenAddr(s)
	if !ok {
		return nil
	}
	var errs []error
	for _, o := range others {
		oaddr, ok := listenAddr(o)
		// The first port of s's range that o's range holds too.
		clash := max(s.ListenPort, o.ListenPort)
		if !ok || clash > min(s.LastPort(), o.LastPort()) || !addrsOverlap(addr, oaddr) {
			continue
		}
		var shared string
		switch tcp, udp := s.HasTCP() && o.HasTCP(), s.HasUDP() && o.HasUDP(); {
		case tcp && udp:
			shared = spec.ProtocolTCPUDP
		case tcp:
			shared = spec.ProtocolTCP
		case udp:
			shared = spec.ProtocolUDP
		default:
			continue
		}
		if sharesBySNI(s, o) {
			// One port, the streams told apart by server name.
			// The one of the two without sni that reads them, whichever
			// came first.
			reader, other := s, o
			if !readsProxyWithoutSNI(reader) {
				reader, other = o, s
			}
			if strict && readsProxyWithoutSNI(reader) {
				errs = append(errs, &spec.FieldError{ID: reader.ID, Name: reader.Name, Field: "accept_proxy_protocol", Value: reader.AcceptProxyProtocol,
					Reason: fmt.Sprintf("not on a port shared by server name with %s: the server name is read from the first bytes, where a front proxy's PROXY header would be; use off, or another port", spec.StreamLabel(other.ID, other.Name))})
			}
			if mine, theirs, clash := sniClash(s, o); clash {
				errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "sni", Value: mine,
					Reason: fmt.Sprintf("overlaps %q of %s on the same port; give each server name to one stream", theirs, spec.StreamLabel(o.ID, o.Name))})
			}
			continue
		}
		if s.ListenAddress != o.ListenAddress && addr == oaddr && sniPair(s, o) {
			// One address written two ways: the streams would share the
			// port by server name if they wrote it alike.
			errs = append(errs, &spec.FieldError{ID: s.ID, Name: s.Name, Field: "listen_address", Value: s.ListenAddress,
				Reason: fmt.Sprintf("is the address of %s (%q) written another way; to share port %d by server name, write it as %q",
					spec.StreamLabel(o.ID, o.Name), o.ListenAddress, s.ListenPort, o.ListenAddress)})
			continue
		}
		if !s.IsRange() && !o.IsRange() {
			errs = append(errs, &spec.FieldError{
				ID: s.ID, Name: s.Name, Field: "listen_port",
				Value:  fmt.Sprintf("%d/%s", s.ListenPort, shared),
				Reason: fmt.Sprintf("overlaps %s on %s; use another port or address, or disable one of them", spec.StreamLabel(o.ID, o.Name), o.ListenWhere()),
				Inline: true,
			})
			continue
		}
		errs = append(errs, &spec.FieldError{
			ID: s.ID, Name: s.Name, Field: "listen_port",
			Value: fmt.Sprintf("%s/%s", portsText(s), shared),
			Reason: fmt.Sprintf("overlaps %s on %s (%s), first at port %d; use other ports or another address, or disable one of them",
				spec.StreamLabel(o.ID, o.Name), o.ListenWhere(), portsText(o), clash),
			Inline: true,
		})
	}
	var first *reservedPort
	for i, r := range a.reserved {
		if r.Port >= s.ListenPort && r.Port <= s.LastPort() && (first == nil || r.Port < first.Port) {
			first = &a.reserved[i]
		}
	}
	if first != nil {
		fe := &spec.FieldError{ID: s.ID, Name: s.Name, Field: "listen_port", Value: s.ListenPort,
			Reason: fmt.Sprintf("port %d is %s; use another port", first.Port, first.Owner)}
		if s.IsRange() {
			fe.Value = portsText(s)
			fe.Inline = true
			fe.Reason = fmt.Sprintf("includes port %d, %s; use other ports", first.Port, first.Owner)
		}
		errs = append(errs, fe)
	}
	return errs
}

// readsProxyWithoutSNI reports whether s is a port's stream without sni
// that reads PROXY headers.
func readsProxyWithoutSNI(s *spec.Stream) bool { return len(s.SNI) == 0 && s.AcceptsProxy() }

// sharesBySNI reports whether s and o may share their listen address and
// port, told apart by server name: both TCP, one port each, the same
// address, and at least one gives sni (at most one may leave it empty).
func sharesBySNI(s, o *spec.Stream) bool {
	return s.ListenAddress == o.ListenAddress && sniPair(s, o)
}

// sniPair is sharesBySNI but for the address as written: both TCP, one
// and the same port, and at least one gives sni.
func sniPair(s, o *spec.Stream) bool {
	return s.EffectiveProtocol() == spec.ProtocolTCP && o.EffectiveProtocol() == spec.ProtocolTCP &&
		!s.IsRange() && !o.IsRange() && s.ListenPort == o.ListenPort && (len(s.SNI) > 0 || len(o.SNI) > 0)
}

// sniClash returns the first server names of s and o that one name could
// match both of.
func sniClash(s, o *spec.Stream) (mine, theirs string, clash bool) {
	for _, a := range s.SNI {
		for _, b := range o.SNI {
			if spec.SNIOverlap(a, b) {
				return a, b, true
			}
		}
	}
	return "", "", false
}

// portsText is the stream's port, or its range of ports: "5432",
// "30000-30099".
func portsText(s *spec.Stream) string {
	if !s.IsRange() {
		return strconv.Itoa(s.ListenPort)
	}
	return fmt.Sprintf("%d-%d", s.ListenPort, s.LastPort())
}

// listenAddr is the stream's listen address, unmapped; the zero Addr means
// every address. ok is false when the address or port is invalid.
func listenAddr(s *spec.Stream) (addr netip.Addr, ok bool) {
	if !spec.ValidPort(s.ListenPort) || spec.CheckListenAddress(s.ListenAddress) != "" {
		return netip.Addr{}, false
	}
	if s.ListenAddress == "" {
		return netip.Addr{}, true
	}
	ip := netip.MustParseAddr(s.ListenAddress).Unmap()
	if ip == netip.IPv6Unspecified() {
		return netip.Addr{}, true // "::" takes IPv4 as well (dual stack)
	}
	return ip, true
}

// addrsOverlap reports whether listeners on a and b (from listenAddr) on the
// same port would collide: the zero Addr (every address) overlaps all,
// 0.0.0.0 overlaps every IPv4 address, and otherwise only equal addresses do.
func addrsOverlap(a, b netip.Addr) bool {
	switch {
	case !a.IsValid() || !b.IsValid():
		return true
	case a == b:
		return true
	case a.Is4() && b.Is4():
		return a.IsUnspecified() || b.IsUnspecified()
	}
	return false
}

// Interface guard.
var _ caddy.Validator = (*App)(nil)
