package main

import (
	"bufio"
	"bytes"
	"context"
	crand "crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	proxyproto "github.com/pires/go-proxyproto"
)

// The soak's clients: short TCP connections, long-lived ones, UDP sessions
// and TLS connections. Each checks that what comes back is what it sent
// and counts how the attempt ended.

// outcome is how one attempt ended.
type outcome int

const (
	outOK       outcome = iota
	outRefused          // the dial was refused: nothing listened on the port
	outCut              // closed or reset by the other end before the echo was complete
	outFailed           // any other error, such as a timeout
	outMismatch         // what came back differs from what was sent
	numOutcomes
)

var outcomeNames = [numOutcomes]string{"ok", "refused", "cut", "failed", "mismatch"}

// soakOpTimeout bounds each step of an attempt: the dial, a handshake, an
// echo.
const soakOpTimeout = 10 * time.Second

// classify names the outcome of an error of a dial, handshake or echo.
func classify(err error) outcome {
	switch {
	case err == nil:
		return outOK
	case errors.Is(err, syscall.ECONNREFUSED):
		return outRefused
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF),
		errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return outCut
	}
	return outFailed
}

// mismatchError is an echo that differs from what was sent.
type mismatchError struct{ what string }

func (e *mismatchError) Error() string { return e.what }

// tally counts one kind of load against one stream.
type tally struct {
	stream, kind string
	// gaps: refused and cut are expected, since the API churn turns the
	// stream off at times.
	gaps     bool
	attempts atomic.Int64
	// reached are the TCP connections that the proxy accepted (the dial
	// succeeded), or the UDP sessions that got at least one echo.
	reached  atomic.Int64
	outcomes [numOutcomes]atomic.Int64
	// resent are UDP datagrams sent again after no echo came in time.
	resent atomic.Int64
	// sent and rcvd are the bytes the clients wrote and read (TCP).
	sent, rcvd atomic.Int64

	mu   sync.Mutex
	errs map[string]int // unexpected failures by description, at most maxErrs
}

// maxErrs bounds the distinct failure descriptions a tally keeps.
const maxErrs = 8

func newTally(stream, kind string, gaps bool) *tally {
	return &tally{stream: stream, kind: kind, gaps: gaps, errs: map[string]int{}}
}

// record counts an attempt's outcome; err says why it was not ok.
func (t *tally) record(o outcome, err error) {
	t.outcomes[o].Add(1)
	if t.expected(o) {
		return
	}
	msg := outcomeNames[o]
	if err != nil {
		msg += ": " + shortErr(err)
	}
	t.mu.Lock()
	if _, ok := t.errs[msg]; ok || len(t.errs) < maxErrs {
		t.errs[msg]++
	}
	t.mu.Unlock()
}

// expected reports whether o is no failure for this tally.
func (t *tally) expected(o outcome) bool {
	return o == outOK || (t.gaps && (o == outRefused || o == outCut))
}

// unexpected is how many attempts ended in a failure.
func (t *tally) unexpected() int64 {
	var n int64
	for o := range numOutcomes {
		if !t.expected(o) {
			n += t.outcomes[o].Load()
		}
	}
	return n
}

// failures lists the kept failure descriptions, most frequent first.
func (t *tally) failures() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	msgs := make([]string, 0, len(t.errs))
	for msg := range t.errs {
		msgs = append(msgs, msg)
	}
	slices.SortFunc(msgs, func(a, b string) int { return t.errs[b] - t.errs[a] })
	out := make([]string, len(msgs))
	for i, msg := range msgs {
		out[i] = fmt.Sprintf("%dx %s", t.errs[msg], msg)
	}
	return out
}

// shortErr is err's message with addresses, which differ every time,
// left out, so that failures of one kind group together.
func shortErr(err error) string {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		return op.Op + ": " + op.Err.Error()
	}
	s := err.Error()
	if len(s) > 160 {
		s = s[:160] + "..."
	}
	return s
}

// target is a stream's front port, which the API churn may move.
type target struct {
	name string
	port atomic.Int32
}

func newTarget(name string, port int) *target {
	t := &target{name: name}
	t.port.Store(int32(port))
	return t
}

func (t *target) addr() string { return addr(int(t.port.Load())) }

