package storage

import (
	"database/sql/driver"
	"net/netip"

	"modernc.org/sqlite"
)

// The SQLite store's SQL functions that PostgreSQL has in its schema
// (pgmigrations.go), so that the shared queries run on both.
func init() {
	if err := sqlite.RegisterDeterministicScalarFunction("aegis_in_net", 2, inNet); err != nil {
		panic("storage: registering aegis_in_net: " + err.Error())
	}
}

// inNet is aegis_in_net(ip, net): 1 if the address ip is in the network
// net (a CIDR prefix), else 0; a text that is not an address is in none.
func inNet(_ *sqlite.FunctionContext, args []driver.Value) (driver.Value, error) {
	ip, _ := args[0].(string)
	nt, _ := args[1].(string)
	addr, err := netip.ParseAddr(ip)
	if err != nil {
		return int64(0), nil
	}
	pfx, err := netip.ParsePrefix(nt)
	if err != nil {
		return int64(0), nil
	}
	if pfx.Contains(addr.Unmap().WithZone("")) || pfx.Contains(addr.WithZone("")) {
		return int64(1), nil
	}
	return int64(0), nil
}
