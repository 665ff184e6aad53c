package storage

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/aegis-proxy/caddy-aegis/internal/logpace"
)

// Defaults of LogWriterOptions.
const (
	// DefaultLogQueueSize is the default of LogWriterOptions.QueueSize.
	DefaultLogQueueSize = 4096
	// DefaultLogBatchSize is the default of LogWriterOptions.BatchSize.
	// Only a writer that is behind fills a batch before the flush
	// interval: under a flood of short connections, a transaction of 500
	// entries costs each entry a quarter less than one of 100 (fewer
	// commits, each page of the table and its indexes written once).
	DefaultLogBatchSize = 500
	// DefaultLogFlushInterval is the default of
	// LogWriterOptions.FlushInterval.
	DefaultLogFlushInterval = 200 * time.Millisecond
	// DefaultLogRetention is the default of LogWriterOptions.Retention.
	DefaultLogRetention = 10000
	// DefaultLogPruneInterval is the default of
	// LogWriterOptions.PruneInterval.
	DefaultLogPruneInterval = 10 * time.Second
	// DefaultLogWriteTimeout is the default of LogWriterOptions.WriteTimeout.
	DefaultLogWriteTimeout = 10 * time.Second
)

// LogWriterOptions configures a LogWriter. The zero value is usable: each
// field left at 0 takes its default.
type LogWriterOptions struct {
	// QueueSize is the most entries waiting to be written; Enqueue drops
	// entries beyond it. Default: 4096.
	QueueSize int

	// BatchSize is the most entries written in one transaction; a batch
	// is written as soon as it has this many. Default: 500.
	BatchSize int

	// FlushInterval is the longest an entry waits for its batch to fill
	// before the batch is written anyway. Default: 200ms.
	FlushInterval time.Duration

	// Retention is the number of entries kept per stream; older ones are
	// pruned. Default: 0, meaning 10,000. Negative keeps every entry.
	Retention int

	// PruneInterval is the least time between two prunes of every
	// stream that got entries since its last prune. A stream that got
	// Retention entries since its last prune is pruned after the batch
	// that brought them, so that it never holds much more than twice
	// Retention: at thousands of entries a second, a prune every
	// PruneInterval would delete hundreds of thousands of rows from a
	// table grown past the store's page cache, which cost each entry about
	// a quarter more in the steady benchmark (BenchmarkConnLogSteady).
	// Default: 10s.
	PruneInterval time.Duration

	// WriteTimeout bounds one batch write and one stream's prune.
	// Default: 10s.
	WriteTimeout time.Duration

	// OnError, when set, is called from the writer's goroutine with the
	// first failed write after the store last worked (or since the
	// start): once per outage, not once per batch, so that a full disk
	// does not flood the log. The failures after it are not reported until
	// a write succeeds again; their entries are counted in Dropped and
	// passed to OnDrop. A failed prune is reported apart, once per stream
	// until a prune of it succeeds, and not while writes fail too; it
	// loses no entry, and the stream is pruned again at the first flush
	// after the next PruneInterval. It must not block for long. Default:
	// nil (errors are only counted).
	OnError func(error)

	// OnDrop, when set, is called from the writer's goroutine with the
	// entries of each batch the store failed to write, so the caller can
	// count them per stream. It must not block for long nor keep the
	// slice, which is reused. Default: nil.
	OnDrop func([]ConnLog)

	// OnRecover, when set, is called from the writer's goroutine with the
	// first write that works after a reported failure, with the number of
	// entries the store failed to write meanwhile. Default: nil.
	OnRecover func(lost uint64)

	// Retry, when > 0, keeps a batch the store could not write for want
	// of its database (ErrUnavailable: a PostgreSQL server out of reach)
	// and tries it again every Retry, while new entries wait in the queue:
	// only those beyond QueueSize are dropped (and counted), and none is
	// handed to OnDrop. Close tries once more, then drops what is left.
	// Default: 0, and such a batch is dropped like any that failed.
	Retry time.Duration
}

func (o *LogWriterOptions) setDefaults() {
	if o.QueueSize <= 0 {
		o.QueueSize = DefaultLogQueueSize
	}
	if o.BatchSize <= 0 {
		o.BatchSize = DefaultLogBatchSize
	}
	if o.FlushInterval <= 0 {
		o.FlushInterval = DefaultLogFlushInterval
	}
	if o.Retention == 0 {
		o.Retention = DefaultLogRetention
	}
	if o.PruneInterval <= 0 {
		o.PruneInterval = DefaultLogPruneInterval
	}
	if o.WriteTimeout <= 0 {
		o.WriteTimeout = DefaultLogWriteTimeout
	}
}

