package main

import (
	"bytes"
	"context"
	"crypto"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/ce46d8f2/hsm"
	"github.com/ce46d8f2/hsm/internal/softhsm"
)

// runner holds the token, its keys and what the checks share.
type runner struct {
	ctx           context.Context
	dir           string // temporary: SoftHSM's configuration and tokens, the clients' files
	clientTimeout time.Duration
	verbose       bool
	joseDir       string
	p             *hsm.Provider
	keys          map[string]crypto.Signer // durable keys by label
	versions      map[string]string
	setupTook     time.Duration
	cleanups      []func()
	results       []result
}

// The keys on the token, by label. Each "-b" key is another key of the
// same type: the one the broken inputs are signed or decrypted with.
var keySpecs = []hsm.KeySpec{
	{Label: "p256", Type: hsm.ECDSAP256},
	{Label: "p256-b", Type: hsm.ECDSAP256},
	{Label: "p384", Type: hsm.ECDSAP384},
	{Label: "p384-b", Type: hsm.ECDSAP384},
	{Label: "p521", Type: hsm.ECDSAP521},
	{Label: "p521-b", Type: hsm.ECDSAP521},
	{Label: "rsa", Type: hsm.RSA2048},
	{Label: "rsa-b", Type: hsm.RSA2048},
	{Label: "rsa-kex", Type: hsm.RSA2048, Decrypt: true},
	{Label: "rsa-kex-b", Type: hsm.RSA2048, Decrypt: true},
	{Label: "ed25519", Type: hsm.Ed25519},
	{Label: "ed25519-b", Type: hsm.Ed25519},
}

// newRunner makes a SoftHSM2 token in a temporary directory, opens it and
// generates the keys. On error it has cleaned up.
func newRunner(ctx context.Context, c config) (_ *runner, err error) {
	r := &runner{ctx: ctx, clientTimeout: c.clientTimeout, verbose: c.verbose, joseDir: c.jose, keys: map[string]crypto.Signer{}, versions: map[string]string{}}
	defer func() {
		if err != nil {
			r.close()
		}
	}()
	for _, tool := range []struct{ name, arg string }{{"openssl", "version"}, {"curl", "--version"}} {
		out, code, err := r.exec(ctx, "", tool.name, tool.arg)
		if err != nil || code != 0 {
			return nil, fmt.Errorf("%s %s: exit %d, %v: %s", tool.name, tool.arg, code, err, out)
		}
		r.versions[tool.name] = strings.TrimSpace(strings.SplitN(out, "\n", 2)[0])
	}
	r.versions["go"] = runtime.Version()
	if missing := softhsm.Missing(false); len(missing) > 0 {
		return nil, fmt.Errorf("not installed: %s; run `make deps`", strings.Join(missing, ", "))
	}
	if r.dir, err = os.MkdirTemp("", "hsm-interop-"); err != nil {
		return nil, err
	}
	r.cleanups = append(r.cleanups, func() { os.RemoveAll(r.dir) })
	start := time.Now()
	if err := softhsm.Setup(filepath.Join(r.dir, "softhsm")); err != nil {
		return nil, err
	}
	tok, err := softhsm.CreateToken("interop")
	if err != nil {
		return nil, err
	}
	r.p, err = hsm.Open(hsm.Config{Path: softhsm.SoftHSMModule, TokenLabel: tok.Label, PIN: tok.PIN})
	if err != nil {
		return nil, err
	}
	r.cleanups = append(r.cleanups, func() { r.p.Close() })
	for _, spec := range keySpecs {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		made, err := r.p.GenerateKey(spec)
		if err != nil {
			return nil, fmt.Errorf("generate %s: %w", spec.Label, err)
		}
		// The kind an application holds.
		if spec.Decrypt {
			r.keys[spec.Label], err = r.p.DurableDecrypter(made.KeyRef())
		} else {
			r.keys[spec.Label], err = r.p.DurableSigner(made.KeyRef())
		}
		if err != nil {
			return nil, fmt.Errorf("durable %s: %w", spec.Label, err)
		}
	}
	r.setupTook = time.Since(start)
	return r, nil
}

// close undoes what newRunner and the checks made, last first.
func (r *runner) close() {
	for i := len(r.cleanups) - 1; i >= 0; i-- {
		r.cleanups[i]()
	}
	r.cleanups = nil
}

// key returns the durable key labelled label.
func (r *runner) key(label string) crypto.Signer {
	k, ok := r.keys[label]
	if !ok {
		panic("interop: no key " + label)
	}
	return k
}

// write writes a file into the runner's directory and returns its path.
func (r *runner) write(name string, data []byte) (string, error) {
	f := filepath.Join(r.dir, name)
	return f, os.WriteFile(f, data, 0o600)
}

// exec runs a client in the runner's directory with stdin as its input,
// bounded by clientTimeout, and returns its output (stdout and stderr)
// and exit code. err is for a client that could not run or did not finish
// in time; an exit code other than 0 is not an error.
func (r *runner) exec(ctx context.Context, stdin string, name string, args ...string) (out string, code int, err error) {
	ctx, cancel := context.WithTimeout(ctx, r.clientTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = r.dir
	cmd.Stdin = strings.NewReader(stdin)
	var b bytes.Buffer
	cmd.Stdout = &b
	cmd.Stderr = &b
	cmd.WaitDelay = 2 * time.Second // then the pipes are closed, whoever holds them
	err = cmd.Run()
	out = b.String()
	if r.verbose {
		fmt.Printf("---- %s %s\n%s----\n", name, strings.Join(args, " "), out)
	}
	if ctx.Err() != nil {
		return out, -1, fmt.Errorf("%s did not finish within %v: %w", name, r.clientTimeout, ctx.Err())
	}
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return out, exit.ExitCode(), nil
	}
	if err != nil {
		return out, -1, err
	}
	return out, 0, nil
}

// lastLines returns the last n non-empty lines of out, joined by " / ",
// for error messages.
func lastLines(out string, n int) string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " / ")
}
