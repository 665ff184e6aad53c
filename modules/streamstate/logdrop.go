package streamstate

// CountLogDropped adds to each running stream's LogDropped the entries of
// that stream in dropped (stream ID → entries) that storage failed to
// write. Streams no longer running are passed over. It is for the
// connection-log writer's goroutine, after a failed batch: never call it
// from a relay.
func CountLogDropped(dropped map[int64]uint64) {
	if len(dropped) == 0 {
		return
	}
	pool.Range(func(_, v any) bool {
		if s, ok := v.(*State); ok {
			if n := dropped[s.ID]; n > 0 {
				s.LogDropped.Add(n)
			}
		}
		return true
	})
}
