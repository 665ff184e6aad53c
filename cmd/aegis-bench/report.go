package main

import (
	"fmt"
	"strings"
)

// metric is one row of the table.
type metric struct {
	key, label, format string
}

func metricList(workers, idle int) []metric {
	return []metric{
		{"up1", "upload, 1 conn, MB/s", "%.0f"},
		{"up8", "upload, 8 conns, MB/s", "%.0f"},
		{"down1", "download, 1 conn, MB/s", "%.0f"},
		{"down8", "download, 8 conns, MB/s", "%.0f"},
		{"cps", "short conns/s, " + plural(workers, "worker"), "%.0f"},
		{"p50", "latency p50, us, " + plural(workers, "conn") + " (lower is better)", "%.1f"},
		{"p99", "latency p99, us, " + plural(workers, "conn") + " (lower is better)", "%.1f"},
		{"mem", "KB per idle conn, " + plural(idle, "conn") + " (lower is better)", "%.1f"},
	}
}

// plural is "1 conn" or "n conns".
func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// result is what one proxy measured.
type result struct {
	name    string
	skipped string             // why it did not run, or ""
	values  map[string]float64 // by metric key; missing means not measured
	notes   []string
}

// table renders one row per metric and one column per proxy that ran. Each
// cell is the value and, in parentheses, its ratio to direct and to haproxy.
func table(results []result, metrics []metric) string {
	var ran []result
	ref := map[string]result{}
	for _, r := range results {
		if r.skipped == "" {
			ran = append(ran, r)
			ref[r.name] = r
		}
	}
	rows := [][]string{{""}}
	for _, r := range ran {
		rows[0] = append(rows[0], r.name)
	}
	for _, m := range metrics {
		row := []string{m.label}
		for _, r := range ran {
			row = append(row, cell(m, r, ref["direct"], ref["haproxy"]))
		}
		rows = append(rows, row)
	}

	widths := make([]int, len(rows[0]))
	for _, row := range rows {
		for i, s := range row {
			widths[i] = max(widths[i], len(s))
		}
	}
	var b strings.Builder
	for _, row := range rows {
		for i, s := range row {
			if i == 0 {
				fmt.Fprintf(&b, "%-*s", widths[i], s)
			} else {
				fmt.Fprintf(&b, "  %*s", widths[i], s)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func cell(m metric, r, direct, haproxy result) string {
	v, ok := r.values[m.key]
	if !ok {
		return "-"
	}
	s := fmt.Sprintf(m.format, v)
	d, h := ratio(v, direct.values, m.key), ratio(v, haproxy.values, m.key)
	if d == "-" && h == "-" {
		return s
	}
	return fmt.Sprintf("%s (%s, %s)", s, d, h)
}

// ratio is v divided by the reference's value for key, or "-".
func ratio(v float64, ref map[string]float64, key string) string {
	r, ok := ref[key]
	if !ok || r <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", v/r)
}
