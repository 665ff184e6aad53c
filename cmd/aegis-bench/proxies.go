package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/template"
	"time"

	"github.com/aegis-proxy/caddy-aegis/spec"
)

// ports holds one port per upstream kind: for a proxy its front ports, for
// direct the upstream ports themselves. A zero port is a route the proxy
// does not carry: the TCP test uses the three TCP kinds, the UDP tests only
// the UDP echo.
type ports struct{ Sink, Source, Echo, UDP int }

// list is the TCP ports.
func (p ports) list() []int { return []int{p.Sink, p.Source, p.Echo} }

// setup holds what a proxy needs to start: a temp dir of its own, the
// upstream ports, free front ports, and the path of its binary.
type setup struct {
	name   string
	dir    string
	up     ports
	front  ports
	binary string
	pin    bool
	// benchCPU pins the process with the bench on CPU 0: a proxy that is
	// not under test, such as the front proxy of the PROXY protocol rows.
	benchCPU bool
	// udpEntries is how many UDP sessions the proxy must be able to hold
	// (the NAT entry test), 0 if none.
	udpEntries int
	// idleConns is how many TCP connections the proxy must be able to hold
	// at once (the idle memory test, -idle), 0 if none.
	idleConns int
	// udpEnd is when the proxy ends a UDP session.
	udpEnd udpEnding
	// cert is the certificate to terminate TLS with (the TLS test), nil
	// for plain TCP and UDP.
	cert *benchCert
	// timeout is how long the proxy may take to start; 0 means
	// defaultStartTimeout.
	timeout time.Duration
}

// defaultStartTimeout is the -start-timeout flag's default.
const defaultStartTimeout = 10 * time.Second

func (s setup) startTimeout() time.Duration {
	if s.timeout > 0 {
		return s.timeout
	}
	return defaultStartTimeout
}

// proxy is one proxy under test.
type proxy struct {
	name string
	// binary finds the executable; "" means no process (direct).
	binary func(cfg *config) string
	// start writes the config and starts the process.
	start func(s setup) (*child, error)
	// rssPID is the process whose memory is measured.
	rssPID func(c *child) (int, error)
	// noUDP says why the proxy cannot relay UDP, or "".
	noUDP string
	// startTLS starts the proxy terminating TLS with s.cert on each front
	// TCP port; nil if it cannot (direct).
	startTLS func(s setup) (*child, error)
}

var proxies = []proxy{
	{name: "direct"},
	{name: "aegis", binary: func(c *config) string { return c.aegis }, start: startAegis, rssPID: mainPID,
		startTLS: startAegisTLS},
	{name: "haproxy", binary: func(*config) string { return "haproxy" }, start: startHAProxy, rssPID: mainPID,
		noUDP: "HAProxy does not proxy UDP", startTLS: startHAProxyTLS},
	{name: "nginx", binary: func(*config) string { return "nginx" }, start: startNginx, rssPID: nginxWorker,
		startTLS: startNginxTLS},
}

func mainPID(c *child) (int, error) { return c.cmd.Process.Pid, nil }

// nginxWorker is the one worker process of the nginx master.
func nginxWorker(c *child) (int, error) {
	kids, err := childPIDs(c.cmd.Process.Pid)
	if err != nil {
		return 0, err
	}
	if len(kids) != 1 {
		return 0, fmt.Errorf("nginx has %d worker processes, want 1", len(kids))
	}
	return kids[0], nil
}

// freePorts picks n free ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var out []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		out = append(out, ln.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

// freeUDPPort picks a free UDP port on 127.0.0.1.
func freeUDPPort() (int, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return c.LocalAddr().(*net.UDPAddr).Port, nil
}

// --- aegis ---

// aegisTLS is what the TLS test adds to the aegis config: the database
// that holds the certificate, and the certificate's id there.
type aegisTLS struct {
	dbPath string
	certID int64
}

// natHardCap is the most NAT entries an aegis UDP stream holds
// (udpnat.HardCap; the bench imports no Caddy package).
const natHardCap = 100_000

// udpIdleTimeout is how long a UDP session (NAT entry) lives without
// traffic, for aegis (idle_timeout_seconds) and nginx (proxy_timeout) alike.
const udpIdleTimeout = 120

