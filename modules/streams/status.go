package streams

import (
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// StatusOf reads a stream's status from its shared state.
func StatusOf(s *spec.Stream, st *streamstate.State) spec.Status {
	tot := st.SinceReload()
	out := spec.Status{
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
	if len(s.Upstreams) > 0 {
		out.Upstreams = upstreamStatus(s, st)
	}
	return out
}

// upstreamStatus reads the status of each of the stream's upstreams.
func upstreamStatus(s *spec.Stream, st *streamstate.State) []spec.UpstreamStatus {
	now := time.Now().UnixNano()
	out := make([]spec.UpstreamStatus, 0, len(s.Upstreams))
	for _, u := range s.Upstreams {
		us := spec.UpstreamStatus{Host: u.Host, Port: u.Port, Backup: u.Backup, Healthy: true}
		if r := st.FindUpstream(u.HostPort()); r != nil {
			us.Healthy = r.Up(now)
			us.LastError = r.LastError()
			us.ActiveConnections = r.Active.Load()
			us.TotalConnections = r.Total.Load()
			us.DialFailures = r.DialFailures.Load()
			us.BytesSent, us.BytesReceived = r.Bytes(st)
		}
		out = append(out, us)
	}
	return out
}

// listening is true when every listener the stream needs is up.
func listening(s *spec.Stream, st *streamstate.State) bool {
	if !s.HasTCP() && !s.HasUDP() {
		return false
	}
	return (!s.HasTCP() || st.Listening(streamstate.TCP)) && (!s.HasUDP() || st.Listening(streamstate.UDP))
}
