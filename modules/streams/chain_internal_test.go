package streams

import (
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/aegis-proxy/caddy-aegis/internal/testenv"
	"github.com/aegis-proxy/caddy-aegis/modules/streamstate"
	"github.com/aegis-proxy/caddy-aegis/spec"
)

// Building a stream's handler chain (every reload, every API edit) costs
// the handlers and little else: no metrics registry with Go and process
// collectors that nothing serves, as a caddy.NewContext per chain made.
func TestBuildChainAllocations(t *testing.T) {
	c := testenv.New(t)
	port := testenv.FreePort(t)
	err := c.Load(map[string]any{"streams": map[string]any{
		"storage": map[string]any{"disabled": true},
		"hosts": []any{map[string]any{
			"id": 1, "listen_address": "127.0.0.1", "listen_port": port,
			"upstream_host": "127.0.0.1", "upstream_port": 1,
		}}}})
	if err != nil {
		t.Fatal(err)
	}
	a := Running()
	s := *a.Hosts[0]
	s.ID = 2 // a stream of its own: its state comes and goes with the chain
	allocs := testing.AllocsPerRun(20, func() {
		_, release, err := a.buildChain(&s)
		if err != nil {
			t.Fatal(err)
		}
		release()
	})
	t.Logf("%.0f allocations per chain", allocs)
	if allocs > 150 {
		t.Fatalf("%.0f allocations to build and release a chain, want at most 150", allocs)
	}
}

// failingListener fails every Accept, as a process out of file
// descriptors does, until it is closed.
type failingListener struct {
	net.Listener
	calls  atomic.Int64
	closed chan struct{}
}

func (l *failingListener) Accept() (net.Conn, error) {
	l.calls.Add(1)
	select {
	case <-l.closed:
		return nil, net.ErrClosed
	default:
		return nil, syscall.EMFILE
	}
}

func (l *failingListener) Close() error { close(l.closed); return nil }

// Closing a listener whose accept loop waits out a backoff after errors
// does not wait for the backoff to end: an API write does that, holding
// the app's lock.
func TestCloseDuringAcceptBackoff(t *testing.T) {
	ln := &failingListener{closed: make(chan struct{})}
	inst := &instance{cfg: &spec.Stream{ID: 1, ListenAddress: "127.0.0.1", ListenPort: 1}, sockets: sockets{port: 1, ln: ln},
		state: streamstate.New(1), logger: zap.NewNop()}
	defer inst.state.Destruct()
	inst.state.ListenerUp(streamstate.TCP)
	inst.startAccept(&inst.sockets)
	// 5+10+…+320 ms of backoff: the loop now waits 640 ms.
	testenv.Eventually(t, "eight accept errors", func() bool { return ln.calls.Load() >= 8 })
	start := time.Now()
	inst.closeListeners()
	if took := time.Since(start); took > 100*time.Millisecond {
		t.Fatalf("closing the listener took %s while the accept loop backed off", took)
	}
}
