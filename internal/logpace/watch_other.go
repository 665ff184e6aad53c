//go:build !linux

package logpace

// Watch does nothing here: pacers sleep between every two slices.
func Watch(fd int) {}

// Unwatch does nothing here.
func Unwatch(fd int) {}

// Waiting reports Unwatched: nothing is watched here.
func Waiting() Relays { return Unwatched }
