package main

import (
	"fmt"
	"strings"
)

// metric is one row of the table.
type metric struct {
	key, label, format string
	noRatio            bool // the cell shows the value alone
}

func metricList(workers, idle int) []metric {
	return []metric{
		{key: "up1", label: "upload, 1 conn, MB/s", format: "%.0f"},
		{key: "up8", label: "upload, 8 conns, MB/s", format: "%.0f"},
		{key: "down1", label: "download, 1 conn, MB/s", format: "%.0f"},
		{key: "down8", label: "download, 8 conns, MB/s", format: "%.0f"},
		{key: "cps", label: "short conns/s, " + plural(workers, "worker"), format: "%.0f"},
		{key: "p50", label: "latency p50, us, " + plural(workers, "conn") + " (lower is better)", format: "%.1f"},
		{key: "p99", label: "latency p99, us, " + plural(workers, "conn") + " (lower is better)", format: "%.1f"},
		{key: "mem", label: "KB per idle conn, " + plural(idle, "conn") + " (lower is better)", format: "%.1f"},
	}
}

// plural is "1 conn" or "n conns".
func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// udpMetrics are the rows of the UDP table. stepDown adds the row of the
// best rate under the loss target, for when some proxy lost more at full
// load.
func udpMetrics(sockets, win, entries int, stepDown bool) []metric {
	ms := []metric{
		{key: "dps", label: fmt.Sprintf("datagrams/s, %s x %d in flight", plural(sockets, "socket"), win), format: "%.0f"},
		{key: "loss", label: "loss % at that rate (lower is better)", format: "%.3f", noRatio: true},
	}
	if stepDown {
		ms = append(ms, metric{key: "dpsok", label: fmt.Sprintf("best datagrams/s with loss < %g%%", udpLossTarget), format: "%.0f"})
	}
	return append(ms,
		metric{key: "cpubench", label: "bench CPU % (generator + echo)", format: "%.0f", noRatio: true},
		metric{key: "cpuproxy", label: "proxy CPU %", format: "%.0f", noRatio: true},
		metric{key: "cpudgram", label: "proxy CPU us per datagram (lower is better)", format: "%.2f"},
		metric{key: "flows1", label: "UDP new flows/s, 1 client (query, answer, close; a new socket each)", format: "%.0f"},
		metric{key: "flows8", label: "UDP new flows/s, 8 clients", format: "%.0f"},
		metric{key: "flows1kept", label: "UDP new flows/s, 1 client, no udp_responses (each entry lives out a 1 s idle timeout)", format: "%.0f"},
		metric{key: "flows8kept", label: fmt.Sprintf("UDP new flows/s, 8 clients, no udp_responses (each round stops at %d entries held, before the first expires)", flowCap(entries)), format: "%.0f"},
		metric{key: "nat", label: "NAT entries held", format: "%.0f", noRatio: true},
		metric{key: "natfds", label: "proxy fds opened for them", format: "%.0f", noRatio: true},
		metric{key: "natmem", label: fmt.Sprintf("KB per NAT entry, %d entries (lower is better)", entries), format: "%.2f"},
	)
}

// result is what one proxy measured.
type result struct {
	name    string
	skipped string             // why it did not run, or ""
	na      string             // why the test does not apply to it, or ""; its cells show n/a
	values  map[string]float64 // by metric key; missing means not measured
	notes   []string
}

// table renders one row per metric and one column per proxy that ran. Each
// cell is the value and, in parentheses, its ratio to direct and to the
// proxy named second (haproxy for TCP, nginx for UDP).
func table(results []result, metrics []metric, second string) string {
	return tableRefs(results, metrics, "direct", second)
}

// tableRefs is table with the ratios to the proxies named refs, in order.
func tableRefs(results []result, metrics []metric, refs ...string) string {
	var ran []result
	byName := map[string]result{}
	for _, r := range results {
		if r.skipped == "" {
			ran = append(ran, r)
			if r.na == "" {
				byName[r.name] = r
			}
		}
	}
	refResults := make([]result, len(refs))
	for i, name := range refs {
		refResults[i] = byName[name]
	}
	rows := [][]string{{""}}
	for _, r := range ran {
		rows[0] = append(rows[0], r.name)
	}
	for _, m := range metrics {
		row := []string{m.label}
		for _, r := range ran {
			if r.na != "" {
				row = append(row, "n/a")
			} else {
				row = append(row, cell(m, r, refResults))
			}
		}
		rows = append(rows, row)
	}

	return grid(rows)
}

// cell is r's value for m and, unless no reference has one, its ratios to
// the references.
func cell(m metric, r result, refs []result) string {
	v, ok := r.values[m.key]
	if !ok {
		return "-"
	}
	s := fmt.Sprintf(m.format, v)
	ratios := make([]string, len(refs))
	some := false
	for i, ref := range refs {
		ratios[i] = ratio(v, ref.values, m.key)
		some = some || ratios[i] != "-"
	}
	if m.noRatio || !some {
		return s
	}
	return fmt.Sprintf("%s (%s)", s, strings.Join(ratios, ", "))
}

// ratio is v divided by the reference's value for key, or "-".
func ratio(v float64, ref map[string]float64, key string) string {
	r, ok := ref[key]
	if !ok || r <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", v/r)
}
