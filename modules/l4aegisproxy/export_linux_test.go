package l4aegisproxy

// Parked is the number of connections the parker holds.
func Parked() int {
	parkMu.Lock()
	defer parkMu.Unlock()
	if thePark == nil {
		return 0
	}
	return thePark.count
}
