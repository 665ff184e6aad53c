package main

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

// child is a proxy process, started in a process group of its own.
type child struct {
	name string
	cmd  *exec.Cmd
	out  string        // file with its stdout and stderr
	done chan struct{} // closed when it has exited
	err  error         // its exit status, valid once done is closed
}

// running are the children alive now, by process group, so that a signal
// can end them.
var running = struct {
	sync.Mutex
	kids   map[int]*child
	closed bool
}{kids: map[int]*child{}}

// startChild starts argv, pinned with taskset when s.pin is set: to CPU 1,
// or to the bench's CPU 0 with s.benchCPU.
func startChild(s setup, env []string, argv ...string) (*child, error) {
	if s.pin {
		cpu := "1"
		if s.benchCPU {
			cpu = "0"
		}
		argv = append([]string{"taskset", "-c", cpu}, argv...)
	}
	name := s.name
	out, err := os.Create(filepath.Join(s.dir, name+".out"))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = s.dir
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = out, out
	// Own process group, so one kill reaches nginx's worker too; and
	// SIGKILL if the bench itself dies.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	running.Lock()
	defer running.Unlock()
	if running.closed {
		return nil, errors.New("shutting down")
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	c := &child{name: name, cmd: cmd, out: out.Name(), done: make(chan struct{})}
	running.kids[cmd.Process.Pid] = c
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	return c, nil
}

func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// why describes how the child ended, with the last line it printed.
func (c *child) why() string {
	msg := fmt.Sprintf("exited: %v", c.err)
	if b, err := os.ReadFile(c.out); err == nil {
		if line := lastLine(string(b)); line != "" {
			msg += ": " + line
		}
	}
	return msg
}

func lastLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	line := strings.TrimSpace(lines[len(lines)-1])
	if len(line) > 200 {
		line = line[:200] + "..."
	}
	return line
}

// stop ends the child's process group: SIGTERM, then SIGKILL after 3 s.
func (c *child) stop() {
	pgid := c.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(3 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL)
		select {
		case <-c.done:
		case <-time.After(5 * time.Second):
		}
	}
	syscall.Kill(-pgid, syscall.SIGKILL) // anything left in the group
	running.Lock()
	delete(running.kids, pgid)
	running.Unlock()
}

// killAll kills every child group, waits up to 3 s for them to be reaped,
// and lets no new child start. It is for the signal handler.
func killAll() {
	running.Lock()
	defer running.Unlock()
	running.closed = true
	for pgid := range running.kids {
		syscall.Kill(-pgid, syscall.SIGKILL)
	}
	timeout := time.After(3 * time.Second)
	for _, c := range running.kids {
		select {
		case <-c.done:
		case <-timeout:
			return
		}
	}
}

// rssKB is a process's resident memory in KB, from /proc/<pid>/status.
func rssKB(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseVmRSS(string(b))
}

func parseVmRSS(status string) (int64, error) {
	for line := range strings.SplitSeq(status, "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("odd VmRSS line %q", line)
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, errors.New("no VmRSS line")
}

// childPIDs lists the processes whose parent is pid.
func childPIDs(pid int) ([]int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range ents {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue // gone already
		}
		if pp, err := parsePPID(string(b)); err == nil && pp == pid {
			out = append(out, p)
		}
	}
	return out, nil
}

// parsePPID reads the parent pid from /proc/<pid>/stat: "pid (comm) state ppid ...".
// comm may hold spaces and parentheses, so fields start after the last ')'.
func parsePPID(stat string) (int, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, errors.New("no ')' in stat")
	}
	f := strings.Fields(stat[i+1:])
	if len(f) < 2 {
		return 0, errors.New("short stat")
	}
	return strconv.Atoi(f[1])
}

// pinSelf pins every thread of this process to one CPU. Threads made later
// inherit it from the thread that makes them.
func pinSelf(cpu int) error {
	var mask [16]uint64
	mask[cpu/64] |= 1 << (cpu % 64)
	for range 2 { // twice, for a thread born during the first pass
		ents, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, e := range ents {
			tid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			_, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY,
				uintptr(tid), unsafe.Sizeof(mask), uintptr(unsafe.Pointer(&mask)))
			if errno != 0 {
				return errno
			}
		}
	}
	return nil
}
