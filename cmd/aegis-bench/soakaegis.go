package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// The aegis process under soak, its REST API, the streams the soak
// creates through it, and the API changes made while the load runs.

// soakAegis is bin/aegis started with storage in a temp dir and its admin
// endpoint on a free loopback port.
type soakAegis struct {
	*aegisAPI
	c       *child
	dir     string
	logFile string
}

// startSoakAegis starts binary with no stream: the soak creates them
// through the API. The connection log keeps every entry (log_retention
// -1) and Caddy's log file is not rolled, so both can be counted at the
// end.
func startSoakAegis(binary, dir string, timeout time.Duration) (*soakAegis, error) {
	admin, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	a := &soakAegis{aegisAPI: newAegisAPI(admin[0]), dir: dir, logFile: filepath.Join(dir, "aegis.log")}
	cfg := map[string]any{
		"admin": map[string]any{"listen": addr(admin[0])},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level":  "INFO",
			"writer": map[string]any{"output": "file", "filename": a.logFile, "roll": false},
		}}},
		"apps": map[string]any{"streams": map[string]any{
			"storage": map[string]any{"path": filepath.Join(dir, "streams.db"), "log_retention": -1},
		}},
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, err
	}
	file := filepath.Join(dir, "aegis.json")
	if err := os.WriteFile(file, b, 0o644); err != nil {
		return nil, err
	}
	bin, err := lookBinary(binary)
	if err != nil {
		return nil, err
	}
	env := []string{"XDG_CONFIG_HOME=" + dir, "XDG_DATA_HOME=" + dir, "HOME=" + dir}
	if a.c, err = startChild(setup{name: "aegis", dir: dir}, env, bin, "run", "--config", file); err != nil {
		return nil, err
	}
	// Ready once Caddy says it serves the config, which it does after the
	// apps have started: the admin endpoint answers before, with 503 (and
	// an error in the log) for any request the streams app must serve.
	// Then the API must know no stream yet.
	ready := func() error {
		if !dirSays(dir, "serving initial configuration") {
			return errors.New("not serving its config yet")
		}
		return a.call("GET", "/api/v1/streams/1", nil, http.StatusNotFound, nil)
	}
	if err := waitReady(a.c, timeout, ready); err != nil {
		a.c.stop()
		return nil, fmt.Errorf("aegis did not answer on its admin endpoint: %v", err)
	}
	return a, nil
}

func (a *soakAegis) pid() int { return a.c.cmd.Process.Pid }

// stats is GET /api/v1/streams/stats by stream id.
func (a *soakAegis) stats() (map[int64]spec.Status, error) {
	var list []spec.Status
	if err := a.call("GET", "/api/v1/streams/stats", nil, http.StatusOK, &list); err != nil {
		return nil, err
	}
	out := make(map[int64]spec.Status, len(list))
	for _, s := range list {
		out[s.ID] = s
	}
	return out, nil
}

// certInput is the upload of certificate bc.
func certInput(name string, bc *benchCert) spec.CertInput {
	return spec.CertInput{Name: name, Certificate: bc.chainPEM, PrivateKey: bc.keyPEM}
}

// soakStream is one stream the soak created: its settings as last sent,
// and where its clients connect.
type soakStream struct {
	spec   spec.Stream
	tg     *target
	exists bool
}

// soakStreams are the streams under load.
type soakStreams struct {
	tcp    *soakStream // plain TCP; never changed
	pp2    *soakStream // TCP with PROXY v2 and rate limits; never changed
	udp    *soakStream // UDP; never changed
	mixed  *soakStream // tcp+udp; changed in place (same sockets) by the churn
	tls    *soakStream // TLS terminated with a certificate the churn replaces
	toggle *soakStream // TCP; the churn turns it off and on
	temp   *soakStream // TCP without a connection log; the churn deletes and creates it
}

// accounted are the streams whose every connection the checks account
// for, with whether the clients' count must match exactly (a stream the
// churn turns off may have accepted connections in its socket's backlog
// that it never served).
func (ss *soakStreams) accounted() []*soakStream {
	return []*soakStream{ss.tcp, ss.pp2, ss.udp, ss.mixed, ss.tls, ss.toggle}
}

// udpIdleSeconds is the NAT entry idle timeout of the UDP streams: short,
// so that the entries end, and are logged, soon after the load stops.
const udpIdleSeconds = 5

