// Package pintest holds the pin-source cases that both readers of a PIN
// file in this repository must agree on: the core's, behind URI.Config
// (RFC 7512 URIs, hsm's dialect: file:/path or /path, the first line), and
// stepkms's (step's KMS URIs, step's dialect: file:, a URL or any path, the
// whole file without trailing white space). They read different dialects,
// so they are two functions; Run checks that they are equally safe (no
// read that blocks, nothing but a small regular file) and read a plain
// PIN file alike.
package pintest

import (
	"bytes"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// Case is one pin-source and what reading it must give.
type Case struct {
	Name   string
	Source string // the pin-source attribute's value
	PIN    string // the PIN read, when Err is false
	Err    bool   // reading must fail, at once
}

// Cases returns the cases, with their files in a directory of t's.
func Cases(t testing.TB) []Case {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		t.Helper()
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	plain := write("plain", []byte("1234\n"))
	crlf := write("crlf", []byte("5678\r\n"))
	bare := write("bare", []byte("pin without a line end"))
	full := write("full", bytes.Repeat([]byte("7"), 1024))
	big := write("big", bytes.Repeat([]byte("1"), 1025))
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	return []Case{
		{Name: "path", Source: plain, PIN: "1234"},
		{Name: "file URI", Source: "file:" + plain, PIN: "1234"},
		{Name: "CRLF", Source: crlf, PIN: "5678"},
		{Name: "no line end", Source: bare, PIN: "pin without a line end"},
		{Name: "1024 bytes", Source: full, PIN: string(bytes.Repeat([]byte("7"), 1024))},
		{Name: "1025 bytes", Source: big, Err: true},
		{Name: "missing", Source: filepath.Join(dir, "none"), Err: true},
		{Name: "directory", Source: dir, Err: true},
		{Name: "FIFO without a writer", Source: fifo, Err: true},
		{Name: "/dev/zero", Source: "/dev/zero", Err: true},
		{Name: "/dev/urandom", Source: "/dev/urandom", Err: true},
	}
}

// Run reads every case with read, in a subtest each; a read that has not
// returned after 5 seconds fails the test (it would block Open or New).
func Run(t *testing.T, read func(source string) (string, error)) {
	for _, c := range Cases(t) {
		t.Run(c.Name, func(t *testing.T) {
			type result struct {
				pin string
				err error
			}
			done := make(chan result, 1)
			go func() {
				pin, err := read(c.Source)
				done <- result{pin, err}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(5 * time.Second):
				t.Fatalf("reading pin-source %s has not returned after 5s", c.Source)
			}
			switch {
			case c.Err && r.err == nil:
				t.Errorf("pin-source %s read as %q; want an error", c.Source, r.pin)
			case !c.Err && r.err != nil:
				t.Errorf("pin-source %s: %v", c.Source, r.err)
			case !c.Err && r.pin != c.PIN:
				t.Errorf("pin-source %s read as %q; want %q", c.Source, r.pin, c.PIN)
			}
		})
	}
}