// LogWriter writes connection-log entries to a Store in batches, from one
// goroutine, so that whoever logs a connection never waits for the disk:
// Enqueue only puts the entry in a bounded queue, and drops it (counting
// it) when the queue is full. The writer also keeps each stream's log to
// the newest Retention entries.
//
// Create it with NewLogWriter and stop it with Close. Its methods are safe
// for concurrent use.
type LogWriter struct {
	store Store
	opts  LogWriterOptions

	// mu orders Enqueue's sends before Close: once Close has set closed,
	// no entry can enter the queue after the final drain.
	mu     sync.RWMutex
	closed bool

	queue     chan ConnLog
	stop      chan struct{}
	done      chan struct{}
	closeOnce sync.Once
	closeErr  error

	dropped atomic.Uint64
	written atomic.Uint64

	// pruneFailing holds the streams whose failed prune was reported,
	// until one of theirs succeeds; only the writer's goroutine uses it.
	pruneFailing map[int64]bool
	// failing is set from a reported failure until a write succeeds; only
	// the writer's goroutine uses it.
	failing bool
	// lost counts the entries of failed batches since the last write that
	// worked.
	lost uint64
	// droppedBefore is Dropped when the current failure began.
	droppedBefore uint64
	// pace paces the slices of the writer's writes (forLogWriter), and
	// hurries them once Close was called; only the writer's goroutine
	// uses it.
	pace *logpace.Pacer
}

// NewLogWriter starts a LogWriter that writes to store. Close it to stop
// its goroutine, before closing store: Close writes what is queued to it.
func NewLogWriter(store Store, opts LogWriterOptions) *LogWriter {
	opts.setDefaults()
	w := &LogWriter{
		store: store,
		opts:  opts,
		queue: make(chan ConnLog, opts.QueueSize),
		stop:  make(chan struct{}),
		done:  make(chan struct{}),
		pace:  new(logpace.Pacer),
	}
	go w.run()
	return w
}

// Enqueue queues e to be written and reports whether it was queued. It
// never blocks: when the queue is full, when the writer is closed, or when
// e could not be stored (see Store.AppendConnLogs), e is dropped and
// counted in Dropped.
func (w *LogWriter) Enqueue(e ConnLog) bool {
	if validConnLog(e) != nil {
		w.dropped.Add(1)
		return false
	}
	w.mu.RLock()
	defer w.mu.RUnlock()
	if w.closed {
		w.dropped.Add(1)
		return false
	}
	select {
	case w.queue <- e:
		return true
	default:
		w.dropped.Add(1)
		return false
	}
}

// Dropped is the number of entries that were not written: refused by
// Enqueue, or in a batch the store failed to write.
func (w *LogWriter) Dropped() uint64 { return w.dropped.Load() }

// Written is the number of entries written to the store.
func (w *LogWriter) Written() uint64 { return w.written.Load() }

// Close stops taking entries, writes those already queued, prunes, and
// stops the writer's goroutine; it returns once that goroutine has ended.
// It returns the error of that last write, if any. Calling Close again
// does nothing and returns nil.
func (w *LogWriter) Close() error {
	first := false
	w.closeOnce.Do(func() {
		first = true
		w.mu.Lock()
		w.closed = true
		w.mu.Unlock()
		close(w.stop)
	})
	<-w.done
	if first {
		return w.closeErr
	}
	return nil
}