// createSoakStreams creates the streams through the API. echoPort is the
// TCP and UDP echo, pp2Port the PROXY v2 echo.
func createSoakStreams(a *soakAegis, echoPort, pp2Port int, certID int64) (*soakStreams, error) {
	// Seven distinct ports, each free for TCP and UDP alike.
	ports, err := sparePorts(7, true, true)
	if err != nil {
		return nil, err
	}
	tcpPorts, udpPort, mixedPort := ports[:5], ports[5], ports[6]
	loopback := []string{"127.0.0.0/8"}
	base := func(name string, port int) spec.Stream {
		return spec.Stream{Name: name, Protocol: spec.ProtocolTCP, ListenAddress: "127.0.0.1", ListenPort: port,
			UpstreamHost: "127.0.0.1", UpstreamPort: echoPort, Enabled: true, WhitelistCIDRs: loopback, LogConnections: true}
	}
	ss := &soakStreams{}
	specs := []struct {
		s    **soakStream
		spec spec.Stream
	}{
		{&ss.tcp, base("soak-tcp", tcpPorts[0])},
		{&ss.pp2, func() spec.Stream {
			s := base("soak-pp2", tcpPorts[1])
			s.UpstreamPort, s.ProxyProtocolVersion = pp2Port, 2
			s.UploadRateBytes, s.DownloadRateBytes = 1<<20, 1<<20
			return s
		}()},
		{&ss.udp, func() spec.Stream {
			s := base("soak-udp", udpPort)
			s.Protocol, s.IdleTimeoutSeconds = spec.ProtocolUDP, udpIdleSeconds
			return s
		}()},
		{&ss.mixed, func() spec.Stream {
			s := base("soak-mixed", mixedPort)
			s.Protocol, s.IdleTimeoutSeconds = spec.ProtocolTCPUDP, udpIdleSeconds
			return s
		}()},
		{&ss.tls, func() spec.Stream {
			s := base("soak-tls", tcpPorts[2])
			s.SSLEnabled, s.SSLCertID = true, certID
			return s
		}()},
		{&ss.toggle, base("soak-toggle", tcpPorts[3])},
		{&ss.temp, func() spec.Stream {
			s := base("soak-temp", tcpPorts[4])
			s.LogConnections = false
			return s
		}()},
	}
	for _, sp := range specs {
		st := &soakStream{spec: sp.spec, tg: newTarget(sp.spec.Name, sp.spec.ListenPort)}
		if err := st.create(a); err != nil {
			return nil, err
		}
		*sp.s = st
	}
	return ss, nil
}

// create creates the stream (a new id each time) and checks that it
// listens.
func (st *soakStream) create(a *soakAegis) error {
	st.spec.ID = 0
	var hs spec.HostStatus
	if err := a.call("POST", "/api/v1/streams", st.spec, http.StatusCreated, &hs); err != nil {
		return err
	}
	if hs.Stream == nil || hs.ID == 0 {
		return fmt.Errorf("creating %s: the answer has no stream id", st.spec.Name)
	}
	if !hs.Status.Listening {
		return fmt.Errorf("creating %s: created, but not listening", st.spec.Name)
	}
	st.spec.ID, st.exists = hs.ID, true
	return nil
}

// update sends the stream's settings and checks that the answer shows
// them, listening if and only if enabled.
func (st *soakStream) update(a *soakAegis) error {
	var hs spec.HostStatus
	path := "/api/v1/streams/" + strconv.FormatInt(st.spec.ID, 10)
	if err := a.call("PUT", path, st.spec, http.StatusOK, &hs); err != nil {
		return err
	}
	if hs.Stream == nil {
		return fmt.Errorf("PUT %s: the answer has no stream", path)
	}
	got, want := *hs.Stream, st.spec
	if got.Enabled != want.Enabled || got.UploadRateBytes != want.UploadRateBytes || got.DownloadRateBytes != want.DownloadRateBytes ||
		got.MaxConnections != want.MaxConnections || got.Notes != want.Notes || !slices.Equal(got.WhitelistCIDRs, want.WhitelistCIDRs) ||
		got.ListenPort != want.ListenPort {
		return fmt.Errorf("PUT %s: the answer shows other settings than were sent: %+v", path, got)
	}
	if hs.Status.Listening != want.Enabled {
		return fmt.Errorf("PUT %s: enabled %v but listening %v", path, want.Enabled, hs.Status.Listening)
	}
	return nil
}

// portTaken reports whether err refuses a stream's port, which another
// process on the machine may have taken while the stream was off.
func portTaken(err error) bool {
	var se *statusError
	return errors.As(err, &se) && se.status == http.StatusBadRequest && se.field == "listen_port"
}

// spareTCPPorts picks n ports that nothing listens on over TCP.
func spareTCPPorts(n int) ([]int, error) { return sparePorts(n, true, false) }

