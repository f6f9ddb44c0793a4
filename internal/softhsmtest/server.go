package softhsmtest

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Server serves one token through `p11-kit server`, the way a network HSM
// is reached: every PKCS#11 call of a client that loads ClientModule is a
// round trip over a Unix socket to a p11-kit-remote process that runs
// SoftHSM. The server runs in a session of its own (setsid), so that Kill,
// Pause and Resume reach it and every per-connection child it started.
type Server struct {
	t    testing.TB
	tok  *Token
	sock string
	cmd  *exec.Cmd
	log  bytes.Buffer
}

// running guards the one socket of the test binary.
var running sync.Mutex

// StartServer starts p11-kit server for tok on the test binary's socket
// (the address Main put in P11_KIT_SERVER_ADDRESS) and stops it when the test
// ends. One server runs at a time: a second StartServer waits for the first
// to stop. It fails the test when p11-kit is not installed in CI, skips it
// elsewhere.
func StartServer(t testing.TB, tok *Token) *Server {
	t.Helper()
	RequireRemote(t)
	running.Lock()
	s := &Server{t: t, tok: tok, sock: socketPath()}
	t.Cleanup(func() {
		s.stop()
		running.Unlock()
	})
	s.start()
	return s
}

// RequireRemote is Require plus p11-kit's server and client module.
func RequireRemote(t testing.TB) {
	t.Helper()
	Require(t)
	var missing []string
	if _, err := exec.LookPath("p11-kit"); err != nil {
		missing = append(missing, "p11-kit")
	}
	if _, err := os.Stat(ClientModule); err != nil {
		missing = append(missing, ClientModule)
	}
	if len(missing) == 0 {
		return
	}
	msg := "softhsmtest: not installed: " + strings.Join(missing, ", ") + " (package p11-kit); run `make deps`"
	if os.Getenv("CI") == "true" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// Address is the value for P11_KIT_SERVER_ADDRESS.
func (s *Server) Address() string { return "unix:path=" + s.sock }

// Module is the PKCS#11 module a client loads: p11-kit's client.
func (s *Server) Module() string { return ClientModule }

func (s *Server) start() {
	s.t.Helper()
	_ = os.Remove(s.sock)
	cmd := exec.Command("p11-kit", "server", "-f", "-n", s.sock, "-p", SoftHSMModule, "pkcs11:token="+s.tok.Label)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	s.log.Reset()
	cmd.Stdout = &s.log
	cmd.Stderr = &s.log
	if err := cmd.Start(); err != nil {
		s.t.Fatalf("softhsmtest: start p11-kit server: %v", err)
	}
	s.cmd = cmd
	// The socket file appears at bind(), before listen(); p11-kit-client
	// turns a refused connection into an empty slot list. Wait until a
	// connection is accepted.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if c, err := net.Dial("unix", s.sock); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			s.stop()
			s.t.Fatalf("softhsmtest: p11-kit server did not create %s in 10s; output:\n%s", s.sock, s.log.String())
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
// gone, connections break. It returns once the server has exited.
func (s *Server) Kill() {
	s.t.Helper()
	if s.cmd == nil {
		return
	}
	s.signal(syscall.SIGCONT) // a stopped process would not die until continued
	s.signal(syscall.SIGKILL)
	_ = s.cmd.Wait()
	sid := s.cmd.Process.Pid
	s.cmd = nil
	deadline := time.Now().Add(5 * time.Second)
	for len(sessionPids(sid)) > 0 {
		if time.Now().After(deadline) {
			s.t.Fatalf("softhsmtest: processes of session %d survive SIGKILL: %v", sid, sessionPids(sid))
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// Pause stops (SIGSTOP) every process of the server's session: calls in
// flight hang, as with a stalled network. It returns how many processes it
// stopped.
func (s *Server) Pause() int { return s.signal(syscall.SIGSTOP) }

// Resume continues what Pause stopped.
func (s *Server) Resume() int { return s.signal(syscall.SIGCONT) }

// Restart kills the server if it runs and starts a new one on the same
// socket: the HSM is back.
func (s *Server) Restart() {
	s.t.Helper()
	s.Kill()
	s.start()
}

// Running reports whether the server process is up.
func (s *Server) Running() bool { return s.cmd != nil }

func (s *Server) stop() {
	if s.cmd != nil {
		s.signal(syscall.SIGCONT)
		s.signal(syscall.SIGKILL)
		_ = s.cmd.Wait()
		s.cmd = nil
	}
}

// String names the server for test logs.
func (s *Server) String() string {
	return fmt.Sprintf("p11-kit server for token %q at %s", s.tok.Label, s.sock)
}
