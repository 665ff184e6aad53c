//go:build unix

package storage

import (
	"context"
	"syscall"
	"testing"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/jsontime"
	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// cpuTime is the CPU time this process has used, user and system.
func cpuTime(b *testing.B) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// udpFlowLogs is a batch of n entries as a DNS-shaped UDP flow makes them.
func udpFlowLogs(n int) []ConnLog {
	batch := make([]ConnLog, n)
	start := time.Now()
	for i := range batch {
		sent, received := int64(1), int64(1)
		batch[i] = ConnLog{StreamID: 1, SourceIP: "192.0.2.1", SourcePort: 40000 + i, BytesSent: 40, BytesReceived: 120,
			DurationMS: 1, Action: ActionAllowed, DisconnectReason: "responses_done",
			StartedAt: jsontime.Of(start), EndedAt: jsontime.Of(start.Add(time.Millisecond)),
			Protocol: ConnUDP, DatagramsSent: &sent, DatagramsReceived: &received}
	}
	return batch
}

// BenchmarkConnLogSteady is the connection log of a stream at a steady
// rate of new flows: batches of DefaultLogBatchSize entries (a writer
// that is behind), and the stream pruned to DefaultLogRetention after
// every DefaultLogRetention entries, as the LogWriter of a busy stream
// does. It reports this process's CPU time (the store's
// client side: for PostgreSQL, not the server's) and allocations per
// entry.
func BenchmarkConnLogSteady(b *testing.B) {
	const pruneEvery = DefaultLogRetention / DefaultLogBatchSize
	batch := udpFlowLogs(DefaultLogBatchSize)
	for _, bk := range backends {
		b.Run(bk.name, func(b *testing.B) {
			s := bk.store(b)
			// A deadline, as the LogWriter's writes have.
			ctx, cancel := context.WithTimeout(forLogWriter(context.Background(), new(logpace.Pacer)), time.Hour)
			defer cancel()
			// Start full: retention entries and a prune's worth more.
			for range (DefaultLogRetention / len(batch)) + pruneEvery {
				if err := s.AppendConnLogs(ctx, batch); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportAllocs()
			cpu := cpuTime(b)
			n := 0
			for b.Loop() {
				if err := s.AppendConnLogs(ctx, batch); err != nil {
					b.Fatal(err)
				}
				if n++; n%pruneEvery == 0 {
					if _, err := s.PruneConnLogs(ctx, 1, DefaultLogRetention); err != nil {
						b.Fatal(err)
					}
				}
			}
			rows := float64(n * len(batch))
			b.ReportMetric(float64(cpuTime(b)-cpu)/1e3/rows, "cpu-µs/entry")
			b.ReportMetric(rows/float64(b.Elapsed().Seconds()), "entries/s")
		})
	}
}
