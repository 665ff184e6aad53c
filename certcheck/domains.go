package certcheck

import (
	"fmt"
	"net/netip"
	"strings"
)

// MaxDomains is the most names one managed certificate may have; ACME
// certificate authorities such as Let's Encrypt allow 100.
const MaxDomains = 100

// ValidateDomains checks the names of a managed certificate; see
// NormalizeDomains. Store what NormalizeDomains returns: ValidateDomains
// accepts upper case.
func ValidateDomains(domains []string) error {
	_, err := NormalizeDomains(domains)
	return err
}

// NormalizeDomains checks the names of a managed certificate and returns
// them lowercased, IP addresses in their canonical form, in the order given.
// Errors are *FieldError with Field "domains".
//
// There must be 1 to MaxDomains names, each a DNS name or an IP address,
// and no two the same once lowercased. A DNS name is ASCII (an
// internationalized name in its xn-- form), at most 253 characters, with
// labels of 1 to 63 letters, digits and hyphens that neither begin nor end
// with a hyphen; a single label (such as "localhost") is allowed. A
// wildcard "*" may only be the whole leftmost label, followed by at least
// one label ("*.example.com"). A trailing dot, a port, a scheme or a path is
// an error, as is an IPv6 zone.
func NormalizeDomains(domains []string) ([]string, error) {
	if len(domains) == 0 {
		return nil, fieldErr(FieldDomains, "at least one domain name is required")
	}
	if len(domains) > MaxDomains {
		return nil, fieldErr(FieldDomains, "%d names: at most %d are allowed", len(domains), MaxDomains)
	}
	out := make([]string, len(domains))
	seen := make(map[string]int, len(domains))
	for i, d := range domains {
		n, err := normalizeName(d)
		if err != nil {
			return nil, fieldErr(FieldDomains, "%s: %s", quoteSafe(d), err)
		}
		if j, dup := seen[n]; dup {
			return nil, fieldErr(FieldDomains, "%s is given twice (entries %d and %d)", quoteSafe(n), j+1, i+1)
		}
		seen[n] = i
		out[i] = n
	}
	return out, nil
}

// normalizeName checks one name and returns its normal form.
func normalizeName(d string) (string, error) {
	if d == "" {
		return "", fmt.Errorf("empty name")
	}
	if strings.TrimSpace(d) != d {
		return "", fmt.Errorf("has leading or trailing white space")
	}
	if ip, err := netip.ParseAddr(d); err == nil {
		if ip.Zone() != "" {
			return "", fmt.Errorf("an IPv6 zone is not allowed")
		}
		return ip.String(), nil
	}
	n := strings.ToLower(d)
	return n, checkName(n)
}

// checkName checks a lowercase DNS name, possibly a wildcard, or an IP
// address.
func checkName(n string) error {
	if _, err := netip.ParseAddr(n); err == nil {
		if strings.Contains(n, "%") {
			return fmt.Errorf("an IPv6 zone is not allowed")
		}
		return nil
	}
	switch {
	case strings.Contains(n, "://") || strings.ContainsAny(n, "/?#@"):
		return fmt.Errorf("not a domain name: give the name alone, without scheme, path or user")
	case strings.HasPrefix(n, "[") || strings.Count(n, ":") == 1:
		return fmt.Errorf("not a domain name: give the name without a port")
	case strings.HasSuffix(n, "."):
		return fmt.Errorf("remove the trailing dot")
	case len(n) > 253:
		return fmt.Errorf("%d characters: a domain name has at most 253", len(n))
	}
	labels := strings.Split(n, ".")
	for i, l := range labels {
		if l == "*" {
			if i != 0 {
				return fmt.Errorf("a wildcard may only be the leftmost label")
			}
			if len(labels) == 1 {
				return fmt.Errorf("a wildcard needs a domain after it, as in *.example.com")
			}
			continue
		}
		if err := checkLabel(l); err != nil {
			return err
		}
	}
	if strings.Trim(labels[len(labels)-1], "0123456789") == "" {
		return fmt.Errorf("not a valid IP address, and a domain name cannot end in a numeric label")
	}
	return nil
}

func checkLabel(l string) error {
	switch {
	case l == "":
		return fmt.Errorf("empty label (two dots in a row, or a leading dot)")
	case len(l) > 63:
		return fmt.Errorf("label of %d characters: at most 63 are allowed", len(l))
	case l[0] == '-' || l[len(l)-1] == '-':
		return fmt.Errorf("label %q begins or ends with a hyphen", l)
	}
	for _, r := range l {
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-':
		case r == '*':
			return fmt.Errorf("a wildcard must be a whole label, as in *.example.com")
		case r >= 'A' && r <= 'Z':
			return fmt.Errorf("upper case in label %q", l)
		case r > 127:
			return fmt.Errorf("non-ASCII characters: give an internationalized name in its xn-- (punycode) form")
		default:
			return fmt.Errorf("character %q is not allowed in a domain name", r)
		}
	}
	return nil
}
