package streams

import (
	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
)

// Status is a stream's runtime status, as the API shows it.
type Status struct {
	ID       int64  `json:"id"`
	Name     string `json:"name"`
	Protocol string `json:"protocol"`
	// Listening is true while the stream's listeners serve it: for tcp+udp
	// only when both are up.
	Listening bool `json:"listening"`
	// Healthy is the last health check's outcome; null when health checks
	// are off or none has run yet.
	Healthy *bool `json:"healthy"`
	// HealthStatus is "healthy", "unhealthy", "pending" (checks on, none
	// done yet) or "not_checked" (checks off, or a UDP-only stream, which a
	// TCP dial cannot check).
	HealthStatus    string         `json:"health_status"`
	LastHealthError string         `json:"last_health_error"`
	LastHealthCheck *jsontime.Time `json:"last_health_check"`
	// ActiveConnections are open now.
	ActiveConnections int64 `json:"active_connections"`
	// TotalConnections were accepted since the last reload, blocked ones
	// included.
	TotalConnections uint64 `json:"total_connections"`
	// BlockedConnections were refused by the ACL or max_connections since
	// the last reload.
	BlockedConnections uint64 `json:"blocked_connections"`
	// BytesSent went client → upstream since the last reload.
	BytesSent uint64 `json:"bytes_sent"`
	// BytesReceived went upstream → client since the last reload.
	BytesReceived uint64 `json:"bytes_received"`
	// LogEntriesDropped were not logged, or not stored: a log queue was
	// full, or storage failed to write them.
	LogEntriesDropped uint64 `json:"log_entries_dropped"`
	// DatagramsDropped are UDP datagrams of open NAT entries dropped since
	// the last reload: over a rate limit, or a socket buffer was full.
	DatagramsDropped uint64 `json:"datagrams_dropped"`
}

// StatusOf reads a stream's status from its shared state.
func StatusOf(s *Stream, st *streamstate.Stream) Status {
	tot := st.SinceReload()
	out := Status{
		ID:                 s.ID,
		Name:               s.DisplayName(),
		Protocol:           s.EffectiveProtocol(),
		Listening:          listening(s, st),
		HealthStatus:       "not_checked",
		ActiveConnections:  st.Active.Load(),
		TotalConnections:   tot.Connections,
		BlockedConnections: st.Blocked.Load(),
		BytesSent:          tot.BytesSent,
		BytesReceived:      tot.BytesReceived,
		LogEntriesDropped:  st.LogDropped.Load(),
		DatagramsDropped:   st.DatagramsDropped.Load(),
	}
	// Health checks are TCP dials: they say nothing about a UDP-only
	// upstream, so such a stream is never shown healthy.
	if s.HealthCheckEnabled && s.Enabled && s.HasTCP() {
		out.HealthStatus = "pending"
		if h := st.Health(); h != nil {
			healthy := h.Healthy
			out.Healthy = &healthy
			out.LastHealthError = h.LastError
			out.LastHealthCheck = jsontime.Ptr(h.LastCheck)
			out.HealthStatus = "unhealthy"
			if healthy {
				out.HealthStatus = "healthy"
			}
		}
	}
	return out
}

// listening is true when every listener the stream needs is up.
func listening(s *Stream, st *streamstate.Stream) bool {
	if !s.HasTCP() && !s.HasUDP() {
		return false
	}
	return (!s.HasTCP() || st.Listening(streamstate.TCP)) && (!s.HasUDP() || st.Listening(streamstate.UDP))
}