// udpEnding is when a proxy ends a UDP session: after responses replies
// per datagram (aegis udp_responses, nginx proxy_responses; 0: not set),
// or after idle seconds without traffic (0: udpIdleTimeout).
type udpEnding struct{ responses, idle int }

// idleSeconds is e's idle timeout in seconds.
func (e udpEnding) idleSeconds() int {
	if e.idle > 0 {
		return e.idle
	}
	return udpIdleTimeout
}

// aegisConfig renders the Caddy JSON config for bin/aegis: one stream per
// route, the TCP ones with ids 1-3 and the UDP echo with id 4. Every stream
// has the whitelist and the connection log, like the allow/deny and the
// access log of the nginx config.
func aegisConfig(adminPort int, logFile string, up, front ports) ([]byte, error) {
	return aegisConfigWith(adminPort, logFile, up, front, nil)
}

// aegisConfigWith is aegisConfig; with t, every TCP stream terminates TLS
// with certificate t.certID, and the app's storage is t.dbPath.
func aegisConfigWith(adminPort int, logFile string, up, front ports, t *aegisTLS) ([]byte, error) {
	return aegisConfigOpts(adminPort, logFile, up, front, t, udpEnding{})
}

// aegisConfigOpts is aegisConfigWith; the UDP stream ends its sessions as
// end says.
func aegisConfigOpts(adminPort int, logFile string, up, front ports, t *aegisTLS, end udpEnding) ([]byte, error) {
	var hosts []spec.Stream
	for _, r := range routes(up, front) {
		h := benchStream(int64(r.ID), "bench-"+r.Kind, r.Front, r.Up)
		if r.UDP {
			h.Protocol, h.IdleTimeoutSeconds = spec.ProtocolUDP, end.idleSeconds()
			h.UDPResponses = end.responses
			// As nginx's: room for the NAT test's entries, all from
			// 127.0.0.1. By default one stream takes half of the
			// open-file limit after a reserve, and one source an eighth
			// of that.
			h.MaxConnections, h.MaxConnectionsPerIP = natHardCap, natHardCap
		} else if t != nil {
			h.SSLEnabled, h.SSLCertID = true, t.certID
		}
		hosts = append(hosts, h)
	}
	storage := ""
	if t != nil {
		storage = t.dbPath
	}
	return aegisJSON(adminPort, logFile, hosts, storage)
}

// benchStream is a TCP stream from 127.0.0.1:front to 127.0.0.1:up with
// the whitelist and the connection log, as every bench stream has. Its
// max_connections leaves room for the idle test (-idle), as HAProxy's
// maxconn and nginx's worker_connections do: by default a stream takes
// a share of the open-file limit (4,375 connections at 20,000).
func benchStream(id int64, name string, front, up int) spec.Stream {
	return spec.Stream{
		ID: id, Name: name, Protocol: spec.ProtocolTCP,
		ListenAddress: "127.0.0.1", ListenPort: front,
		UpstreamHost: "127.0.0.1", UpstreamPort: up, Enabled: true,
		WhitelistCIDRs: []string{"127.0.0.0/8"}, LogConnections: true,
		MaxConnections: natHardCap,
	}
}

// aegisJSON is the Caddy JSON config of bin/aegis with hosts, its log in
// logFile at level INFO, and the app's storage at storage ("": none).
func aegisJSON(adminPort int, logFile string, hosts []spec.Stream, storage string) ([]byte, error) {
	app := map[string]any{"hosts": hosts}
	if storage != "" {
		app["storage"] = map[string]any{"path": storage}
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": fmt.Sprintf("127.0.0.1:%d", adminPort)},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"level":  "INFO",
			"writer": map[string]any{"output": "file", "filename": logFile},
		}}},
		"apps": map[string]any{"streams": app},
	}
	return json.MarshalIndent(cfg, "", "  ")
}

func startAegis(s setup) (*child, error) {
	admin, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	cfg, err := aegisConfigOpts(admin[0], filepath.Join(s.dir, "aegis.log"), s.up, s.front, nil, s.udpEnd)
	if err != nil {
		return nil, err
	}
	return launchAegis(s, cfg)
}

