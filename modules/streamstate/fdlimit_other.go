//go:build !unix

package streamstate

func openFileLimit() uint64 { return 0 }