// connMode is what a TCP client does on top of the echo.
type connMode int

const (
	modePlain connMode = iota
	modePP2            // the upstream first answers the PROXY v2 header's source address
	modeTLS            // TLS terminated by the proxy
)

// srcAlloc hands out the source addresses of UDP sessions: 127.0.1.1 to
// 127.0.1.250 with ports 10000-19999, in turn, so that no address comes
// back before 2.5 million others: a new session never joins a NAT entry
// that an earlier one left behind (the kernel's own choice of port could).
type srcAlloc struct{ n atomic.Uint64 }

func (a *srcAlloc) take() *net.UDPAddr {
	n := a.n.Add(1) - 1
	return &net.UDPAddr{IP: net.IPv4(127, 0, 1, byte(1+n%250)), Port: 10000 + int(n/250%10000)}
}

// certRing is the succession of certificates the TLS stream serves: the
// API churn replaces the stored certificate with the next one, and the
// clients check that each handshake got one of them, and no older one
// than the last replacement acknowledged before the handshake began.
type certRing struct {
	gens    []*benchCert
	byLeaf  map[string]int // leaf DER → index in gens
	current atomic.Int64   // the last generation the API acknowledged
	served  []atomic.Int64 // handshakes per generation
	stale   atomic.Int64   // handshakes that got an older one than current at their start
}

func newCertRing(n int) (*certRing, error) {
	r := &certRing{byLeaf: map[string]int{}, served: make([]atomic.Int64, n)}
	for i := range n {
		bc, err := newBenchCert(time.Now())
		if err != nil {
			return nil, err
		}
		r.gens = append(r.gens, bc)
		r.byLeaf[string(bc.leafDER)] = i
	}
	return r, nil
}

// clientConfig verifies the server's chain against the CA of the
// generation its leaf belongs to. It keeps no session cache: every
// handshake is a full one.
func (r *certRing) clientConfig() *tls.Config {
	return &tls.Config{
		ServerName:         tlsName,
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // VerifyConnection verifies, against the right CA
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the server sent no certificate")
			}
			g, ok := r.byLeaf[string(cs.PeerCertificates[0].Raw)]
			if !ok {
				return errors.New("the server's certificate is none the soak uploaded")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: r.gens[g].roots, Intermediates: inter, DNSName: tlsName})
			return err
		},
	}
}

// check counts the generation a handshake got; at is the generation
// current when it began.
func (r *certRing) check(cs tls.ConnectionState, at int64) error {
	g := r.byLeaf[string(cs.PeerCertificates[0].Raw)]
	r.served[g].Add(1)
	if int64(g) < at {
		r.stale.Add(1)
		return &mismatchError{fmt.Sprintf("certificate %d served after certificate %d replaced it", g, at)}
	}
	return nil
}

// soakLoad runs the clients.
type soakLoad struct {
	block []byte // random bytes that payloads are cut from
	src   srcAlloc
	certs *certRing
	tlsc  *tls.Config
}

func newSoakLoad(certs *certRing) (*soakLoad, error) {
	l := &soakLoad{block: make([]byte, 64<<10), certs: certs}
	if _, err := crand.Read(l.block); err != nil {
		return nil, err
	}
	if certs != nil {
		l.tlsc = certs.clientConfig()
	}
	return l, nil
}

// payload is n random bytes of the block.
func (l *soakLoad) payload(rng *rand.Rand, n int) []byte {
	off := rng.IntN(len(l.block) - n + 1)
	return l.block[off : off+n]
}

// open dials tg, counts the connection as reached, and does what mode
// asks before the echo can start.
func (l *soakLoad) open(t *tally, tg *target, mode connMode) (net.Conn, error) {
	raw, err := net.DialTimeout("tcp", tg.addr(), soakOpTimeout)
	if err != nil {
		return nil, err
	}
	t.reached.Add(1)
	raw.SetDeadline(time.Now().Add(soakOpTimeout))
	switch mode {
	case modeTLS:
		at := l.certs.current.Load()
		c := tls.Client(raw, l.tlsc)
		if err := c.Handshake(); err != nil {
			raw.Close()
			return nil, err
		}
		if err := l.certs.check(c.ConnectionState(), at); err != nil {
			raw.Close()
			return nil, err
		}
		return c, nil
	case modePP2:
		n, err := checkPP2(raw)
		t.rcvd.Add(int64(n))
		if err != nil {
			raw.Close()
			return nil, err
		}
	}
	return raw, nil
}

