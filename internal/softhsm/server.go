package softhsm

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Server serves one token through `p11-kit server`, the way a network HSM
// is reached: every PKCS#11 call of a client that loads ClientModule is a
// round trip over a Unix socket to a p11-kit-remote process that runs
// SoftHSM. The server runs in a session of its own (setsid), so that Kill,
// Pause and Resume reach it and every per-connection child it started.
//
// A Server is not safe for concurrent use.
type Server struct {
	tok    *Token
	more   []*Token // further tokens it exports (Serve's more)
	sock   string
	module string // ServeOwn's copy of ClientModule; "" for ClientModule
	cmd    *exec.Cmd
	log    bytes.Buffer
}

// running guards the one socket of the process.
var running sync.Mutex

// Serve starts p11-kit server for tok, and the more tokens, on the
// process's socket (the address Setup put in P11_KIT_SERVER_ADDRESS): one
// network HSM whose client module shows each token in a slot of its own,
// as a Luna client shows its partitions. One server runs at a time: a
// second Serve waits until the first is stopped with Stop.
func Serve(tok *Token, more ...*Token) (*Server, error) {
	if dir == "" {
		return nil, fmt.Errorf("softhsm: Setup has not run")
	}
	running.Lock()
	s := &Server{tok: tok, more: more, sock: socketPath()}
	if err := s.start(); err != nil {
		running.Unlock()
		return nil, err
	}
	return s, nil
}

// owned counts ServeOwn's servers, to name their sockets, module copies
// and variables.
var owned atomic.Uint64

