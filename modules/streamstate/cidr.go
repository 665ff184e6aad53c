package streamstate

import (
	"fmt"
	"net/netip"
	"strings"
)

// ParseCIDR parses one whitelist/blacklist entry: a CIDR, or a bare IP that
// means a single address (/32 for IPv4, /128 for IPv6). IPv4-mapped IPv6
// addresses are folded to IPv4 so that both spellings match the same clients.
func ParseCIDR(s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return netip.Prefix{}, fmt.Errorf("empty entry")
	}
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("not a CIDR (want e.g. 10.0.0.0/8 or 2001:db8::/32)")
		}
		if p.Addr().Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("not an IP address or CIDR (want e.g. 192.0.2.7 or 10.0.0.0/8)")
	}
	if a.Zone() != "" {
		return netip.Prefix{}, fmt.Errorf("an IP zone is not allowed here")
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

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