// startAegisTLS starts aegis with storage in s.dir and no stream, uploads
// s.cert through its API (POST /api/v1/certificates), as a user would, and
// then loads the config whose TCP streams terminate TLS with it.
func startAegisTLS(s setup) (*child, error) {
	admin, err := freePorts(1)
	if err != nil {
		return nil, err
	}
	t := &aegisTLS{dbPath: filepath.Join(s.dir, "streams.db")}
	logFile := filepath.Join(s.dir, "aegis.log")
	cfg, err := aegisConfigWith(admin[0], logFile, ports{}, ports{}, t)
	if err != nil {
		return nil, err
	}
	c, err := launchAegis(s, cfg)
	if err != nil {
		return nil, err
	}
	api := newAegisAPI(admin[0])
	// The API answers before the streams app runs, and refuses an upload
	// with 503 until it does: that, or no answer, is "not ready yet".
	var upErr error
	err = waitReady(c, s.startTimeout(), func() error {
		t.certID, upErr = uploadAegisCert(api, s.cert)
		var se *statusError
		if errors.As(upErr, &se) && se.status != http.StatusServiceUnavailable {
			return nil // answered for good; upErr says how
		}
		return upErr
	})
	if err == nil {
		err = upErr
	}
	if err == nil {
		cfg, err = aegisConfigWith(admin[0], logFile, s.up, s.front, t)
	}
	if err == nil {
		err = api.load(cfg)
	}
	if err != nil {
		c.stop()
		return nil, fmt.Errorf("aegis: %v", err)
	}
	return c, nil
}

// launchAegis writes cfg and starts bin/aegis with it.
func launchAegis(s setup, cfg []byte) (*child, error) {
	file := filepath.Join(s.dir, "aegis.json")
	if err := os.WriteFile(file, cfg, 0o644); err != nil {
		return nil, err
	}
	// Keep Caddy's autosave and data out of $HOME.
	env := []string{"GOMAXPROCS=1", "XDG_CONFIG_HOME=" + s.dir, "XDG_DATA_HOME=" + s.dir, "HOME=" + s.dir}
	return startChild(s, env, s.binary, "run", "--config", file)
}

// --- haproxy ---

// haproxyTmpl is the HAProxy config. maxconn is 9000, not more: HAProxy
// wants two fds per connection and will not start if it cannot raise its
// fd limit that far (the hard limit is 20000 here).
var haproxyTmpl = template.Must(template.New("haproxy").Parse(haproxyHead + `{{range .}}{{if not .UDP}}
frontend fe_{{.Kind}}
    bind 127.0.0.1:{{.Front}}
    tcp-request connection reject if !{ src 127.0.0.0/8 }
    default_backend be_{{.Kind}}

backend be_{{.Kind}}
    server up 127.0.0.1:{{.Up}}
{{end}}{{end}}`))

// haproxyHead is the global and defaults sections of every HAProxy config
// but the TLS test's.
const haproxyHead = `global
    nbthread 1
    maxconn 9000
    log stdout format raw local0

defaults
    mode tcp
    log global
    option tcplog
    maxconn 9000
    timeout connect 10s
    timeout client 1h
    timeout server 1h
`

// route is one front port relayed to one upstream port.
type route struct {
	ID        int // the aegis stream id
	Kind      string
	Front, Up int
	UDP       bool
}

// routes are the routes with a front port.
func routes(up, front ports) []route {
	var out []route
	for _, r := range []route{
		{1, "sink", front.Sink, up.Sink, false},
		{2, "source", front.Source, up.Source, false},
		{3, "echo", front.Echo, up.Echo, false},
		{4, "udp-echo", front.UDP, up.UDP, true},
	} {
		if r.Front != 0 {
			out = append(out, r)
		}
	}
	return out
}

func haproxyConfig(up, front ports) (string, error) {
	var b bytes.Buffer
	err := haproxyTmpl.Execute(&b, routes(up, front))
	return b.String(), err
}

func startHAProxy(s setup) (*child, error) {
	cfg, err := haproxyConfig(s.up, s.front)
	if err != nil {
		return nil, err
	}
	return launchHAProxy(s, cfg)
}

