package streamstate

import "sync"

// The defaults that keep one stream, or one source, from using up the
// process's file descriptors, derived from its open-file limit
// (RLIMIT_NOFILE, which the Go runtime raises to the hard limit at start).
const (
	// FDShare: one stream takes by default at most 1/FDShare of the
	// descriptors left after the reserve.
	FDShare = 2
	// SourceShare: one source holds by default at most 1/SourceShare of a
	// stream's NAT entries, or of its TLS handshakes in progress.
	SourceShare = 8
	// MaxNATCap bounds the NAT entries of one UDP stream address whatever
	// the limit and max_connections say.
	MaxNATCap = 100_000
	// minReserve and maxReserve bound the reserve: an eighth of the limit.
	minReserve = 128
	maxReserve = 4096
)

// FDBudget is how the open-file limit is shared out by default.
type FDBudget struct {
	// Limit is the open-file limit; 0: unknown (not a Unix system), and
	// the caps are MaxNATCap.
	Limit uint64
	// Reserve is what no stream may take by default: for the admin
	// endpoint, the HTTP sites, the database and the logs.
	Reserve int
	// PerStream is the most one stream takes by default.
	PerStream int
	// NATCap is the default cap of a UDP stream address's NAT entries
	// (one socket each) when max_connections is 0.
	NATCap int
	// ConnCap is the default cap of a stream's TCP connections (two
	// sockets each: the client's and the upstream's) when max_connections
	// is 0.
	ConnCap int
	// NATPerSource is how many NAT entries one source (IPv6: one /64) may
	// hold by default, when max_connections_per_ip is 0: a share of the
	// stream's cap.
	NATPerSource int
}

// BudgetFor shares out the open-file limit limit (0: unknown).
func BudgetFor(limit uint64) FDBudget {
	b := FDBudget{Limit: limit, NATCap: MaxNATCap, ConnCap: MaxNATCap}
	if limit > 0 {
		b.Reserve = int(min(max(limit/8, minReserve), maxReserve))
		left := max(int(min(limit, 1<<30))-b.Reserve, FDShare*2)
		b.PerStream = left / FDShare
		b.NATCap = min(b.PerStream, MaxNATCap)
		b.ConnCap = min(max(b.PerStream/2, 1), MaxNATCap)
	}
	b.NATPerSource = SourcePart(b.NATCap)
	return b
}

// SourcePart is one source's default share of n: n/SourceShare, at least 1.
func SourcePart(n int) int { return max(n/SourceShare, 1) }

// Budget is the process's FDBudget, from its open-file limit when first
// asked.
var Budget = sync.OnceValue(func() FDBudget { return BudgetFor(openFileLimit()) })