// ServeOwn starts p11-kit server for tok on a socket of its own, so that
// several servers run at once (the members of an hsm.Group), each reached
// through a module of its own: Module returns a copy of ClientModule in
// which the name of the variable it reads its address from,
// P11_KIT_SERVER_ADDRESS, is replaced by one of the same length and of this
// server's own (P11_KIT_SERVER_ADDR001, ...), set in the environment here.
//
// Copies alone would not do: p11-kit-client reads the variable at every
// C_GetFunctionList, that is when each copy is loaded, so one variable
// would have to be changed between the loads of two copies, and an
// hsm.Group loads all its members in one call.
func ServeOwn(tok *Token) (*Server, error) {
	if dir == "" {
		return nil, fmt.Errorf("softhsm: Setup has not run")
	}
	n := owned.Add(1)
	if n > 999 {
		return nil, fmt.Errorf("softhsm: more than 999 servers of their own in one process")
	}
	name := fmt.Sprintf("P11_KIT_SERVER_ADDR%03d", n)
	lib, err := os.ReadFile(ClientModule)
	if err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	const orig = "P11_KIT_SERVER_ADDRESS\x00"
	if len(name) != len(orig)-1 || bytes.Count(lib, []byte(orig)) != 1 {
		return nil, fmt.Errorf("softhsm: %s does not name %s exactly once: cannot make a copy with an address of its own", ClientModule, orig[:len(orig)-1])
	}
	lib = bytes.Replace(lib, []byte(orig), []byte(name+"\x00"), 1)
	module := filepath.Join(dir, fmt.Sprintf("client%03d", n), filepath.Base(ClientModule))
	if err := os.MkdirAll(filepath.Dir(module), 0o700); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	if err := os.WriteFile(module, lib, 0o700); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	s := &Server{tok: tok, sock: filepath.Join(dir, fmt.Sprintf("p11-kit-%03d.sock", n)), module: module}
	if err := os.Setenv(name, s.Address()); err != nil {
		return nil, fmt.Errorf("softhsm: %w", err)
	}
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

// Address is the value for P11_KIT_SERVER_ADDRESS.
func (s *Server) Address() string { return "unix:path=" + s.sock }

// Module is the PKCS#11 module a client loads: p11-kit's client, or for
// ServeOwn's servers its copy.
func (s *Server) Module() string {
	if s.module != "" {
		return s.module
	}
	return ClientModule
}

func (s *Server) start() error {
	_ = os.Remove(s.sock)
	args := []string{"server", "-f", "-n", s.sock, "-p", SoftHSMModule, "pkcs11:token=" + s.tok.Label}
	for _, t := range s.more {
		args = append(args, "pkcs11:token="+t.Label)
	}
	cmd := exec.Command("p11-kit", args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	// Wait returns even if a process outside the session held the output
	// pipe open.
	cmd.WaitDelay = 5 * time.Second
	s.log.Reset()
	cmd.Stdout = &s.log
	cmd.Stderr = &s.log
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("softhsm: start p11-kit server: %w", err)
	}
	s.cmd = cmd
	// The socket file appears at bind(), before listen(); p11-kit-client
	// turns a refused connection into an empty slot list. Wait until a
	// connection is accepted.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			s.kill()
			return fmt.Errorf("softhsm: p11-kit server did not accept on %s in 10s; output:\n%s", s.sock, s.log.String())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// Pids returns the processes of the server's session: the server and the
// p11-kit-remote child of every connection.
func (s *Server) Pids() []int {
	if s.cmd == nil {
		return nil
	}
	return sessionPids(s.cmd.Process.Pid)
}

// sessionPids lists the live processes whose session id is sid, read from
// /proc/PID/stat (field 6).
func sessionPids(sid int) []int {
	entries, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// The command name (field 2) is in parentheses and may hold spaces.
		i := bytes.LastIndexByte(b, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(string(b[i+1:]))
		// f[0] state, f[1] ppid, f[2] pgrp, f[3] session
		if len(f) > 3 && f[0] != "Z" && f[3] == strconv.Itoa(sid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

func (s *Server) signal(sig syscall.Signal) int {
	pids := s.Pids()
	for _, pid := range pids {
		_ = syscall.Kill(pid, sig)
	}
	return len(pids)
}

// Kill sends SIGKILL to every process of the server's session: the HSM is
// gone, connections break. It returns once they have all exited.
func (s *Server) Kill() error {
	if s.cmd == nil {
		return nil
	}
	sid := s.kill()
	deadline := time.Now().Add(5 * time.Second)
	for len(sessionPids(sid)) > 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("softhsm: processes of session %d survive SIGKILL: %v", sid, sessionPids(sid))
		}
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

// kill signals the session and reaps the server; it returns the session
// id. Every process is continued, then killed, as the session is at each
// step (a stopped process would not die until continued; one continued
// finishes the write it was stopped in, which tests that stop the server
// at an object file rely on: see StopAtObject). Then it signals again
// until no process of the session is left: a server continued before it
// dies may fork a child for a client's connection between two looks at
// the session.
func (s *Server) kill() int {
	sid := s.cmd.Process.Pid
	s.signal(syscall.SIGCONT)
	s.signal(syscall.SIGKILL)
	deadline := time.Now().Add(5 * time.Second)
	for pids := sessionPids(sid); len(pids) > 0 && time.Now().Before(deadline); pids = sessionPids(sid) {
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGCONT)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(time.Millisecond)
	}
	_ = s.cmd.Wait()
	s.cmd = nil
	return sid
}

// Pause stops (SIGSTOP) every process of the server's session: calls in
// flight hang, as with a stalled network. It returns how many processes it
// stopped.
func (s *Server) Pause() int { return s.signal(syscall.SIGSTOP) }

// Resume continues what Pause stopped.
func (s *Server) Resume() int { return s.signal(syscall.SIGCONT) }

// Restart kills the server if it runs and starts a new one on the same
// socket: the HSM is back.
func (s *Server) Restart() error {
	if err := s.Kill(); err != nil {
		return err
	}
	return s.start()
}

// Stop kills the server and frees the socket for the next Serve. Calling it
// twice is harmless.
func (s *Server) Stop() {
	if s.sock == "" {
		return
	}
	if s.cmd != nil {
		s.kill()
	}
	s.sock = ""
	if s.module == "" {
		running.Unlock()
	}
}

// String names the server for logs.
func (s *Server) String() string {
	labels := []string{strconv.Quote(s.tok.Label)}
	for _, t := range s.more {
		labels = append(labels, strconv.Quote(t.Label))
	}
	return fmt.Sprintf("p11-kit server for token %s at %s", strings.Join(labels, ", "), s.sock)
}

// Trap stops the server the moment a given number of new object files have
// appeared in its token's directory: what SoftHSM had written by then stays,
// what it had not written never is (see StopAtObject).
type Trap struct {
	f     *os.File
	done  chan struct{}
	fired atomic.Bool
	names []string
}

// StopAtObject arranges for every process of the server's session to be
// stopped (SIGSTOP) as soon as the n-th new object file appears in the
// token's directory (SoftHSM's file store writes one file per object): a
// token that dies in the middle of a C_GenerateKeyPair, after its first
// half is written and before its second is. Kill it afterwards. The
// processes are the server and its connections' children as they are now:
// call it once the client is connected.
func (s *Server) StopAtObject(n int) (*Trap, error) {
	dir, err := s.tok.Dir()
	if err != nil {
		return nil, err
	}
	pids := s.Pids()
	if len(pids) == 0 {
		return nil, errors.New("softhsm: the server is not running")
	}
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("softhsm: inotify: %w", err)
	}
	if _, err := syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE); err != nil {
		syscall.Close(fd)
		return nil, fmt.Errorf("softhsm: inotify on %s: %w", dir, err)
	}
	tr := &Trap{f: os.NewFile(uintptr(fd), "inotify"), done: make(chan struct{})}
	go func() {
		defer close(tr.done)
		buf := make([]byte, 4096)
		seen := 0
		for {
			m, err := tr.f.Read(buf)
			if err != nil {
				return // closed
			}
			for off := 0; off+syscall.SizeofInotifyEvent <= m; {
				ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
				name := strings.TrimRight(string(buf[off+syscall.SizeofInotifyEvent:off+syscall.SizeofInotifyEvent+int(ev.Len)]), "\x00")
				off += syscall.SizeofInotifyEvent + int(ev.Len)
				if !strings.HasSuffix(name, ".object") {
					continue
				}
				tr.names = append(tr.names, name)
				if seen++; seen == n {
					for _, pid := range pids {
						_ = syscall.Kill(pid, syscall.SIGSTOP)
					}
					tr.fired.Store(true)
					return
				}
			}
		}
	}()
	return tr, nil
}

// Close disarms the trap and reports whether it fired, with the names of
// the new object files it saw.
func (tr *Trap) Close() (bool, []string) {
	tr.f.Close()
	<-tr.done
	return tr.fired.Load(), tr.names
}

// Fired reports whether the trap has stopped the server.
func (tr *Trap) Fired() bool { return tr.fired.Load() }