// launchHAProxy writes cfg and starts haproxy with it.
func launchHAProxy(s setup, cfg string) (*child, error) {
	file := filepath.Join(s.dir, "haproxy.cfg")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	// -db: foreground. Logs go to stdout, which startChild sends to a file.
	return startChild(s, nil, s.binary, "-db", "-f", file)
}

// --- nginx ---

// nginxTmpl is the nginx config. For UDP, proxy_responses is left at its
// default (no limit): a client's session, nginx's NAT entry, then lives
// until proxy_timeout passes without traffic, like an aegis UDP stream with
// idle_timeout_seconds. With proxy_responses 1, nginx would end the session
// as soon as every datagram had its echo and open a new upstream socket for
// the next one: that measures session churn, not relaying, and holds no
// entry for the NAT test. A UDP session takes two of worker_connections
// (the client side and the upstream socket), so the NAT test raises it.
var nginxTmpl = template.Must(template.New("nginx").Parse(`load_module {{.Module}};
worker_processes 1;
worker_rlimit_nofile {{.Files}};
daemon off;
master_process on;
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/nginx-error.log warn;

events {
    worker_connections {{.Conns}};
}

stream {
    log_format bench '$remote_addr [$time_local] $protocol $status '
                     '$bytes_sent $bytes_received $session_time "$upstream_addr"';
    access_log {{.Dir}}/nginx-access.log bench;
{{range .Routes}}
    server {
        listen 127.0.0.1:{{.Front}}{{if .UDP}} udp{{end}};
        allow 127.0.0.0/8;
        deny all;
{{- if .UDP}}
        proxy_timeout {{$.UDPTimeout}}s;
{{- if $.Responses}}
        proxy_responses {{$.Responses}};
{{- end}}
{{- else}}
        proxy_connect_timeout 10s;
        proxy_timeout 1h;
{{- end}}
        proxy_pass 127.0.0.1:{{.Up}};
    }
{{end}}}
`))

// nginxModule is where Debian's libnginx-mod-stream puts the module.
const nginxModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

// nginxConfig renders the nginx config; sessions is how many UDP sessions
// or TCP connections it must hold at once, 0 if no such test runs. Each
// takes two of worker_connections (the client's side and the upstream's);
// the open-file limit stays at 20,000 (the hard limit here), enough for
// 9,000 TCP connections, HAProxy's maxconn.
func nginxConfig(dir, module string, up, front ports, sessions int) (string, error) {
	return nginxConfigWith(dir, module, up, front, sessions, udpEnding{})
}

// nginxConfigWith is nginxConfig whose UDP sessions end as end says.
func nginxConfigWith(dir, module string, up, front ports, sessions int, end udpEnding) (string, error) {
	var b bytes.Buffer
	err := nginxTmpl.Execute(&b, map[string]any{
		"Dir": dir, "Module": module, "Routes": routes(up, front),
		"Files": max(20000, sessions+1000), "Conns": max(10000, 2*sessions+1000),
		"UDPTimeout": end.idleSeconds(), "Responses": end.responses,
	})
	return b.String(), err
}

func startNginx(s setup) (*child, error) {
	if _, err := os.Stat(nginxModule); err != nil {
		return nil, fmt.Errorf("no stream module (apt-get install libnginx-mod-stream): %v", err)
	}
	cfg, err := nginxConfigWith(s.dir, nginxModule, s.up, s.front, max(s.udpEntries, s.idleConns), s.udpEnd)
	if err != nil {
		return nil, err
	}
	file := filepath.Join(s.dir, "nginx.conf")
	if err := os.WriteFile(file, []byte(cfg), 0o644); err != nil {
		return nil, err
	}
	// -p and -e keep nginx away from /etc/nginx and /var/log/nginx.
	return startChild(s, nil, s.binary, "-p", s.dir, "-e", filepath.Join(s.dir, "nginx-error.log"), "-c", file)
}

// lookBinary resolves a binary name or path, or says why it cannot.
func lookBinary(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err != nil && !strings.Contains(name, "/") {
		// Debian puts haproxy and nginx in /usr/sbin, which may not be in $PATH.
		path, err = exec.LookPath(filepath.Join("/usr/sbin", name))
	}
	if err != nil {
		return "", fmt.Errorf("%s not found", name)
	}
	return filepath.Abs(path) // the child runs in its own dir

}
