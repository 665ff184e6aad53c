package streamstate

import (
	"encoding/binary"
	"net/netip"
	"slices"
)

// ipSet is a set of IP addresses made of prefixes, kept as sorted,
// disjoint, non-adjacent ranges per family. Contains is a binary search:
// a few dozen comparisons even for 100,000 entries (2^17), without a
// lock or an allocation, where a scan of the prefixes cost one
// comparison per entry per connection. Immutable once built.
type ipSet struct {
	v4 []range4
	v6 []range6
}

type range4 struct{ lo, hi uint32 }

// u128 is an IPv6 address as a number.
type u128 struct{ hi, lo uint64 }

func (a u128) less(b u128) bool { return a.hi < b.hi || a.hi == b.hi && a.lo < b.lo }

// next is a+1, and false if a is the largest address.
func (a u128) next() (u128, bool) {
	if a.lo != ^uint64(0) {
		return u128{a.hi, a.lo + 1}, true
	}
	if a.hi != ^uint64(0) {
		return u128{a.hi + 1, 0}, true
	}
	return a, false
}

type range6 struct{ lo, hi u128 }

func u128Of(a netip.Addr) u128 {
	b := a.As16()
	return u128{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

// newIPSet builds the set of the given prefixes, which must be valid. An
// IPv4 prefix holds IPv4 addresses only and an IPv6 prefix IPv6 ones (as
// netip.Prefix.Contains has it): IPv4-mapped addresses are unmapped by
// the caller.
func newIPSet(prefixes []netip.Prefix) ipSet {
	var s ipSet
	for _, p := range prefixes {
		p = p.Masked()
		a := p.Addr()
		if a.Is4() {
			lo := binary.BigEndian.Uint32(a.AsSlice())
			host := uint32(0)
			if p.Bits() < 32 {
				host = ^uint32(0) >> p.Bits()
			}
			s.v4 = append(s.v4, range4{lo, lo | host})
			continue
		}
		lo := u128Of(a)
		hi := lo
		switch bits := p.Bits(); {
		case bits == 0:
			hi = u128{^uint64(0), ^uint64(0)}
		case bits < 64:
			hi = u128{lo.hi | ^uint64(0)>>bits, ^uint64(0)}
		case bits < 128:
			hi = u128{lo.hi, lo.lo | ^uint64(0)>>(bits-64)}
		}
		s.v6 = append(s.v6, range6{lo, hi})
	}
	slices.SortFunc(s.v4, func(a, b range4) int {
		switch {
		case a.lo < b.lo:
			return -1
		case a.lo > b.lo:
			return 1
		}
		return 0
	})
	merged4 := s.v4[:0]
	for _, r := range s.v4 {
		if n := len(merged4); n > 0 && (merged4[n-1].hi == ^uint32(0) || r.lo <= merged4[n-1].hi+1) {
			merged4[n-1].hi = max(merged4[n-1].hi, r.hi)
			continue
		}
		merged4 = append(merged4, r)
	}
	s.v4 = slices.Clip(merged4)
	slices.SortFunc(s.v6, func(a, b range6) int {
		switch {
		case a.lo.less(b.lo):
			return -1
		case b.lo.less(a.lo):
			return 1
		}
		return 0
	})
	merged6 := s.v6[:0]
	for _, r := range s.v6 {
		if n := len(merged6); n > 0 {
			last := &merged6[n-1]
			after, ok := last.hi.next()
			if !ok || !after.less(r.lo) { // overlapping or adjacent
				if last.hi.less(r.hi) {
					last.hi = r.hi
				}
				continue
			}
		}
		merged6 = append(merged6, r)
	}
	s.v6 = slices.Clip(merged6)
	return s
}

// empty reports whether the set holds no address.
func (s *ipSet) empty() bool { return len(s.v4) == 0 && len(s.v6) == 0 }

// contains reports whether ip is in the set; a zone is ignored, and an
// IPv4-mapped IPv6 address is IPv6 (the caller unmaps).
func (s *ipSet) contains(ip netip.Addr) bool {
	switch {
	case ip.Is4():
		b := ip.As4()
		x := binary.BigEndian.Uint32(b[:])
		// The last range with lo <= x.
		i, j := 0, len(s.v4)
		for i < j {
			h := int(uint(i+j) >> 1)
			if s.v4[h].lo <= x {
				i = h + 1
			} else {
				j = h
			}
		}
		return i > 0 && x <= s.v4[i-1].hi
	case ip.Is6():
		x := u128Of(ip)
		i, j := 0, len(s.v6)
		for i < j {
			h := int(uint(i+j) >> 1)
			if !x.less(s.v6[h].lo) {
				i = h + 1
			} else {
				j = h
			}
		}
		return i > 0 && !s.v6[i-1].hi.less(x)
	}
	return false
}
