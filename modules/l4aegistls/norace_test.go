//go:build !race

package l4aegistls

const raceEnabled = false
