package streams

import (
	"errors"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// ValidatePort checks a listen address and port as creating or updating a
// stream would: the values, Caddy's own ports, the other streams, and
// whether the address can be bound now (a port another program holds is
// an error that says so). Well-known and privileged ports give warnings.
func (a *App) ValidatePort(pc spec.PortCheck) spec.PortCheckResult {
	a.mu.Lock()
	defer a.mu.Unlock()
	id := pc.ID
	if id <= 0 {
		id = a.nextID()
	}
	s := &spec.Stream{ID: id, Protocol: pc.Protocol, ListenAddress: pc.ListenAddress, ListenPort: pc.ListenPort,
		ListenPortEnd: pc.ListenPortEnd, SNI: pc.SNI, UpstreamHost: "127.0.0.1", UpstreamPort: 1, Enabled: true}
	if inst := a.find(pc.ID); inst != nil {
		s.Name = inst.cfg.Name
	}
	res := spec.PortCheckResult{Warnings: s.Warnings()}
	if res.Warnings == nil {
		res.Warnings = []string{}
	}
	collect := func(err error) {
		for _, e := range flattenErrors(err) {
			var fe *spec.FieldError
			if errors.As(e, &fe) && (fe.Field == "protocol" || fe.Field == "listen_address" || fe.Field == "listen_port" || fe.Field == "listen_port_end" || fe.Field == "sni") {
				res.Errors = append(res.Errors, fe)
			}
		}
	}
	collect(s.Validate())
	if len(res.Errors) == 0 {
		collect(a.validateListen(s))
	}
	if len(res.Errors) == 0 {
		collect(checkOpenFiles(s))
	}
	if len(res.Errors) == 0 {
		collect(a.probe(s))
	}
	if pc.ID <= 0 {
		for _, fe := range res.Errors {
			fe.New = true
		}
	}
	res.Valid = len(res.Errors) == 0
	return res
}

// probe checks that s's addresses, on every port of its range, can be
// bound now, unless a stream of this process holds them (validateListen
// has judged those). For a range it stops at the first port that cannot.
func (a *App) probe(s *spec.Stream) error {
	var errs []error
	for p := s.ListenPort; p <= s.LastPort() && len(errs) == 0; p++ {
		ps := portStream(s, p)
		for _, network := range []string{"tcp", "udp"} {
			if network == "tcp" && !s.HasTCP() || network == "udp" && !s.HasUDP() {
				continue
			}
			if err := probeBind(ps, network); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// flattenErrors unpacks errors.Join trees.
func flattenErrors(err error) []error {
	if err == nil {
		return nil
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		var out []error
		for _, e := range j.Unwrap() {
			out = append(out, flattenErrors(e)...)
		}
		return out
	}
	return []error{err}
}