// checkPP2 reads what the PROXY v2 upstream answers first, the version
// and source address of the header it got, and checks that the source
// is this client. It returns the bytes it read.
func checkPP2(c net.Conn) (int, error) {
	var n [1]byte
	if _, err := io.ReadFull(c, n[:]); err != nil {
		return 0, err
	}
	got := make([]byte, n[0])
	k, err := io.ReadFull(c, got)
	if err != nil {
		return 1 + k, err
	}
	if want := "2 " + c.LocalAddr().String(); string(got) != want {
		return 1 + k, &mismatchError{fmt.Sprintf("the upstream got a PROXY header saying %q, want %q", got, want)}
	}
	return 1 + k, nil
}

// echo sends n random bytes on c and checks that the same come back.
func (l *soakLoad) echo(t *tally, c net.Conn, n int, rng *rand.Rand, buf []byte) error {
	msg := l.payload(rng, n)
	c.SetDeadline(time.Now().Add(soakOpTimeout))
	w, err := c.Write(msg)
	t.sent.Add(int64(w))
	if err != nil {
		return err
	}
	r, err := io.ReadFull(c, buf[:n])
	t.rcvd.Add(int64(r))
	if err != nil {
		return err
	}
	if !bytes.Equal(buf[:n], msg) {
		return &mismatchError{fmt.Sprintf("echo of %d bytes differs from what was sent", n)}
	}
	return nil
}

// outcomeOf is the outcome of an attempt that ended with err.
func outcomeOf(err error) outcome {
	var m *mismatchError
	if errors.As(err, &m) {
		return outMismatch
	}
	return classify(err)
}

// shortConn is one short connection: connect, echo 1 byte to 16 KiB,
// close.
func (l *soakLoad) shortConn(t *tally, tg *target, mode connMode, rng *rand.Rand, buf []byte) {
	t.attempts.Add(1)
	c, err := l.open(t, tg, mode)
	if err == nil {
		err = l.echo(t, c, 1+rng.IntN(16<<10), rng, buf)
		c.Close()
	}
	t.record(outcomeOf(err), err)
}

// longConn is one long-lived connection: an echo of 64 to 1024 bytes
// every second for life (or until ctx ends), then close.
func (l *soakLoad) longConn(ctx context.Context, t *tally, tg *target, mode connMode, life time.Duration, rng *rand.Rand, buf []byte) {
	t.attempts.Add(1)
	c, err := l.open(t, tg, mode)
	if err != nil {
		t.record(outcomeOf(err), err)
		return
	}
	defer c.Close()
	end := time.Now().Add(life)
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	for {
		if err := l.echo(t, c, 64+rng.IntN(961), rng, buf); err != nil {
			t.record(outcomeOf(err), err)
			return
		}
		if !time.Now().Before(end) {
			break
		}
		select {
		case <-ctx.Done():
			t.record(outOK, nil)
			return
		case <-tick.C:
		}
	}
	t.record(outOK, nil)
}

// udpTries is how many times a datagram is sent before its missing echo
// is a failure.
const udpTries = 3

// udpWait is how long an echo may take before the datagram is sent again.
const udpWait = time.Second

// udpSession is one UDP client: from a source address of its own, 3 to
// 8 datagrams of 16 to 512 bytes, 50 to 150 ms apart, each checked
// against its echo.
func (l *soakLoad) udpSession(ctx context.Context, t *tally, tg *target, rng *rand.Rand, buf []byte) {
	t.attempts.Add(1)
	raddr := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(tg.port.Load())}
	var c *net.UDPConn
	var err error
	for range 10 { // skip addresses that something else holds
		if c, err = net.DialUDP("udp4", l.src.take(), raddr); err == nil || !errors.Is(err, syscall.EADDRINUSE) {
			break
		}
	}
	if err != nil {
		t.record(outFailed, err)
		return
	}
	defer c.Close()
	msg := make([]byte, 512)
	reached := false
	for i := range 3 + rng.IntN(6) {
		n := 16 + rng.IntN(497)
		binary.BigEndian.PutUint32(msg, uint32(i))
		copy(msg[4:n], l.payload(rng, n-4))
		err := l.udpExchange(t, c, msg[:n], uint32(i), buf)
		if err == nil && !reached {
			reached = true
			t.reached.Add(1)
		}
		if err != nil {
			t.record(outcomeOf(err), err)
			return
		}
		select {
		case <-ctx.Done():
			t.record(outOK, nil)
			return
		case <-time.After(time.Duration(50+rng.IntN(101)) * time.Millisecond):
		}
	}
	t.record(outOK, nil)
}

