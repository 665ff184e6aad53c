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