// sparePorts picks n distinct ports free for TCP, UDP or both, from
// 20000-32767: below the ephemeral range, so that no client socket takes
// one while its stream is off.
func sparePorts(n int, tcp, udp bool) ([]int, error) {
	var out []int
	for try := 0; len(out) < n && try < 1000; try++ {
		p := 20000 + rand.IntN(12768)
		if slices.Contains(out, p) {
			continue
		}
		free := true
		if tcp {
			ln, err := net.Listen("tcp", addr(p))
			if err != nil {
				free = false
			} else {
				ln.Close()
			}
		}
		if free && udp {
			c, err := net.ListenPacket("udp", addr(p))
			if err != nil {
				free = false
			} else {
				c.Close()
			}
		}
		if free {
			out = append(out, p)
		}
	}
	if len(out) < n {
		return nil, fmt.Errorf("found %d free ports in 20000-32767, want %d", len(out), n)
	}
	return out, nil
}

// churnKind is one kind of API change, with its counts.
type churnKind struct {
	name       string
	n          int // calls made
	unexpected int // answers other than the one wanted
}

// churn makes one API change a second.
type churn struct {
	a       *soakAegis
	ss      *soakStreams
	ring    *certRing
	certID  int64
	spare   *benchCert
	spareID int64 // 0: the spare certificate is not stored
	// deleted is the id of a stream the churn deleted, 0 if none yet.
	deleted int64

	step  int
	moved int // a stream moved to another port: its own was taken meanwhile

	mu    sync.Mutex // guards the counts, which the sampler reads
	kinds []*churnKind
	byKey map[string]*churnKind
	errs  []string
}

func newChurn(a *soakAegis, ss *soakStreams, ring *certRing, certID int64, spare *benchCert) *churn {
	c := &churn{a: a, ss: ss, ring: ring, certID: certID, spare: spare, byKey: map[string]*churnKind{}}
	for _, name := range []string{kindUpdate, kindToggle, kindCreate, kindDelete, kindCertReplace, kindSpareCreate, kindSpareDelete,
		kindCertInUse, kindPortConflict, kindGone} {
		k := &churnKind{name: name}
		c.kinds = append(c.kinds, k)
		c.byKey[name] = k
	}
	return c
}

// The kinds of API change.
const (
	kindUpdate       = "update soak-mixed in place (rates, whitelist, max_connections, notes)"
	kindToggle       = "turn soak-toggle off or on"
	kindCreate       = "create soak-temp"
	kindDelete       = "delete soak-temp"
	kindCertReplace  = "replace soak-tls's certificate"
	kindSpareCreate  = "upload a spare certificate"
	kindSpareDelete  = "delete the spare certificate"
	kindCertInUse    = "delete soak-tls's certificate (refused: 409)"
	kindPortConflict = "create a stream on soak-tcp's port (refused: 400)"
	kindGone         = "update a deleted stream (refused: 404)"
)

// next makes the next change of the cycle. Each change is counted, and
// an answer other than the one wanted is noted.
func (c *churn) next() {
	i := c.step
	c.step++
	var kind string
	var err error
	switch i % 8 {
	case 0, 4:
		kind, err = kindUpdate, c.updateMixed(i/4)
	case 1, 5:
		kind, err = kindToggle, c.toggle()
	case 2, 6:
		kind, err = c.tempStep()
	case 3:
		kind, err = kindCertReplace, c.replaceCert()
	case 7:
		kind, err = c.oddStep(i / 8)
	}
	c.count(kind, err)
}

func (c *churn) count(kind string, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	k := c.byKey[kind]
	k.n++
	if err != nil {
		k.unexpected++
		if len(c.errs) < 10 {
			c.errs = append(c.errs, err.Error())
		}
	}
}

// total is the number of API calls made, and unexpected answers.
func (c *churn) total() (n, unexpected int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, k := range c.kinds {
		n += k.n
		unexpected += k.unexpected
	}
	return n, unexpected
}

// updateMixed changes soak-mixed in place: every setting it changes
// keeps its sockets, and every variant still lets the loopback clients
// in (TCP from 127.0.0.1, UDP from 127.0.1.x).
func (c *churn) updateMixed(i int) error {
	st := c.ss.mixed
	rates := []int64{0, 512 << 10, 2 << 20}
	lists := [][]string{{"127.0.0.0/8"}, {"127.0.0.1/32", "127.0.1.0/24"}, {"127.0.0.0/8", "10.0.0.0/8", "::1/128"}}
	st.spec.UploadRateBytes = rates[i%3]
	st.spec.DownloadRateBytes = rates[(i+1)%3]
	st.spec.WhitelistCIDRs = lists[i%len(lists)]
	st.spec.MaxConnections = []int{0, 5000}[i%2]
	st.spec.Notes = fmt.Sprintf("soak change %d", i)
	return st.update(c.a)
}

