//go:build race

package admin_test

// raceEnabled: the race detector slows the decoding of a large body about
// tenfold, so time bounds are loosened under it.
const raceEnabled = true
