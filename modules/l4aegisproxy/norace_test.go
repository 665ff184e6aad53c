//go:build !race

package l4aegisproxy_test

const raceEnabled = false
