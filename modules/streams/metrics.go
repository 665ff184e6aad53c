package streams

import (
	"net"
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// The streams' Prometheus metrics. The app registers one collector in the
// metrics registry of the context it is provisioned with: that is the
// config load's own registry, the one Caddy's admin endpoint serves at
// /metrics (and the `metrics` HTTP handler of the same config), next to
// Caddy's own metrics. A child context (caddy.NewContext) would have a
// registry of its own that nothing serves.
//
// The collector reads the streams of the app and their shared state when
// scraped, so the relay does no work for the metrics, streams created,
// changed or deleted through the API show up (or go) at once, and counters
// continue across reloads: they live in the stream's state, which a reload
// keeps. Labels are the stream's name, id and protocol setting, plus a
// reason, direction, outcome or transport from a fixed list; never a
// client's address. The series of a stream's upstreams (a stream with
// upstreams) add the upstream's host:port from the stream's settings.

// streamLabels name the stream of every series.
var streamLabels = []string{"stream", "id", "protocol"}

func newDesc(name, help string, extra ...string) *prometheus.Desc {
	labels := append(append([]string(nil), streamLabels...), extra...)
	return prometheus.NewDesc("aegis_stream_"+name, help, labels, nil)
}

var (
	descConnections = newDesc("connections_total",
		"Connections accepted: TCP connections, blocked ones included, and UDP NAT entries opened.")
	descBlocked = newDesc("connections_blocked_total",
		"Connections refused before they were relayed, by reason. On UDP each datagram of a client that is not let in counts.", "reason")
	descActive = newDesc("active_connections",
		"Connections open now: TCP connections and UDP NAT entries.")
	descBytes = newDesc("bytes_total",
		"Bytes relayed, by direction.", "direction")
	descDuration = newDesc("connection_duration_seconds",
		"How long connections lasted, by transport (udp: NAT entries).", "transport")
	descDialFailures = newDesc("dial_failures_total",
		"Connections whose dial to the upstream failed.")
	descUpstreamLoops = newDesc("upstream_loops_total",
		"Connections (UDP: new clients) refused because the upstream address is one of this process's own stream listeners.")
	descDialDuration = newDesc("dial_duration_seconds",
		"How long successful dials to the upstream took.")
	descHealthy = newDesc("healthy",
		"1 if the last health check reached the upstream, 0 if it did not. Absent while health checks are off or none has run yet.")
	descListening = newDesc("listening",
		"1 while every listener of the stream is up, else 0.")
	descNATEntries = newDesc("udp_nat_entries",
		"UDP NAT entries (clients) open now.")
	descDropped = newDesc("udp_datagrams_dropped_total",
		"UDP datagrams dropped, by reason.", "reason")
	descTLS = newDesc("tls_handshakes_total",
		"TLS handshakes, by outcome.", "outcome")
	descLogDropped = newDesc("log_entries_dropped_total",
		"Connection-log entries dropped because a queue was full.")

	descUpConnections = newDesc("upstream_connections_total",
		"Connections (UDP NAT entries) relayed to each upstream.", "upstream")
	descUpActive = newDesc("upstream_active_connections",
		"Connections (UDP NAT entries) open now to each upstream.", "upstream")
	descUpBytes = newDesc("upstream_bytes_total",
		"Bytes relayed through each upstream, by direction.", "upstream", "direction")
	descUpDialFailures = newDesc("upstream_dial_failures_total",
		"Failed dials to each upstream (UDP: ICMP refusals).", "upstream")
	descSNINoMatch = prometheus.NewDesc("aegis_sni_no_match_total",
		"Connections to a port shared by server name that no stream took (sni_no_match), by listen address.", []string{"listen"}, nil)
	descUpUp = newDesc("upstream_up",
		"1 while new connections may go to the upstream, 0 while they skip it (a failed dial within fail_timeout_seconds, or a failed health check).", "upstream")

	allDescs = []*prometheus.Desc{
		descConnections, descBlocked, descActive, descBytes, descDuration,
		descDialFailures, descDialDuration, descHealthy, descListening,
		descNATEntries, descDropped, descTLS, descLogDropped, descUpstreamLoops,
		descUpConnections, descUpActive, descUpBytes, descUpDialFailures, descUpUp,
		descSNINoMatch,
	}
)

// Label values of the bytes and TLS metrics.
const (
	directionUp   = "client_to_upstream"
	directionDown = "upstream_to_client"

	outcomeOK            = "ok"
	outcomeFailed        = "failed"
	outcomeTimeout       = "timeout"
	outcomeMaxHandshakes = "max_handshakes"
	// Closed before a handshake: max_handshakes_per_ip from the source.
	outcomeMaxHandshakesPerIP = "max_handshakes_per_ip"
)

// collector is the app's prometheus.Collector.
type collector struct{ app *App }

// registerMetrics registers the app's collector in the registry of its
// context.
func (a *App) registerMetrics() error {
	reg := a.ctx.GetMetricsRegistry()
	if reg == nil {
		return nil // a context made without caddy.NewContext: nothing serves metrics
	}
	return reg.Register(&collector{app: a})
}

// Describe implements prometheus.Collector.
func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range allDescs {
		ch <- d
	}
}

