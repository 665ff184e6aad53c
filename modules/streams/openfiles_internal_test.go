//go:build unix

package streams

import (
	"strings"
	"testing"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

func TestOpenFilesError(t *testing.T) {
	s := &spec.Stream{ID: 4, Protocol: "tcp+udp", ListenPort: 20000, ListenPortEnd: 29999}
	err := openFilesError(s, 1024, 10)
	if err == nil || !strings.Contains(err.Error(), "listen_port_end 29999: 10000 ports need 20000 sockets, 10 files are open already") ||
		!strings.Contains(err.Error(), "the open-file limit is 1024") || !strings.Contains(err.Error(), "ulimit -n") {
		t.Errorf("10000 tcp+udp ports under 1024: %v", err)
	}
	if err := openFilesError(s, 20266, 10); err != nil {
		t.Errorf("under a limit of 20266 with 10 open: %v", err)
	}
	s.Protocol = "tcp"
	if err := openFilesError(s, 20000, 10000); err == nil {
		t.Error("10000 tcp ports with 10000 files open under 20000: no error")
	}
}
