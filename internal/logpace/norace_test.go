//go:build !race

package logpace

const raceEnabled = false