// streamSample is what a scrape reads of one stream: its settings, and its
// shared state, which holds everything it counts (its TLS handshakes and
// UDP relays included).
type streamSample struct {
	cfg   *spec.Stream
	state *streamstate.State
	sni   *sniPort // its shared port, if any
}

// samples returns the app's streams. An app that was cleaned up returns
// the running app's instead: when a new config fails to load, Caddy's
// admin endpoint goes on serving the registry of that failed config,
// while the previous config (and its streams app) keeps running.
func (a *App) samples(fallback bool) []streamSample {
	a.mu.Lock()
	if a.cleanedUp {
		a.mu.Unlock()
		if run := Running(); fallback && run != nil && run != a {
			return run.samples(false)
		}
		return nil
	}
	defer a.mu.Unlock()
	out := make([]streamSample, 0, len(a.streams))
	for _, inst := range a.streams {
		out = append(out, streamSample{cfg: inst.cfg, state: inst.state, sni: inst.sni})
	}
	return out
}

// Collect implements prometheus.Collector.
func (c *collector) Collect(ch chan<- prometheus.Metric) {
	seen := map[*sniPort]bool{}
	for _, s := range c.app.samples(true) {
		collectStream(ch, s)
		if s.sni != nil && !seen[s.sni] {
			seen[s.sni] = true
			ch <- prometheus.MustNewConstMetric(descSNINoMatch, prometheus.CounterValue, float64(s.sni.noMatch.Load()), s.sni.key)
		}
	}
}