// udpExchange sends msg, whose first 4 bytes are seq, until its echo
// comes, at most udpTries times. Echoes of earlier datagrams (sent again
// but answered after all) are skipped.
func (l *soakLoad) udpExchange(t *tally, c *net.UDPConn, msg []byte, seq uint32, buf []byte) error {
	for try := range udpTries {
		if try > 0 {
			t.resent.Add(1)
		}
		if _, err := c.Write(msg); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(udpWait))
		for {
			n, err := c.Read(buf)
			if isTimeout(err) {
				break // send again
			}
			if err != nil {
				return err
			}
			if n >= 4 && binary.BigEndian.Uint32(buf) < seq {
				continue // a late echo of an earlier datagram
			}
			if !bytes.Equal(buf[:n], msg) {
				return &mismatchError{fmt.Sprintf("echo of a %d-byte datagram differs from what was sent (%d bytes)", len(msg), n)}
			}
			return nil
		}
	}
	return fmt.Errorf("no echo of a %d-byte datagram after %d tries, %v apart", len(msg), udpTries, udpWait)
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// paced runs op rate times a second on workers goroutines until ctx ends.
// A tick that finds every worker busy is skipped: the rate is a ceiling,
// and the report shows what was reached.
func paced(ctx context.Context, wg *sync.WaitGroup, rate float64, workers int, op func(rng *rand.Rand, buf []byte)) {
	if rate <= 0 || workers < 1 {
		return
	}
	tk := time.NewTicker(max(time.Duration(float64(time.Second)/rate), time.Microsecond))
	var inner sync.WaitGroup
	for range workers {
		inner.Go(func() {
			rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
			buf := make([]byte, 16<<10)
			for {
				select {
				case <-ctx.Done():
					return
				case <-tk.C:
					op(rng, buf)
				}
			}
		})
	}
	wg.Go(func() {
		inner.Wait()
		tk.Stop()
	})
}

// held keeps n long-lived connections open until ctx ends: each lives
// 20 to 40 seconds (at most half of maxLife), then the next one opens. A
// connection that ends within a second (refused, or cut, while the API
// has its stream off) is followed by a pause of half a second.
func held(ctx context.Context, wg *sync.WaitGroup, n int, maxLife time.Duration, conn func(life time.Duration, rng *rand.Rand, buf []byte)) {
	for range n {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
			buf := make([]byte, 16<<10)
			for ctx.Err() == nil {
				life := 20*time.Second + time.Duration(rng.Int64N(int64(20*time.Second)))
				start := time.Now()
				conn(min(life, maxLife/2), rng, buf)
				if time.Since(start) < time.Second {
					select {
					case <-ctx.Done():
					case <-time.After(500 * time.Millisecond):
					}
				}
			}
		})
	}
}

// servePP2Echo is the upstream of the PROXY v2 stream: it reads the
// header, answers its version and source address (one length byte, then
// "2 ip:port"), then echoes.
func servePP2Echo(c net.Conn) {
	c.SetReadDeadline(time.Now().Add(soakOpTimeout))
	br := bufio.NewReader(c)
	h, err := proxyproto.Read(br)
	if err != nil {
		return
	}
	c.SetReadDeadline(time.Time{})
	src := "none"
	if h.SourceAddr != nil {
		src = h.SourceAddr.String()
	}
	line := fmt.Sprintf("%d %s", h.Version, src)
	if _, err := c.Write(append([]byte{byte(len(line))}, line...)); err != nil {
		return
	}
	io.Copy(c, br)
}
