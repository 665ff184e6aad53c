package streamstate

import (
	"fmt"
	"net/netip"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// ParseCIDR parses one whitelist/blacklist entry; see spec.ParseCIDR,
// which owns what an entry may be.
func ParseCIDR(s string) (netip.Prefix, error) { return spec.ParseCIDR(s) }

// ACL is a stream's whitelist and blacklist, parsed.
type ACL struct{ allow, deny []netip.Prefix }

// NewACL parses the whitelist and blacklist. An error names the field and
// the entry.
func NewACL(whitelist, blacklist []string) (ACL, error) {
	var a ACL
	var err error
	if a.allow, err = parseList("whitelist_cidrs", whitelist); err != nil {
		return ACL{}, err
	}
	if a.deny, err = parseList("blacklist_cidrs", blacklist); err != nil {
		return ACL{}, err
	}
	return a, nil
}

func parseList(field string, list []string) ([]netip.Prefix, error) {
	if len(list) == 0 {
		return nil, nil
	}
	out := make([]netip.Prefix, 0, len(list))
	for _, s := range list {
		p, err := ParseCIDR(s)
		if err != nil {
			return nil, fmt.Errorf("%s %q: %v", field, s, err)
		}
		out = append(out, p)
	}
	return out, nil
}

// Allowed applies the lists to ip: a non-empty whitelist allows only its
// matches, then a blacklist match rejects. IPv4-mapped IPv6 addresses are
// checked as IPv4.
func (a ACL) Allowed(ip netip.Addr) bool {
	ip = ip.Unmap()
	if len(a.allow) > 0 && !contains(a.allow, ip) {
		return false
	}
	return !contains(a.deny, ip)
}

func contains(list []netip.Prefix, ip netip.Addr) bool {
	for _, p := range list {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}