func (w *LogWriter) run() {
	defer close(w.done)

	batch := make([]ConnLog, 0, w.opts.BatchSize)
	touched := make(map[int64]int) // stream → entries written since its last prune
	var lastPrune time.Time        // zero: the first flush prunes what earlier runs left

	timer := time.NewTimer(w.opts.FlushInterval)
	timer.Stop()
	timerSet := false

	// While a batch waits to be tried again (Retry), queue is nil: new
	// entries wait in w.queue.
	queue := w.queue
	var retry <-chan time.Time

	flush := func(final bool) error {
		if len(batch) == 0 {
			return nil
		}
		kept, err := w.write(batch, !final)
		if kept {
			queue, retry = nil, time.After(w.opts.Retry)
			return err
		}
		queue, retry = w.queue, nil
		full := false // a stream got Retention entries since its last prune
		for _, e := range batch {
			n := touched[e.StreamID] + 1
			touched[e.StreamID] = n
			full = full || (n >= w.opts.Retention && w.opts.Retention > 0)
		}
		batch = batch[:0]
		if timerSet {
			timer.Stop()
			timerSet = false
		}
		if time.Since(lastPrune) >= w.opts.PruneInterval {
			w.prune(touched, 0)
			lastPrune = time.Now()
		} else if full {
			w.prune(touched, w.opts.Retention)
		}
		return err
	}

	for {
		select {
		case e := <-queue:
			batch = append(batch, e)
			if len(batch) >= w.opts.BatchSize {
				flush(false)
			} else if !timerSet {
				timer.Reset(w.opts.FlushInterval)
				timerSet = true
			}
		case <-timer.C:
			timerSet = false
			if retry == nil {
				flush(false)
			}
		case <-retry:
			flush(false)
		case <-w.stop:
			// Enqueue sends nothing more: write what is left in one
			// transaction, so that Close waits for one write, not for
			// many batches, nor for a pause per slice.
			w.pace = logpace.Hurried()
			for drained := false; !drained; {
				select {
				case e := <-w.queue:
					batch = append(batch, e)
				default:
					drained = true
				}
			}
			w.closeErr = flush(true)
			if len(touched) > 0 {
				w.prune(touched, 0)
			}
			timer.Stop()
			return
		}
	}
}

// write stores one batch, counting it as written or dropped; or, with
// mayKeep and Retry, keeps it (kept) when the database is unavailable.
func (w *LogWriter) write(batch []ConnLog, mayKeep bool) (kept bool, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), w.opts.WriteTimeout)
	defer cancel()
	if err := w.store.AppendConnLogs(forLogWriter(ctx, w.pace), batch); err != nil {
		err = fmt.Errorf("writing a batch of %d connection-log entries: %w", len(batch), err)
		if mayKeep && w.opts.Retry > 0 && errors.Is(err, ErrUnavailable) {
			w.report(fmt.Errorf("%w; entries wait (up to %d, then they are dropped and counted) and are tried again every %v, and further failures are not reported",
				err, w.opts.QueueSize, w.opts.Retry))
			return true, err
		}
		w.dropped.Add(uint64(len(batch)))
		w.lost += uint64(len(batch))
		if w.opts.OnDrop != nil {
			w.opts.OnDrop(batch)
		}
		w.report(fmt.Errorf("%w; entries are dropped (and counted) until storage takes writes again, and further failures are not reported", err))
		return false, err
	}
	if w.failing && w.opts.OnRecover != nil {
		// The batches that failed, and with Retry the entries the full
		// queue refused meanwhile.
		w.opts.OnRecover(max(w.lost, w.dropped.Load()-w.droppedBefore))
	}
	w.failing, w.lost = false, 0
	w.written.Add(uint64(len(batch)))
	return false, nil
}

// prune applies retention to the streams in touched that got at
// least entries since their last prune, and takes them out of touched.
func (w *LogWriter) prune(touched map[int64]int, least int) {
	if w.opts.Retention < 0 {
		clear(touched)
		return
	}
	for id, n := range touched {
		if n < least {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), w.opts.WriteTimeout)
		_, err := w.store.PruneConnLogs(forLogWriter(ctx, w.pace), id, w.opts.Retention)
		cancel()
		if err == nil {
			delete(touched, id)
			delete(w.pruneFailing, id)
			continue
		}
		touched[id] = 0 // again at the first flush after the next PruneInterval
		// While writes fail too, the store is out: that was reported.
		if !w.pruneFailing[id] && !w.failing {
			if w.pruneFailing == nil {
				w.pruneFailing = map[int64]bool{}
			}
			w.pruneFailing[id] = true
			if w.opts.OnError != nil {
				w.opts.OnError(fmt.Errorf("%w; the stream's older entries are kept until a prune of it works, and further failures of its prunes are not reported", err))
			}
		}
	}
}

// report passes err to OnError unless a failure was reported since the
// store last took a write.
func (w *LogWriter) report(err error) {
	if w.failing {
		return
	}
	w.failing = true
	w.droppedBefore = w.dropped.Load()
	if w.opts.OnError != nil {
		w.opts.OnError(err)
	}
}
