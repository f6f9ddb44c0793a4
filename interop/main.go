// Command interop checks the output of package hsm with clients nobody
// here wrote: openssl s_client and curl handshake with an HTTPS server
// whose keys are on a SoftHSM2 token (TLS 1.3 with ECDSA, RSA-PSS and
// Ed25519; TLS 1.2 ECDHE-ECDSA, ECDHE-RSA and RSA key exchange through a
// DurableDecrypter), openssl verify checks certificates issued by CA keys
// on the token, openssl req -verify checks CSRs signed by token keys, and
// npm's jose verifies hsmjwt's JWTs of every algorithm.
//
// Every check runs twice: on good input the client must accept, and on
// input broken on purpose (a server that signs or decrypts with another key
// than its certificate's, a certificate or CSR signed by another key, a JWT
// with a corrupted signature or signed by another key) it must refuse, for
// the reason the breakage gives. A check that could only pass would show
// up here as a refusal that did not happen.
//
// scripts/interop.sh (make interop) installs the clients, puts jose in a
// temporary directory and runs this program with -jose set to it. The
// program makes its token in a temporary directory of its own, serves on
// 127.0.0.1 only, bounds every client run (-client-timeout) and the whole
// run (-timeout), and removes what it made on every exit path. It exits 1
// when any check did not go as wanted.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

func main() {
	var c config
	flag.StringVar(&c.jose, "jose", "", "directory holding node_modules/jose (npm install --prefix DIR jose); empty: skip the JWT checks, and fail")
	flag.DurationVar(&c.timeout, "timeout", 100*time.Second, "bound on the whole run")
	flag.DurationVar(&c.clientTimeout, "client-timeout", 20*time.Second, "bound on each run of a client")
	flag.BoolVar(&c.verbose, "v", false, "print every client's output")
	flag.StringVar(&c.markdown, "markdown", "", "also write the results as a Markdown table to this file")
	flag.Parse()
	if err := run(c); err != nil {
		fmt.Fprintln(os.Stderr, "interop:", err)
		os.Exit(1)
	}
}

type config struct {
	jose          string
	timeout       time.Duration
	clientTimeout time.Duration
	verbose       bool
	markdown      string
}

func run(c config) error {
	// A signal ends the run through ctx, and the deferred clean-ups run.
	// SIGPIPE is caught too, so that output piped into head makes writes
	// fail instead of killing the program before it cleans up (a caught
	// signal is reset to its default in the clients).
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	ctx, cancel := context.WithTimeout(ctx, c.timeout)
	defer cancel()

	start := time.Now()
	r, err := newRunner(ctx, c)
	if err != nil {
		return err
	}
	defer r.close()
	fmt.Printf("interop: %s; %s; %s; token keys made in %v\n", r.versions["openssl"], r.versions["curl"], r.versions["go"], r.setupTook.Round(time.Millisecond))

	tlsChecks(r)
	x509Checks(r)
	jwtChecks(r)

	failed := r.report(os.Stdout)
	if c.markdown != "" {
		if err := r.writeMarkdown(c.markdown); err != nil {
			return err
		}
	}
	fmt.Printf("interop: %d checks, %d failed, %v\n", len(r.results), failed, time.Since(start).Round(time.Millisecond))
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("stopped: %w", context.Cause(ctx))
	}
	if failed > 0 {
		return errors.New("some clients did not do what they should")
	}
	return nil
}

// A result is what one client did with one input.
type result struct {
	area   string // "TLS", "X.509", "JWT"
	name   string // the input, e.g. "TLS 1.3 ECDSA P-256"
	client string // e.g. "openssl s_client"
	accept bool   // what the client should do: accept (good input) or refuse (broken input)
	how    string // what it did, in a few words
	err    error  // nil when it did what it should
	took   time.Duration
}

// check runs f, which returns whether the client accepted, a few words
// on how (the suite, or the refusal's reason) and an error when what
// happened is neither a clean acceptance nor the refusal the broken input
// must cause. It records whether that is what was wanted.
func (r *runner) check(area, name, client string, accept bool, f func(ctx context.Context) (accepted bool, how string, err error)) {
	res := result{area: area, name: name, client: client, accept: accept}
	start := time.Now()
	if err := r.ctx.Err(); err != nil {
		res.err = fmt.Errorf("not run: %w", err)
	} else {
		accepted, how, err := f(r.ctx)
		res.how = how
		switch {
		case err != nil:
			res.err = err
		case accepted && !accept:
			res.err = errors.New("accepted input it must refuse")
		case !accepted && accept:
			res.err = errors.New("refused input it must accept")
		}
	}
	res.took = time.Since(start)
	r.results = append(r.results, res)
	mark := "ok  "
	if res.err != nil {
		mark = "FAIL"
	}
	fmt.Printf("%s %-5s %-44s %-18s %-6s %v  %s\n", mark, area, name, client, want(accept), res.took.Round(time.Millisecond), res.how)
	if res.err != nil {
		fmt.Printf("     %v\n", res.err)
	}
}

func want(accept bool) string {
	if accept {
		return "accept"
	}
	return "refuse"
}

// report prints the failures once more and returns how many there were.
func (r *runner) report(w io.Writer) int {
	failed := 0
	for _, res := range r.results {
		if res.err != nil {
			if failed == 0 {
				fmt.Fprintln(w, "\nFailed:")
			}
			failed++
			fmt.Fprintf(w, "  %s %s, %s (should %s): %v\n", res.area, res.name, res.client, want(res.accept), res.err)
		}
	}
	return failed
}

// writeMarkdown writes the results as a Markdown table.
func (r *runner) writeMarkdown(file string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "| | Input | Client | Should | Did | Time |\n|---|---|---|---|---|---|\n")
	for _, res := range r.results {
		mark := "ok"
		if res.err != nil {
			mark = "**FAIL**"
		}
		fmt.Fprintf(&b, "| %s | %s: %s | %s | %s | %s | %v |\n", mark, res.area, res.name, res.client, want(res.accept), strings.ReplaceAll(res.how, "|", `\|`), res.took.Round(time.Millisecond))
	}
	return os.WriteFile(file, []byte(b.String()), 0o644)
}