func collectStream(ch chan<- prometheus.Metric, s streamSample) {
	cfg, st := s.cfg, s.state
	// A label must be UTF-8 or the metric panics at scrape: names from the
	// config are, but a database edited by hand may hold any bytes.
	lv := []string{strings.ToValidUTF8(cfg.DisplayName(), "\uFFFD"), strconv.FormatInt(cfg.ID, 10), cfg.EffectiveProtocol()}
	// with returns the stream's labels and one more, in a slice of its own.
	with := func(v string) []string { return append(lv[:len(lv):len(lv)], v) }
	counter := func(d *prometheus.Desc, v uint64, labels []string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels []string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	histogram := func(d *prometheus.Desc, h prometheus.Metric, labels []string) {
		m, err := constHistogram(d, h, labels)
		if err != nil {
			m = prometheus.NewInvalidMetric(d, err)
		}
		ch <- m
	}

	status := StatusOf(cfg, st)
	totals := st.Cumulative()
	counter(descConnections, totals.Connections, lv)
	counter(descBlocked, st.BlockedBy(streamstate.BlockACL), with(streamstate.BlockACL.String()))
	for _, r := range []streamstate.BlockReason{streamstate.BlockMaxConnections, streamstate.BlockMaxPerIP, streamstate.BlockRateLimited, streamstate.BlockSourcesFull} {
		counter(descBlocked, st.BlockedBy(r), with(r.String()))
	}
	if cfg.HasUDP() || cfg.SSLEnabled {
		counter(descBlocked, st.BlockedBy(streamstate.BlockSourceShare), with(streamstate.BlockSourceShare.String()))
	}
	gauge(descActive, float64(status.ActiveConnections), lv)
	counter(descBytes, totals.BytesSent, with(directionUp))
	counter(descBytes, totals.BytesReceived, with(directionDown))
	gauge(descListening, boolGauge(status.Listening), lv)
	if status.Healthy != nil {
		gauge(descHealthy, boolGauge(*status.Healthy), lv)
	}
	counter(descLogDropped, st.LogDropped.Load(), lv)
	counter(descUpstreamLoops, st.UpstreamLoops.Load(), lv)
	for _, u := range status.Upstreams {
		ul := with(strings.ToValidUTF8(net.JoinHostPort(u.Host, strconv.Itoa(u.Port)), "\uFFFD"))
		counter(descUpConnections, u.TotalConnections, ul)
		gauge(descUpActive, float64(u.ActiveConnections), ul)
		counter(descUpBytes, u.BytesSent, append(ul[:len(ul):len(ul)], directionUp))
		counter(descUpBytes, u.BytesReceived, append(ul[:len(ul):len(ul)], directionDown))
		counter(descUpDialFailures, u.DialFailures, ul)
		gauge(descUpUp, boolGauge(u.Healthy), ul)
	}

	if cfg.HasTCP() {
		histogram(descDuration, st.ConnectionDurations(streamstate.TCP), with(spec.ProtocolTCP))
		counter(descBlocked, st.BlockedBy(streamstate.BlockConnectionCap), with(streamstate.BlockConnectionCap.String()))
		counter(descDialFailures, st.DialFailures.Load(), lv)
		histogram(descDialDuration, st.DialDurations(), lv)
		if hs := st.Handshakes(); cfg.SSLEnabled && hs.Attached() {
			counter(descTLS, hs.Succeeded.Load(), with(outcomeOK))
			counter(descTLS, hs.Failed.Load(), with(outcomeFailed))
			counter(descTLS, hs.TimedOut.Load(), with(outcomeTimeout))
			perIP := hs.RejectedPerIP.Load()
			counter(descTLS, hs.Rejected.Load()-perIP, with(outcomeMaxHandshakes))
			counter(descTLS, perIP, with(outcomeMaxHandshakesPerIP))
		}
	}
	if cfg.HasUDP() {
		histogram(descDuration, st.ConnectionDurations(streamstate.UDP), with(spec.ProtocolUDP))
		counter(descBlocked, st.BlockedBy(streamstate.BlockNATTableFull), with(streamstate.BlockNATTableFull.String()))
		gauge(descNATEntries, float64(st.UDPEntries()), lv)
		for _, r := range streamstate.DropReasons() {
			counter(descDropped, st.DroppedBy(r), with(r.String()))
		}
	}
}

// constHistogram reads histogram h and returns its counts under desc with
// the given labels.
func constHistogram(desc *prometheus.Desc, h prometheus.Metric, labels []string) (prometheus.Metric, error) {
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		return nil, err
	}
	hist := m.GetHistogram()
	buckets := make(map[float64]uint64, len(hist.GetBucket()))
	for _, b := range hist.GetBucket() {
		buckets[b.GetUpperBound()] = b.GetCumulativeCount()
	}
	return prometheus.NewConstHistogram(desc, hist.GetSampleCount(), hist.GetSampleSum(), buckets, labels...)
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// Interface guards
var _ prometheus.Collector = (*collector)(nil)