// toggle turns soak-toggle off, or on again. Turned on, its port may
// have been taken meanwhile: then it moves to another.
func (c *churn) toggle() error {
	st := c.ss.toggle
	st.spec.Enabled = !st.spec.Enabled
	err := st.update(c.a)
	if err != nil && st.spec.Enabled && portTaken(err) {
		err = c.move(st, st.update)
	}
	return err
}

// move gives st another spare port and tries again.
func (c *churn) move(st *soakStream, try func(*soakAegis) error) error {
	p, err := spareTCPPorts(1)
	if err != nil {
		return err
	}
	st.spec.ListenPort = p[0]
	if err := try(c.a); err != nil {
		return err
	}
	st.tg.port.Store(int32(p[0]))
	c.moved++
	return nil
}

// tempStep deletes soak-temp, or creates it again (with a new id).
func (c *churn) tempStep() (string, error) {
	st := c.ss.temp
	if st.exists {
		err := c.a.call("DELETE", "/api/v1/streams/"+strconv.FormatInt(st.spec.ID, 10), nil, http.StatusNoContent, nil)
		if err == nil {
			st.exists, c.deleted = false, st.spec.ID
		}
		return kindDelete, err
	}
	err := st.create(c.a)
	if err != nil && portTaken(err) {
		err = c.move(st, st.create)
	}
	return kindCreate, err
}

// replaceCert uploads the next certificate of the ring over soak-tls's.
// Once the API has answered, no new handshake may get an older one.
func (c *churn) replaceCert() error {
	next := c.ring.current.Load() + 1
	if int(next) >= len(c.ring.gens) {
		return fmt.Errorf("replacing the certificate: all %d certificates made for the run are used", len(c.ring.gens))
	}
	var cs spec.CertStatus
	err := c.a.call("PUT", "/api/v1/certificates/"+strconv.FormatInt(c.certID, 10), certInput("soak", c.ring.gens[next]), http.StatusOK, &cs)
	if err != nil {
		return err
	}
	if !slices.Contains(cs.UsedBy, c.ss.tls.spec.ID) {
		return fmt.Errorf("replacing the certificate: used_by is %v, want it to list soak-tls (%d)", cs.UsedBy, c.ss.tls.spec.ID)
	}
	c.ring.current.Store(next)
	return nil
}

// oddStep is every eighth change: in turn the spare certificate's upload
// and deletion, and three requests the API must refuse.
func (c *churn) oddStep(i int) (string, error) {
	switch i % 5 {
	case 0:
		return kindSpareCreate, c.spareStep()
	case 1:
		return kindCertInUse, c.a.call("DELETE", "/api/v1/certificates/"+strconv.FormatInt(c.certID, 10), nil, http.StatusConflict, nil)
	case 2:
		return kindSpareDelete, c.spareStep()
	case 3:
		s := c.ss.tcp.spec
		s.ID, s.Name = 0, "soak-conflict"
		err := c.a.call("POST", "/api/v1/streams", s, http.StatusBadRequest, nil)
		return kindPortConflict, err
	default:
		id := c.deleted
		if id == 0 {
			id = 1 << 40
		}
		s := c.ss.temp.spec
		s.ID = 0
		return kindGone, c.a.call("PUT", "/api/v1/streams/"+strconv.FormatInt(id, 10), s, http.StatusNotFound, nil)
	}
}

// spareStep uploads the spare certificate, or deletes it.
func (c *churn) spareStep() error {
	if c.spareID == 0 {
		var cs spec.CertStatus
		if err := c.a.call("POST", "/api/v1/certificates", certInput("soak-spare", c.spare), http.StatusCreated, &cs); err != nil {
			return err
		}
		if cs.ID == 0 {
			return errors.New("uploading the spare certificate: the answer has no id")
		}
		c.spareID = cs.ID
		return nil
	}
	err := c.a.call("DELETE", "/api/v1/certificates/"+strconv.FormatInt(c.spareID, 10), nil, http.StatusNoContent, nil)
	if err == nil {
		c.spareID = 0
	}
	return err
}

// restore puts back what the soak started with: soak-toggle on, soak-temp
// present, no spare certificate. The calls count as changes.
func (c *churn) restore() {
	if !c.ss.toggle.spec.Enabled {
		c.count(kindToggle, c.toggle())
	}
	if !c.ss.temp.exists {
		kind, err := c.tempStep()
		c.count(kind, err)
	}
	if c.spareID != 0 {
		c.count(kindSpareDelete, c.spareStep())
	}
}
