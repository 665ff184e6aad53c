package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// Daemon is a real server program a test runs in the foreground, killed
// when the test ends.
type Daemon struct {
	// Dir is its own directory (config, pid file, logs).
	Dir string
	// ErrLog is its error log (nginx) or its captured output (HAProxy).
	ErrLog string

	cmd  *exec.Cmd
	done chan struct{}
	once sync.Once
}

// Stop kills the program and waits for it; the test's end calls it too.
func (d *Daemon) Stop() {
	d.once.Do(func() {
		_ = d.cmd.Process.Kill()
		<-d.done
	})
}

// Log is what the program has written to ErrLog so far.
func (d *Daemon) Log() string {
	b, _ := os.ReadFile(d.ErrLog)
	return string(b)
}

func startDaemon(t testing.TB, d *Daemon, name string, args ...string) *Daemon {
	t.Helper()
	d.cmd = exec.Command(name, args...)
	d.done = make(chan struct{})
	if d.cmd.Stdout == nil {
		out, err := os.OpenFile(filepath.Join(d.Dir, "output.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { out.Close() })
		d.cmd.Stdout, d.cmd.Stderr = out, out
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	go func() { _ = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(d.Stop)
	return d
}

// Debian's nginx and its stream module (apt-get install nginx
// libnginx-mod-stream).
const (
	nginxBin          = "/usr/sbin/nginx"
	nginxStreamModule = "/usr/lib/nginx/modules/ngx_stream_module.so"
)

// Nginx runs Debian's nginx, one process, with stream as the body of its
// `stream { }` block and its error log at level info in ErrLog. It skips
// the test when nginx or its stream module is not installed.
func Nginx(t testing.TB, stream string) *Daemon {
	t.Helper()
	for _, f := range []string{nginxBin, nginxStreamModule} {
		if _, err := os.Stat(f); err != nil {
			t.Skipf("nginx with its stream module is needed (apt-get install nginx libnginx-mod-stream): %v", err)
		}
	}
	dir := t.TempDir()
	d := &Daemon{Dir: dir, ErrLog: filepath.Join(dir, "error.log")}
	conf := fmt.Sprintf(`load_module %s;
worker_processes 1;
daemon off;
master_process off;
pid %s/nginx.pid;
error_log %s info;
events { worker_connections 64; }
stream {
%s
}
`, nginxStreamModule, dir, d.ErrLog, stream)
	file := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(file, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	return startDaemon(t, d, nginxBin, "-p", dir, "-e", d.ErrLog, "-c", file)
}

// haproxyBin is Debian's HAProxy (apt-get install haproxy).
const haproxyBin = "/usr/sbin/haproxy"

// HAProxy runs Debian's HAProxy in the foreground with conf as its whole
// config, its output in ErrLog. It skips the test when HAProxy is not
// installed.
func HAProxy(t testing.TB, conf string) *Daemon {
	t.Helper()
	if _, err := os.Stat(haproxyBin); err != nil {
		t.Skipf("HAProxy is needed (apt-get install haproxy): %v", err)
	}
	dir := t.TempDir()
	d := &Daemon{Dir: dir, ErrLog: filepath.Join(dir, "output.log")}
	file := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(file, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(haproxyBin, "-c", "-f", file).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c: %v\n%s\nconfig:\n%s", err, out, conf)
	}
	return startDaemon(t, d, haproxyBin, "-db", "-f", file)
}

// Program runs the program name (looked up in PATH) with args in the
// foreground, its output in ErrLog. It skips the test when the program is
// not installed.
func Program(t testing.TB, name string, args ...string) *Daemon {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s is needed: %v", name, err)
	}
	dir := t.TempDir()
	return startDaemon(t, &Daemon{Dir: dir, ErrLog: filepath.Join(dir, "output.log")}, path, args...)
}
